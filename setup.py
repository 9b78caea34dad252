from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("llm_merge/__init__.py").read_text().split("from llm_merge")[0], version)

setup(
    name="llm_merge",
    version=version["__version__"],
    description="Merge large language model checkpoints (linear, slerp, TIES, DARE, DELLA) on CPU or GPU, streaming safetensors.",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llm_merge", "llm_merge.*"]),
    package_data={"llm_merge.config.chat_templates": ["*.jinja"]},
    python_requires=">=3.9",
    install_requires=["numpy>=1.22", "safetensors>=0.4", "ml_dtypes>=0.2", "multiprocess>=0.70", "tqdm>=4.0", "numba>=0.59", "pyyaml>=5.1"],
    extras_require={
        "test": ["pytest>=7", "psutil>=5", "import-linter>=2", "tokenizers>=0.13"],  # tokenizer-merge tests
        "paddle": ["paddlepaddle>=2.6"],
        "tokenizers": ["tokenizers>=0.13"],
        "gguf": ["gguf>=0.19"],
        "report": ["matplotlib>=3.5"],
        "moe": ["torch>=2.1", "transformers>=4.48", "tokenizers>=0.13"],
    },
    entry_points={"console_scripts": ["llm-merge=llm_merge.cli.merge:main_entry", "llm-merge-lora=llm_merge.cli.lora:main_entry",
                                      "llm-merge-extract-lora=llm_merge.cli.extract_lora:main_entry",
                                      "llm-merge-moe=llm_merge.cli.moe:main_entry"]},
)
