"""The interface the driver uses: connect trainer and generators, push a policy version, close."""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from rlhf.config import WeightSyncConfig


@dataclass(frozen=True)
class SyncEndpoint:
    host: str  # where trainer rank 0 hosts the group's TCPStore
    port: int
    backend: str  # "gloo" or "nccl"


class WeightSyncService:
    """Trainer rank 0 sends; every vLLM worker of every generator receives.

    All trainer ranks take part in a push (ZeRO-3 gathers parameters collectively); only rank 0
    is in the sync group. Every call is bounded by `timeout_s`.
    """

    def __init__(self, trainer_ranks: list, generators: list, cfg: WeightSyncConfig, backend: str):
        self.trainer_ranks = trainer_ranks
        self.generators = generators
        self.cfg = cfg
        self.backend = backend
        self.version = 0

    def connect(self) -> None:
        timeout = self.cfg.timeout_s
        bucket_bytes = int(self.cfg.bucket_mb * 2**20)
        host, port = ray.get(self.trainer_ranks[0].sync_endpoint.remote(), timeout=timeout)
        endpoint = SyncEndpoint(host, port, self.backend)
        params = ray.get(self.trainer_ranks[0].weight_meta.remote(), timeout=timeout)
        workers = ray.get([g.num_workers.remote() for g in self.generators], timeout=timeout)
        world = 1 + sum(workers)
        offsets = [1 + sum(workers[:i]) for i in range(len(workers))]
        refs = [r.init_weight_sync.remote(endpoint, world, bucket_bytes) for r in self.trainer_ranks]
        refs += [g.init_weight_sync.remote(endpoint, world, off, params, bucket_bytes)
                 for g, off in zip(self.generators, offsets)]
        ray.get(refs, timeout=timeout)

    def push(self, version: int) -> dict[str, float]:
        """Send the trainer's current weights to every generator as `version`."""
        t0 = time.perf_counter()
        refs = [r.send_weights.remote(version) for r in self.trainer_ranks]
        gen_refs = [g.receive_weights.remote(version) for g in self.generators]
        sent_bytes = ray.get(refs, timeout=self.cfg.timeout_s)[0]
        served = ray.get(gen_refs, timeout=self.cfg.timeout_s)
        for i, v in enumerate(served):
            if v != version:
                raise RuntimeError(f"generator-{i} serves version {v} after a push of version {version}")
        self.version = version
        seconds = time.perf_counter() - t0
        return {"sync/seconds": seconds, "sync/gb": sent_bytes / 1e9, "sync/gb_per_s": sent_bytes / 1e9 / seconds}

    def close(self) -> None:
        ray.get([g.close_weight_sync.remote() for g in self.generators] +
                [r.close_weight_sync.remote() for r in self.trainer_ranks], timeout=self.cfg.timeout_s)
