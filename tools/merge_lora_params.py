"""Fold a LoRA adapter into its base model: ``python tools/merge_lora_params.py --help``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llm_merge.cli.lora import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
