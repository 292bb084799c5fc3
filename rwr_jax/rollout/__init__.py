"""Rollouts: sampling, the decode loop, and retrieval-interleaved generation."""
