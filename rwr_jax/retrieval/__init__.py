"""Dense retrieval: document store, embedding index (exact or ScaNN) and batched retriever."""
