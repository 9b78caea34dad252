"""The model card: a README.md for the merged model (method, inputs, options that differ from the defaults, recipe)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from llm_merge import __version__
from llm_merge.config.options import MergeConfig
from llm_merge.config.slices import check_slices

def model_card(cfg: MergeConfig, recipe_text: Optional[str] = None) -> str:
    """A short README.md for the merged model: method, inputs and the options that differ from the defaults."""
    defaults = MergeConfig()
    skip = {"model_path_list", "base_model_path", "output_path", "overwrite", "quiet", "n_process", "model_card",
            "merge_type", "sparsify_type", "start_method", "rank", "world_size", "resume", "dist_timeout",
            "force", "dry_run"}
    lines = ["---", "tags:", "- merge", "- llm_merge", "---", "", f"# {Path(cfg.output_path).name}", "",
             f"Merged with [llm_merge](https://github.com/) {__version__} using **{cfg.merge_method}**.", ""]
    if cfg.base_model_path:
        lines += [f"Base model: `{cfg.base_model_path}`", ""]
    if cfg.slices:
        lines += ["Layer slices:", ""] + [
            "- " + " + ".join(f"`{src.model}` layers {src.start}..{src.end - 1}" for src in s.sources) for s in check_slices(cfg.slices)]
    else:
        lines += ["Models:", ""] + [f"- `{m}`" for m in cfg.model_path_list]
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name not in skip and getattr(cfg, f.name) != getattr(defaults, f.name)}
    if options:
        lines += ["", "Options:", "", "```json", json.dumps(options, indent=2, default=str), "```"]
    if recipe_text:
        lines += ["", "Recipe:", "", "```yaml", recipe_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"

