"""Evaluation: benchmark accuracy with retrieval rounds, and CDIR."""
