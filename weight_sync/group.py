"""The dedicated trainer -> generators process group, one class per backend, same interface.

Rank 0 is the sending trainer rank (weight_sync.service.sync_links); ranks 1.. are the generators'
vLLM workers. The group is
built with no global torch.distributed state, so it lives beside DeepSpeed's group in the trainer
and vLLM's own group in the workers.
"""

from __future__ import annotations

import datetime
import random
import socket

import torch

from weight_sync.base import EventPending, Pending, SyncGroup
from weight_sync.ipc import IpcGroup

__all__ = ["GlooGroup", "IpcGroup", "NcclGroup", "Pending", "SyncGroup", "alone_bytes", "free_port", "open_group"]


class GlooGroup(SyncGroup):
    """CPU: a gloo ProcessGroup over a TCPStore rendezvous."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float):
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._pg = stateless_init_torch_distributed_process_group(
            host, port, rank, world_size, backend="gloo", timeout=self.timeout)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Pending:
        # ProcessGroup.broadcast takes group ranks (torch.distributed.broadcast would need global ones);
        # gloo runs it on its own thread, so it overlaps with whatever the caller does next.
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = src
        return _GlooPending(self._pg.broadcast([tensor], opts), self.timeout)

    def close(self) -> None:
        from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

        stateless_destroy_torch_distributed_process_group(self._pg)


class NcclGroup(SyncGroup):
    """GPU: vLLM's PyNcclCommunicator over a StatelessProcessGroup (the TCPStore carries the NCCL id).

    PyNccl calls only enqueue: a broadcast returns before a byte has moved, and one whose peer is dead
    spins on the GPU forever. So every broadcast is followed by an event the host polls (EventPending)
    with the group's timeout; on timeout the communicator is aborted (ncclCommAbort, which releases the
    stuck kernel) and the group is unusable: the service reconnects, building a new one. close()
    destroys the communicator too, so a reconnect does not leak one per generator restart."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        device = torch.device("cuda", torch.cuda.current_device())
        pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                          store_timeout=int(timeout_s))
        comm = PyNcclCommunicator(pg, device=device)
        if comm.disabled:  # no NCCL library, or VLLM_DISABLE_PYNCCL: broadcasts would silently do nothing
            raise RuntimeError("weight sync (nccl): vLLM's PyNccl is disabled in this process (no NCCL library "
                               "found, or VLLM_DISABLE_PYNCCL=1)")
        self._attach(comm, device, rank, world_size, timeout_s)
        self._pg = pg  # its TCPStore lives as long as the group
        self._stream = torch.cuda.Stream(device=device)

    def _attach(self, comm, device: torch.device, rank: int, world_size: int, timeout_s: float) -> None:
        self._comm, self.device, self.rank, self.world_size, self.timeout_s = comm, device, rank, world_size, timeout_s
        self._seq = 0

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Pending:
        if self._comm is None:
            raise RuntimeError("weight sync (nccl): the group is closed (or was aborted after a timeout); "
                               "a new one must be connected")
        self._seq += 1
        event = self._enqueue(tensor, src)
        what = (f"NCCL broadcast {self._seq} ({tensor.numel() * tensor.element_size()} bytes) at rank {self.rank} "
                f"of {self.world_size}")
        return EventPending(event, self.timeout_s, what, self._abort)

    def _enqueue(self, tensor: torch.Tensor, src: int):
        """Queue the broadcast on a side stream (packing the next bucket on the current stream overlaps
        with it); returns an event recorded after it."""
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        self._comm.broadcast(tensor, src=src, stream=stream)
        tensor.record_stream(stream)
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _abort(self) -> None:
        comm, self._comm = self._comm, None
        if comm is not None:
            comm.destroy()  # vLLM's destroy is ncclCommAbort (on a thread, joined for up to 5 s)

    def close(self) -> None:
        self._abort()
        self._pg = None


class _GlooPending(Pending):
    def __init__(self, work, timeout: datetime.timedelta):
        self._work, self._timeout = work, timeout

    def wait(self) -> None:
        self._work.wait(self._timeout)


def group_class(backend: str) -> type[SyncGroup]:
    if backend == "gloo":
        return GlooGroup
    if backend == "nccl":
        return NcclGroup
    if backend == "ipc":
        return IpcGroup
    raise ValueError(f"unknown weight-sync backend {backend!r}; choose gloo, nccl or ipc")


def open_group(backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> SyncGroup:
    return group_class(backend)(host, port, rank, world_size, timeout_s)


def alone_bytes(backend: str, bucket_bytes: int) -> int | None:
    """The size from which a parameter travels in a bucket of its own (plan_buckets), the same on the
    sender and every receiver. A group that may send a parameter's own storage (zero_copy_ok: gloo,
    NCCL) sends such a bucket without packing it: packing 8 MB costs more than one more message (gloo
    over loopback: ~0.5 ms a message; at 494M parameters bucketed / raw bandwidth went from ~0.74 to
    ~0.82). One that copies every bucket anyway (ipc, which also pays a store round trip per bucket)
    packs everything."""
    return bucket_bytes // 8 if group_class(backend).zero_copy_ok else None


# Listening ports are chosen here and bound later by another process (a TCPStore, gloo), so another
# socket may take them in between. The kernel hands out ephemeral ports (ip_local_port_range, 32768
# and up by default) to every outgoing connection, and Ray's many gRPC clients make those constantly;
# Ray's workers listen on 10002-19999. A port from the range between is taken only by an explicit bind.
PORT_RANGE = (20000, 32768)
_rng = random.SystemRandom()  # not the seeded global one: same-seed processes must not pick alike


def free_port(host: str, tries: int = 50) -> int:
    """A port on `host` that is free now, outside Ray's worker ports and the kernel's ephemeral range
    (any free port if that range is full or overlaps the ephemeral one)."""
    low, high = PORT_RANGE[0], min(PORT_RANGE[1], ephemeral_ports()[0])
    for port in _rng.sample(range(low, high), min(tries, max(high - low, 0))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
