"""Build a mixture-of-experts model from a mergekit-moe recipe: ``python tools/mergekit_moe.py RECIPE.yml OUTPUT``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llm_merge.cli.moe import main_entry  # noqa: E402

if __name__ == "__main__":
    main_entry()
