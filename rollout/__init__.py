"""Rollouts: the vLLM generator actor, and the building blocks of multi-turn rollouts: environments (env),
tools (tools), the sandboxed python tool (sandbox) and token-level trajectories (multiturn)."""
