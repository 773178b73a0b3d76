"""The trainer side of weight sync. Every trainer rank holds a WeightSender; the sending ranks (rank 0,
or over ipc each rank that shares a device with a generator) also hold a group and send. Under ZeRO-3
all ranks gather each bucket's parameters together, so the whole model is never gathered at once."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from weight_sync.base import Pending, SyncGroup
from weight_sync.buckets import ParamMeta, pack, plan_buckets, tensor_checksums, torch_dtype
from weight_sync.group import alone_bytes, open_group


class WeightSender:
    def __init__(self, params: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]], rank: int,
                 zero_stage: int, send_dtype: str):
        # name -> parameter (HF checkpoint names), or a function computing them at each send (LoRA's merged
        # weights); the names and shapes must not change between sends
        self._params = params
        self.rank = rank
        self.zero_stage = zero_stage
        self.send_dtype = send_dtype
        self.group: SyncGroup | None = None
        self.buckets: list = []
        self._buffers: list[torch.Tensor] = []  # two, reused: bucket k+1 packs while bucket k is sent

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self._params() if callable(self._params) else self._params

    def rebind(self, params: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]]) -> None:
        """Send these parameters from now on (a rebuilt engine's, PolicyTrainer.reset), over the same group
        and buckets: their names and shapes must be the ones connected with."""
        if [m[:2] + (tuple(m[2]),) for m in self.meta()] != [
                (n, self.send_dtype, tuple(getattr(p, "ds_shape", p.shape)))
                for n, p in (params() if callable(params) else params).items()]:
            raise ValueError("the rebound parameters' names or shapes differ from those the sync group connected with")
        self._params = params

    def meta(self) -> list[tuple[str, str, list[int]]]:
        # ZeRO-3 partitions parameters in place; ds_shape is the full shape.
        return [(n, self.send_dtype, list(getattr(p, "ds_shape", p.shape))) for n, p in self.params.items()]

    def connect(self, backend: str, endpoint: tuple[str, int] | None, world_size: int, timeout_s: float,
                bucket_bytes: int) -> None:
        """Join the sync group at `endpoint` as its sender (rank 0), or with None send nothing (but still
        gather the same buckets in the same order: ZeRO-3's gathers are collective over the trainer ranks)."""
        group = open_group(backend, *endpoint, 0, world_size, timeout_s) if endpoint is not None else None
        self.attach(group, bucket_bytes, alone_bytes(backend, bucket_bytes))

    def attach(self, group: SyncGroup | None, bucket_bytes: int, alone: int | None) -> None:
        """Use `group` (rank 0; None on other ranks) with buckets of at most bucket_bytes, parameters of
        at least `alone` bytes in buckets of their own (plan_buckets)."""
        self.group = group
        self.buckets = plan_buckets([ParamMeta(n, d, tuple(s)) for n, d, s in self.meta()], bucket_bytes, alone)
        if group is not None and self.buckets:
            # Fresh CPU buffers cost a page fault per 4 kB (more than the transfer itself on gloo), so
            # two buffers of the largest bucket are allocated once and alternate.
            largest = max(b.numel * ParamMeta("", b.dtype, (1,)).nbytes for b in self.buckets)
            self._buffers = [torch.empty(largest, dtype=torch.uint8, device=group.device) for _ in range(2)]

    def send(self, verify: bool) -> tuple[int, list[int] | None]:
        """Broadcast every bucket; returns the bytes sent and, if `verify`, a checksum per tensor
        (both only on a sending rank). Bucket k+1 is gathered and packed while bucket k is on the wire."""
        sent, sums = 0, [] if verify else None
        in_flight: Pending | None = None
        current = self.params  # computed once per send when it is a function
        for k, bucket in enumerate(self.buckets):
            params = [current[m.name] for m in bucket.params]
            with self._gathered(params):  # pack copies, so the gathered parameters can be released after
                if self.group is None:
                    continue
                flat = self._zero_copy(bucket, params)
                if flat is None:
                    out = self._buffers[k % 2].view(torch_dtype(bucket.dtype))  # free: bucket k-2 was waited for
                    flat = pack(bucket, [p.data for p in params], out=out)
            if sums is not None:
                sums += tensor_checksums(bucket, flat)
            pending = self.group.broadcast(flat, src=0)
            if in_flight is not None:
                in_flight.wait()
            in_flight = pending
            sent += flat.numel() * flat.element_size()
        if in_flight is not None:
            in_flight.wait()
        return sent, sums

    def _zero_copy(self, bucket, params: list[torch.nn.Parameter]) -> torch.Tensor | None:
        """A bucket of one tensor already laid out as it travels (an embedding larger than a bucket,
        say) is sent as it is: no copy. Not under ZeRO-3, whose gathered tensor is freed on leaving
        the gather while the broadcast may still be reading it."""
        if len(params) != 1 or self.zero_stage == 3 or not self.group.zero_copy_ok:
            return None
        t = params[0].data
        ok = t.is_contiguous() and t.dtype == torch_dtype(bucket.dtype) and t.device == self.group.device
        return t.view(-1) if ok else None

    def _gathered(self, params: list[torch.nn.Parameter]) -> Any:
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
