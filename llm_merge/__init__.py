"""llm_merge: merge large language model checkpoints on CPU (NumPy) or GPU (Paddle)."""

__version__ = "0.1.0"

from llm_merge.errors import ConfigError, MergeError  # noqa: E402

__all__ = ["ConfigError", "MergeError", "__version__"]
