"""The interface the driver uses: connect trainer and generators, push a policy version, close."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from rlhf.config import WeightSyncConfig


class WeightSyncError(RuntimeError):
    """A sync failed: an actor died, missed its deadline, or received different bytes than were sent."""


class GeneratorLost(WeightSyncError):
    """Generator `index` died during a sync; replacing it and reconnecting lets the run go on."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class SyncEndpoint:
    host: str  # where trainer rank 0 hosts the group's TCPStore
    port: int
    backend: str  # "gloo" or "nccl"


class WeightSyncService:
    """Trainer rank 0 sends; every vLLM worker of every generator receives.

    All trainer ranks take part in a push (ZeRO-3 gathers parameters collectively); only rank 0
    is in the sync group. Every wait is bounded by `timeout_s`: a generator that died or hangs
    fails the push with its name, never a hang. With `verify`, each receiver's per-tensor
    checksums are compared with the sender's and a mismatch names the tensors.
    """

    def __init__(self, trainer_ranks: list, generators: list, cfg: WeightSyncConfig, backend: str):
        self.trainer_ranks = trainer_ranks
        self.generators = generators
        self.cfg = cfg
        self.backend = backend
        self.version = 0
        self.names: list[str] = []  # tensor names in the order they are sent

    def connect(self) -> None:
        bucket_bytes = int(self.cfg.bucket_mb * 2**20)
        rank0 = {self.trainer_ranks[0].sync_endpoint.remote(): "trainer-rank-0"}
        host, port = self._wait(rank0, "connect")["trainer-rank-0"]
        endpoint = SyncEndpoint(host, port, self.backend)
        params = self._wait({self.trainer_ranks[0].weight_meta.remote(): "trainer-rank-0"}, "connect")["trainer-rank-0"]
        self.names = [name for name, _, _ in params]
        workers = self._wait({g.num_workers.remote(): f"generator-{i}" for i, g in enumerate(self.generators)},
                             "connect")
        sizes = [workers[f"generator-{i}"] for i in range(len(self.generators))]
        world = 1 + sum(sizes)
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        refs = {r.init_weight_sync.remote(endpoint, world, bucket_bytes): f"trainer-rank-{i}"
                for i, r in enumerate(self.trainer_ranks)}
        refs.update({g.init_weight_sync.remote(endpoint, world, off, params, bucket_bytes): f"generator-{i}"
                     for i, (g, off) in enumerate(zip(self.generators, offsets))})
        self._wait(refs, "connect")

    def push(self, version: int) -> dict[str, float]:
        """Send the trainer's current weights to every generator as `version`."""
        t0 = time.perf_counter()
        verify = self.cfg.verify
        refs = {g.receive_weights.remote(version, verify): f"generator-{i}" for i, g in enumerate(self.generators)}
        refs.update({r.send_weights.remote(version, verify): f"trainer-rank-{i}"
                     for i, r in enumerate(self.trainer_ranks)})
        results = self._wait(refs, f"push of version {version}")
        sent_bytes, sent_sums = results["trainer-rank-0"]
        for i in range(len(self.generators)):
            for worker, (served, sums) in enumerate(results[f"generator-{i}"]):
                if served != version:
                    raise WeightSyncError(f"generator-{i} worker {worker} serves version {served} "
                                          f"after a push of version {version}")
                if verify:
                    self._compare(sent_sums, sums, f"generator-{i} worker {worker}", version)
        self.version = version
        seconds = time.perf_counter() - t0
        return {"sync/seconds": seconds, "sync/gb": sent_bytes / 1e9, "sync/gb_per_s": sent_bytes / 1e9 / seconds}

    def close(self) -> None:
        self._wait(self._close_refs(), "close")

    def reconnect(self) -> None:
        """A new group after a generator was replaced: whoever is alive leaves the old one (a member
        still blocked in a broken push gets up to timeout_s to fail out of it), then all join anew."""
        refs = self._close_refs()
        ray.wait(list(refs), num_returns=len(refs), timeout=self.cfg.timeout_s)
        self.connect()

    def _close_refs(self) -> dict[Any, str]:
        refs = {g.close_weight_sync.remote(): f"generator-{i}" for i, g in enumerate(self.generators)}
        refs.update({r.close_weight_sync.remote(): f"trainer-rank-{i}" for i, r in enumerate(self.trainer_ranks)})
        return refs

    def _compare(self, sent: list[int], received: list[int], who: str, version: int) -> None:
        bad = [name for name, a, b in zip(self.names, sent, received) if a != b]
        if bad or len(sent) != len(received):
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise WeightSyncError(f"push of version {version}: {who} received tensors that differ from what "
                                  f"trainer-rank-0 sent (checksum mismatch): {shown or 'tensor count differs'}")

    def _dead_generator(self) -> int | None:
        from ray._private.state import actors  # the GCS's actor table; needs no dashboard

        for i, g in enumerate(self.generators):
            if actors(actor_id=g._actor_id.hex()).get("State") == "DEAD":
                return i
        return None

    def _wait(self, refs: dict[Any, str], what: str) -> dict[str, Any]:
        """ray.get on every ref within timeout_s in all; an actor's failure or lateness names it."""
        deadline = time.monotonic() + self.cfg.timeout_s
        pending, results = dict(refs), {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                late = sorted(pending.values(), key=lambda who: not who.startswith("generator"))
                raise WeightSyncError(f"weight sync {what}: no answer within {self.cfg.timeout_s:g} s from "
                                      f"{', '.join(late)} (dead or hung)")
            ref = done[0]
            who = pending.pop(ref)
            try:
                results[who] = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                message = f"weight sync {what}: {who} died ({type(e).__name__})"
                if who.startswith("generator-"):
                    raise GeneratorLost(message, int(who.removeprefix("generator-"))) from e
                raise WeightSyncError(message) from e
            except ray.exceptions.RayTaskError as e:
                dead = self._dead_generator()  # the trainer's broadcast fails when a receiver dies
                if dead is not None:
                    raise GeneratorLost(f"weight sync {what}: generator-{dead} died; {who} failed: {e}", dead) from e
                raise WeightSyncError(f"weight sync {what}: {who} failed: {e}") from e
        return results
