"""Data: records, pipelines, image processing, tokenizer and chat template."""
