"""Dense text encoders for retrieval (BERT / XLM-RoBERTa families, e.g. MiniLM, BGE-M3)."""
