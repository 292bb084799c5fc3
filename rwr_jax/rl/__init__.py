"""Reinforcement learning: rewards, group advantages and GRPO losses."""
