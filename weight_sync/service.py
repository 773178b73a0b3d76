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
    host: str  # where the link's sending trainer rank hosts the group's TCPStore
    port: int
    backend: str  # "gloo", "nccl" or "ipc"


@dataclass(frozen=True)
class SyncLink:
    """One sync group: a sending trainer rank (the group's rank 0) and the generators whose workers
    are its ranks 1.. (generator k's workers from offsets[k] on)."""

    sender: int  # trainer rank
    generators: tuple[int, ...]
    offsets: tuple[int, ...]
    world_size: int


def sync_links(backend: str, trainer_ranks: int, workers: list[int]) -> list[SyncLink]:
    """Who sends to whom. Over a network (gloo, NCCL) trainer rank 0 sends to every worker of every
    generator in one group. Over ipc a receiver can only map memory on its own device, and generator i
    shares trainer rank i's device (resources.colocate), so each generator gets a group of its own with
    trainer rank i as the sender (ZeRO 0-2 keep the full weights on every rank; ZeRO-3 ranks gather them
    together in every push). Every sender packs the same buckets, so each checksum list is comparable."""
    if backend != "ipc":
        offsets = tuple(1 + sum(workers[:i]) for i in range(len(workers)))
        return [SyncLink(0, tuple(range(len(workers))), offsets, 1 + sum(workers))]
    if len(workers) > trainer_ranks:
        raise WeightSyncError(f"ipc weight sync: {len(workers)} generators but {trainer_ranks} trainer ranks; "
                              f"generator i must share trainer rank i's device (resources.colocate)")
    return [SyncLink(i, (i,), (1,), 1 + n) for i, n in enumerate(workers)]


class WeightSyncService:
    """Trainer rank 0 sends (over ipc, the rank on each generator's device: sync_links); every vLLM
    worker of every generator receives.

    All trainer ranks take part in a push (ZeRO-3 gathers parameters collectively); only the
    senders are in a sync group. Every wait is bounded by `timeout_s`: a generator that died or hangs
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
        self.links: list[SyncLink] = []  # who sends to whom (sync_links)

    def connect(self) -> None:
        bucket_bytes = int(self.cfg.bucket_mb * 2**20)
        params = self._wait({self.trainer_ranks[0].weight_meta.remote(): "trainer-rank-0"}, "connect")["trainer-rank-0"]
        self.names = [name for name, _, _ in params]
        workers = self._wait({g.num_workers.remote(): f"generator-{i}" for i, g in enumerate(self.generators)},
                             "connect")
        self.links = sync_links(self.backend, len(self.trainer_ranks),
                                [workers[f"generator-{i}"] for i in range(len(self.generators))])
        found = self._wait({self.trainer_ranks[link.sender].sync_endpoint.remote(): f"trainer-rank-{link.sender}"
                            for link in self.links}, "connect")
        endpoints = {link.sender: SyncEndpoint(*found[f"trainer-rank-{link.sender}"], self.backend)
                     for link in self.links}
        refs = {}
        for i, r in enumerate(self.trainer_ranks):  # a rank that sends to no one still gathers under ZeRO-3
            world = next((link.world_size for link in self.links if link.sender == i), 0)
            refs[r.init_weight_sync.remote(self.backend, endpoints.get(i), world, bucket_bytes)] = f"trainer-rank-{i}"
        for link in self.links:
            for g, off in zip(link.generators, link.offsets):
                refs[self.generators[g].init_weight_sync.remote(endpoints[link.sender], link.world_size, off, params,
                                                                bucket_bytes)] = f"generator-{g}"
        self._wait(refs, "connect")

    def push(self, version: int) -> dict[str, float]:
        """Send the trainer's current weights to every generator as `version`."""
        t0 = time.perf_counter()
        verify = self.cfg.verify
        refs = {g.receive_weights.remote(version, verify): f"generator-{i}" for i, g in enumerate(self.generators)}
        refs.update({r.send_weights.remote(version, verify): f"trainer-rank-{i}"
                     for i, r in enumerate(self.trainer_ranks)})
        results = self._wait(refs, f"push of version {version}")
        sent_bytes = 0
        for link in self.links:
            sent, sent_sums = results[f"trainer-rank-{link.sender}"]
            sent_bytes += sent
            for i in link.generators:
                for worker, (served, sums) in enumerate(results[f"generator-{i}"]):
                    if served != version:
                        raise WeightSyncError(f"generator-{i} worker {worker} serves version {served} "
                                              f"after a push of version {version}")
                    if verify:
                        self._compare(sent_sums, sums, f"generator-{i} worker {worker}", version,
                                      f"trainer-rank-{link.sender}")
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

    def _compare(self, sent: list[int], received: list[int], who: str, version: int, sender: str) -> None:
        bad = [name for name, a, b in zip(self.names, sent, received) if a != b]
        if bad or len(sent) != len(received):
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise WeightSyncError(f"push of version {version}: {who} received tensors that differ from what "
                                  f"{sender} sent (checksum mismatch): {shown or 'tensor count differs'}")

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
