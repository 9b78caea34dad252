"""Extract a LoRA adapter from a fine-tune: ``python tools/extract_lora.py --help``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llm_merge.cli.extract_lora import main_entry  # noqa: E402

if __name__ == "__main__":
    main_entry()
