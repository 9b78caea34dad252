"""Every option of a merge declared once (``options``), typed (``types``, ``values``), read from files
(``files``, ``recipes``) and checked before any work (``validate``)."""

from llm_merge.config.files import load_config_file
from llm_merge.config.options import FIELD_NAMES, METHOD_TABLE, MergeConfig
from llm_merge.config.validate import parse_size, resolve
from llm_merge.config.values import config_from_dict

__all__ = ["FIELD_NAMES", "METHOD_TABLE", "MergeConfig", "config_from_dict", "load_config_file", "parse_size", "resolve"]
