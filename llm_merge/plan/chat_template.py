"""``chat_template``: the template text the output gets, and the tokenizer records that carry it.

Written as transformers 5 (and so mergekit's ``save_pretrained``) writes it: ``chat_template.jinja``, with no
``chat_template`` key left in ``tokenizer_config.json`` (transformers prefers the .jinja file anyway).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from llm_merge.config import chat_templates
from llm_merge.errors import MergeError
from llm_merge.io import side_files

log = logging.getLogger(__name__)


def input_template(directory: Path) -> Optional[str]:
    """A checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's (a list: the "default" one)."""
    jinja = Path(directory) / "chat_template.jinja"
    if os.path.lexists(jinja):
        return side_files.read_text(jinja)
    config_path = Path(directory) / "tokenizer_config.json"
    if not os.path.lexists(config_path):
        return None
    try:
        template = side_files.read_json(config_path)
    except MergeError:
        return None
    template = template.get("chat_template") if isinstance(template, dict) else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def chosen_template(value: Optional[str], inputs: Sequence[Path]) -> Optional[str]:
    """The template text for ``--chat_template value``: auto -> the most common (stripped) template among ``inputs``
    (the first of the most common; None when no input has one), a built-in name -> its text, else ``value`` itself."""
    if value is None:
        return None
    if value == "auto":
        found = [t.strip() for t in (input_template(p) for p in inputs) if t]
        if not found:
            log.warning("--chat_template auto: no input has a chat template; none is written")
            return None
        return Counter(found).most_common(1)[0][0]
    if chat_templates.looks_like_name(value):
        return chat_templates.text(value)
    return value


def template_records(template: str, tokenizer_dir: Path, records: dict) -> dict:
    """Records writing ``template``: chat_template.jinja and the tokenizer_config.json without a chat_template key."""
    out = {"chat_template.jinja": template}
    tokenizer_config = records.get("tokenizer_config.json")
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    if tokenizer_config is None and os.path.lexists(path):
        tokenizer_config = side_files.read_json(path)
    if isinstance(tokenizer_config, dict) and "chat_template" in tokenizer_config:
        out["tokenizer_config.json"] = {k: v for k, v in tokenizer_config.items() if k != "chat_template"}
    return out
