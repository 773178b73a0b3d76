"""The torch device of a role's actor, from the run's device name ("cpu" or "cuda", rlhf.topology.resolve_device).

Here, below both, so that the model-hosting actors (`actors/`) and the reward model (`reward/model.py`)
share it without one package importing the other.
"""

from __future__ import annotations

import torch


def torch_device(device: str) -> torch.device:
    """The actor's own GPU (the one Ray assigned it) for "cuda", else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
