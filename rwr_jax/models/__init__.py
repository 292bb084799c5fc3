"""Model ports (Flax Linen): the Qwen2.5-VL policy and, later, the retrieval encoders."""
