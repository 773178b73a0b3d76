"""The weight-sync groups' own logic, on CPU and without Ray: NCCL's host-side wait with a deadline
(a fake communicator and event), close and rebuild, the ipc group's one share per buffer, who sends
to whom, and the checksum's independence of how it is chunked."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
import torch

from weight_sync.base import EventPending, wait_until
from weight_sync.buckets import ParamMeta, pack, plan_buckets, tensor_checksums
from weight_sync.group import NcclGroup, free_port
from weight_sync.ipc import IpcGroup
from weight_sync.service import WeightSyncError, sync_links

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_wait_until_returns_when_done_and_times_out_with_the_abort():
    clock, aborted = FakeClock(), []
    answers = iter([False, False, True])
    wait_until(lambda: next(answers), 5.0, "x", clock=clock, sleep=clock.sleep)
    assert clock.now < 0.01
    with pytest.raises(TimeoutError, match=r"waited 2 s for the broadcast of bucket 3"):
        wait_until(lambda: False, 2.0, "the broadcast of bucket 3", lambda: aborted.append(1), clock=clock,
                   sleep=clock.sleep)
    assert aborted == [1]
    assert 2.0 < clock.now < 2.2  # polled until the deadline, at most 20 ms apart


class FakeEvent:
    def __init__(self, done_after: int | None):
        self.queries, self.done_after = 0, done_after

    def query(self) -> bool:
        self.queries += 1
        return self.done_after is not None and self.queries > self.done_after


class FakeComm:
    def __init__(self):
        self.destroyed = 0

    def destroy(self) -> None:
        self.destroyed += 1


class FakeNccl(NcclGroup):
    """NcclGroup without a GPU: _enqueue hands back events that complete after `done_after` queries
    (None: never, as a broadcast whose peer died)."""

    def __init__(self, timeout_s: float, done_after: int | None):
        self.comm = FakeComm()
        self._attach(self.comm, torch.device("cpu"), 0, 2, timeout_s)
        self._pg = object()
        self.done_after, self.events = done_after, []

    def _enqueue(self, tensor, src):
        self.events.append(FakeEvent(self.done_after))
        return self.events[-1]


def test_nccl_wait_blocks_the_host_until_the_broadcast_has_completed():
    group = FakeNccl(timeout_s=5.0, done_after=3)
    group.broadcast(torch.zeros(4)).wait()
    assert group.events[0].queries == 4  # returned only once the event reported completion
    assert group.comm.destroyed == 0


def test_nccl_dead_peer_fails_within_the_timeout_and_aborts_the_communicator():
    group = FakeNccl(timeout_s=0.05, done_after=None)
    pending = group.broadcast(torch.zeros(4))
    with pytest.raises(TimeoutError, match=r"waited 0.05 s for NCCL broadcast 1 \(16 bytes\) at rank 0 of 2"):
        pending.wait()
    assert group.comm.destroyed == 1  # ncclCommAbort: the stuck kernel is released
    with pytest.raises(RuntimeError, match="closed .*aborted after a timeout.*new one must be connected"):
        group.broadcast(torch.zeros(4))
    group.close()  # closing an aborted group destroys nothing twice
    assert group.comm.destroyed == 1


def test_nccl_close_destroys_the_communicator_once_and_a_rebuilt_group_is_independent():
    old = FakeNccl(timeout_s=1.0, done_after=0)
    old.close()
    old.close()
    assert old.comm.destroyed == 1 and old._pg is None
    new = FakeNccl(timeout_s=1.0, done_after=0)  # what reconnect() builds: its own communicator
    new.broadcast(torch.zeros(2)).wait()
    assert new.comm.destroyed == 0 and old.comm is not new.comm


def test_event_pending_names_what_it_waited_for():
    with pytest.raises(TimeoutError, match="bucket 7"):
        EventPending(FakeEvent(None), 0.01, "bucket 7").wait()


def test_gloo_and_nccl_send_from_rank_0_to_every_worker_ipc_from_each_generators_own_rank():
    [link] = sync_links("nccl", 2, [2, 1])
    assert (link.sender, link.generators, link.offsets, link.world_size) == (0, (0, 1), (1, 3), 4)
    links = sync_links("ipc", 3, [1, 1])
    assert [(k.sender, k.generators, k.offsets, k.world_size) for k in links] == [(0, (0,), (1,), 2),
                                                                                 (1, (1,), (1,), 2)]
    with pytest.raises(WeightSyncError, match="3 generators but 2 trainer ranks"):
        sync_links("ipc", 2, [1, 1, 1])


def test_ipc_shares_each_buffer_once_however_many_buckets_it_carries():
    port = free_port("127.0.0.1")
    groups: dict[int, IpcGroup] = {}
    joins = [threading.Thread(target=lambda r=r: groups.__setitem__(r, IpcGroup("127.0.0.1", port, r, 2, 10.0)))
             for r in (0, 1)]
    [t.start() for t in joins]
    [t.join() for t in joins]
    buffers = [torch.empty(64, dtype=torch.uint8) for _ in range(2)]
    received: list[torch.Tensor] = []

    def receive():
        for k in range(6):
            t = torch.empty(3 + k)
            groups[1].broadcast(t).wait()
            received.append(t)

    receiver = threading.Thread(target=receive)
    receiver.start()
    for k in range(6):
        flat = buffers[k % 2][8:].view(torch.float32)[: 3 + k]  # at an offset into the buffer, as a dtype view
        flat.copy_(torch.arange(3 + k) + 10.0 * k)
        groups[0].broadcast(flat).wait()
    receiver.join()
    assert [t.tolist() for t in received] == [[10.0 * k + i for i in range(3 + k)] for k in range(6)]
    assert len(groups[0]._shared) == 2 and len(groups[1]._mapped) == 2  # not one share per bucket
    for g in groups.values():
        g.close()
    with pytest.raises(RuntimeError, match="closed"):
        groups[0].broadcast(buffers[0])


def test_checksums_do_not_depend_on_the_chunk_size():
    params = [ParamMeta("a", "float32", (100, 37)), ParamMeta("c", "float32", (301,))]
    [bucket] = plan_buckets(params, 1 << 30)
    g = torch.Generator().manual_seed(0)
    flat = pack(bucket, [torch.randn(*p.shape, generator=g) * 1e30 for p in params])  # large words: int64 wraps
    whole = tensor_checksums(bucket, flat, chunk=1 << 30)
    assert tensor_checksums(bucket, flat, chunk=7) == tensor_checksums(bucket, flat, chunk=1000) == whole
    flat.view(torch.int32)[5] ^= 1  # one flipped bit
    assert tensor_checksums(bucket, flat, chunk=7)[0] != whole[0]


def test_group_and_ipc_import_their_shared_interface_from_below_not_from_each_other():
    def imported(path: str) -> set[str]:
        tree = ast.parse((REPO / path).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "weight_sync.group" not in imported("weight_sync/ipc.py")
    assert "weight_sync.base" in imported("weight_sync/ipc.py")
    assert "weight_sync.base" in imported("weight_sync/group.py")
    assert not {m for m in imported("weight_sync/base.py") if m.startswith("weight_sync")}
