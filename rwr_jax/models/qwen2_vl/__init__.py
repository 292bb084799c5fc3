"""Qwen2.5-VL: the language model (decoder), and later the vision tower."""
