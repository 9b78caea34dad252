"""Mixture-of-experts from dense fine-tunes (``llm-merge-moe``): mergekit-moe recipes, Mixtral / Qwen2-MoE /
Qwen3-MoE outputs, router weights from random draws, prompt embeddings or the base's hidden states.

``recipe`` reads the YAML, ``options`` holds the command-line options, ``arch`` the output architectures,
``plan`` checks the checkpoints and lays out the output from headers, ``prompts`` / ``gates`` / ``hidden``
compute the router weights, ``write`` streams the tensors into the staged output and publishes it.
"""
