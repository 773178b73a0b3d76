"""The critic (value model) for PPO: one DeepSpeed Ray actor per rank, plus `CriticGroup`, the driver's handle.

The model is an HF token-classification head with one output on a causal LM backbone, initialised
from `critic.path` (a reward model, say) or, by default, from the policy's weights with a fresh head.
Column t of its [B, T-1] values is V of the state after input_ids[:, :t+1], the state in which the
policy chose token t+1, so values line up with the log-prob columns of rlhf.types.TrainBatch.
"""

from __future__ import annotations

import math

import ray
import torch

from actors.deepspeed_rank import DeepSpeedRank, shard_minibatches, sharded_forward
from rlhf.algorithms import aggregate, value_loss
from rlhf.config import RunConfig
from rlhf.types import TrainBatch


@ray.remote
class CriticTrainer(DeepSpeedRank):
    def setup(self, master_addr: str, master_port: int) -> None:
        from transformers import AutoConfig, AutoModelForTokenClassification

        cfg = self.cfg
        path = cfg.critic.path or cfg.model.path
        config = AutoConfig.from_pretrained(path, num_labels=1, trust_remote_code=cfg.model.trust_remote_code)
        config.classifier_dropout = 0.0  # values must be deterministic, or value clipping acts on noise
        self._start_engine(master_addr, master_port, lambda: AutoModelForTokenClassification.from_pretrained(
            path, config=config, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code), cfg.critic.lr)

    def _values(self, mb: TrainBatch) -> torch.Tensor:
        out = self.engine(input_ids=mb.input_ids.to(self.device), attention_mask=mb.attention_mask.to(self.device))
        return out.logits[:, :-1, 0].float()

    def compute_values(self, batch: TrainBatch) -> torch.Tensor:
        """This rank's share of the values [b, t-1], 0 off the loss mask; all ranks call it together."""
        self.engine.eval()
        width = batch.loss_mask.shape[1]
        parts = []
        with torch.no_grad():
            for mb in batch.chunks(max(1, math.ceil(batch.size / self.cfg.train.micro_batch_size))):
                v = self._values(mb).cpu() * mb.loss_mask
                parts.append(torch.nn.functional.pad(v, (0, width - v.shape[1])))
        return torch.cat(parts)

    def train(self, minibatches: list[TrainBatch]) -> dict[str, float]:
        clip = self.cfg.critic.value_clip or None
        self.engine.train()
        s = {"loss/value": 0.0, "clipped": 0.0, "tokens": 0.0, "optimizer_steps": 0.0}
        for shard in minibatches:
            for mb in shard.chunks(self.cfg.grad_accum_steps):
                mask = mb.loss_mask.to(self.device)
                v = self._values(mb)
                old, returns = mb.values.to(self.device), mb.returns.to(self.device)
                loss = aggregate(value_loss(v, old, returns, clip), mask, "token-mean", shard.loss_denominator)
                self._backward_step(loss)
                s["loss/value"] += loss.item()
                s["tokens"] += mask.sum().item()
                if clip is not None:
                    s["clipped"] += (((v - old).abs() > clip) * mask).sum().item()
            s["optimizer_steps"] += 1
        return s


class CriticGroup:
    def __init__(self, ranks: list, cfg: RunConfig):
        self.ranks = ranks
        self.cfg = cfg

    def compute_values(self, batch: TrainBatch) -> torch.Tensor:
        return sharded_forward(self.ranks, batch, lambda rank, shard: rank.compute_values.remote(shard))

    def train(self, batch: TrainBatch, step: int) -> dict[str, float]:
        per_rank = shard_minibatches(batch, self.cfg, step, len(self.ranks), "token-mean")
        stats = ray.get([r.train.remote(shards) for r, shards in zip(self.ranks, per_rank)])
        steps = stats[0]["optimizer_steps"]
        return {"loss/value": sum(s["loss/value"] for s in stats) / steps,
                "critic/clip_frac": sum(s["clipped"] for s in stats) / max(sum(s["tokens"] for s in stats), 1.0)}

