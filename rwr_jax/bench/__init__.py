"""Benchmarks of rwr_jax against reference implementations (protocol: shared BENCHMARKS.md)."""
