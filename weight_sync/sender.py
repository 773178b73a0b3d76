"""The trainer side of weight sync. Every trainer rank holds a WeightSender; rank 0 also holds the
group and does the sending. Under ZeRO-3 all ranks gather each bucket's parameters together, so the
whole model is never gathered at once."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from weight_sync.buckets import ParamMeta, pack, plan_buckets
from weight_sync.group import SyncGroup, open_group


class WeightSender:
    def __init__(self, module: torch.nn.Module, rank: int, zero_stage: int, send_dtype: str):
        self.module = module
        self.rank = rank
        self.zero_stage = zero_stage
        self.send_dtype = send_dtype
        self.params = dict(module.named_parameters())
        self.group: SyncGroup | None = None
        self.buckets: list = []

    def meta(self) -> list[tuple[str, str, list[int]]]:
        # ZeRO-3 partitions parameters in place; ds_shape is the full shape.
        return [(n, self.send_dtype, list(getattr(p, "ds_shape", p.shape))) for n, p in self.params.items()]

    def connect(self, backend: str, host: str, port: int, world_size: int, timeout_s: float,
                bucket_bytes: int) -> None:
        self.buckets = plan_buckets([ParamMeta(n, d, tuple(s)) for n, d, s in self.meta()], bucket_bytes)
        if self.rank == 0:
            self.group = open_group(backend, host, port, 0, world_size, timeout_s)

    def send(self) -> int:
        """Broadcast every bucket; returns the bytes sent (0 on ranks other than 0)."""
        sent = 0
        for bucket in self.buckets:
            params = [self.params[m.name] for m in bucket.params]
            with self._gathered(params):
                if self.group is not None:
                    flat = pack(bucket, [p.data for p in params]).to(self.group.device)
                    self.group.broadcast(flat, src=0)
                    sent += flat.numel() * flat.element_size()
        return sent

    def _gathered(self, params: list[torch.nn.Parameter]) -> Any:
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
