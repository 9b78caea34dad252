"""Merge LLM checkpoints: ``python tools/mergekit.py --help``, or a mergekit recipe: ``python tools/mergekit.py recipe.yml OUT``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llm_merge.cli.merge import main_entry  # noqa: E402

if __name__ == "__main__":
    main_entry()
