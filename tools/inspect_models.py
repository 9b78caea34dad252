"""Inspect models before merging them: ``python tools/inspect_models.py --base_model_path BASE --model_path_list A B ...``
(the same as ``llm-merge inspect``). Not ``tools/inspect.py``: every script here has this directory first on
``sys.path``, where a file of that name would replace the standard library's ``inspect`` for all of them."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llm_merge.cli.inspection import main_entry  # noqa: E402

if __name__ == "__main__":
    main_entry()
