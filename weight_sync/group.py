"""The dedicated trainer -> generators process group, one class per backend, same interface.

Rank 0 is trainer rank 0 (the sender); ranks 1.. are the generators' vLLM workers. The group is
built with no global torch.distributed state, so it lives beside DeepSpeed's group in the trainer
and vLLM's own group in the workers.
"""

from __future__ import annotations

import datetime
import random
import socket

import torch


class Pending:
    """An in-flight broadcast; wait() returns when the tensor is sent (or received) and raises on timeout."""

    def wait(self) -> None:
        raise NotImplementedError


class SyncGroup:
    rank: int
    world_size: int
    device: torch.device
    zero_copy_ok = True  # may the sender hand a parameter's own storage to broadcast()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Pending:
        """Start broadcasting `tensor` from `src`; the caller may pack or load other data meanwhile."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


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
    """GPU: vLLM's PyNcclCommunicator over a StatelessProcessGroup (the TCPStore carries the NCCL id)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device())
        pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                          store_timeout=int(timeout_s))
        self._comm = PyNcclCommunicator(pg, device=self.device)
        self._stream = torch.cuda.Stream(device=self.device)
        # PyNccl calls have no timeout of their own; the driver's deadline on every sync RPC bounds them.

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Pending:
        # Queued on a side stream, so packing the next bucket on the current stream overlaps with it.
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        self._comm.broadcast(tensor, src=src, stream=stream)
        tensor.record_stream(stream)
        event = torch.cuda.Event()
        event.record(stream)
        return _CudaPending(event)

    def close(self) -> None:
        self._comm = None


class _GlooPending(Pending):
    def __init__(self, work, timeout: datetime.timedelta):
        self._work, self._timeout = work, timeout

    def wait(self) -> None:
        self._work.wait(self._timeout)


class _CudaPending(Pending):
    def __init__(self, event):
        self._event = event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self._event)


def group_class(backend: str) -> type[SyncGroup]:
    if backend == "gloo":
        return GlooGroup
    if backend == "nccl":
        return NcclGroup
    if backend == "ipc":
        from weight_sync.ipc import IpcGroup

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
