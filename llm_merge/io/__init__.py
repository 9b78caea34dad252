"""Checkpoint discovery, safetensors headers, positioned reads and atomic writes."""
