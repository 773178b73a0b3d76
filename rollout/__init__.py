"""Rollouts: the vLLM generator actor."""
