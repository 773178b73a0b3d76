"""The frozen reference policy: its log-probs anchor the KL term. Created only when kl_coef > 0."""

from __future__ import annotations

import ray
import torch

from actors.common import batch_logprobs
from rlhf.config import RunConfig
from rlhf.devices import torch_device
from rlhf.types import TrainBatch


@ray.remote
class Reference:
    def __init__(self, cfg: RunConfig, device: str):
        from transformers import AutoModelForCausalLM

        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.device = torch_device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.model.path, dtype=getattr(torch, cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code
        ).to(self.device).eval()
        self.model.requires_grad_(False)

    def reset(self, cfg: RunConfig) -> None:
        """Serve another run of the same shape (rlhf.topology.TopologyPool): the frozen weights stay (the
        shape fixes model.path), the run's settings (temperature, micro-batches) are `cfg`'s."""
        self.cfg = cfg

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return batch_logprobs(self.model, batch, self.cfg.rollout.temperature, self.cfg.train.micro_batch_size,
                              self.device, self.cfg.train.share_prompt_forward)
