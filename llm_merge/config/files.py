"""Config files: JSON configs and the mapping readers that recipes and adapter configs share (bounded reads)."""

from __future__ import annotations

import json
import os
from typing import Any

from llm_merge.errors import ConfigError
from llm_merge.io import side_files

def read_mapping_file(path: str | os.PathLike, parse, parse_error: type[Exception], label: str, fmt: str,
                      expected: str, error: type[Exception] = ConfigError) -> dict:
    """``parse`` of a file's text (a bounded read: ``side_files``), which must be a mapping;
    ``error`` starting with ``label`` otherwise."""
    return parse_mapping(side_files.read_text(path, label, error=error), parse, parse_error, label, fmt, expected, error)


def parse_mapping(text: str, parse, parse_error: type[Exception], label: str, fmt: str, expected: str,
                  error: type[Exception] = ConfigError) -> dict:
    """``parse(text)``, which must be a mapping; ``error`` starting with ``label`` otherwise."""
    try:
        values = parse(text)
    except parse_error as exc:
        raise error(f"{label}: not valid {fmt} ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise error(f"{label}: nested too deeply") from None
    if not isinstance(values, dict):
        raise error(f"{label}: expected {expected}")
    return values


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON config file into a dict of field values (checked by ``config_from_dict``)."""
    return read_mapping_file(path, json.loads, json.JSONDecodeError, f"config file {path}", "JSON", "a JSON object of options")

