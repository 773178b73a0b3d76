"""Weight sync between processes on the same device, without a network: the sender's bucket is
shared by handle, each receiver maps it and copies it out.

    CUDA: a CUDA IPC handle of the bucket (torch.multiprocessing's reduce_tensor), opened in the
          receiver on the GPU with the same UUID: trainer and generator colocated on one GPU.
    CPU:  a POSIX shared-memory segment (torch's "file_system" sharing strategy): trainer and
          generator on one machine.

It implements `SyncGroup` (weight_sync/base.py), so the sender and the receivers are the same code
as for gloo and NCCL. The rendezvous is a TCPStore: the sender publishes under the key of broadcast k
where the bucket lies (which shared buffer, at what byte offset, how many bytes), every receiver
copies it into its own tensor and adds 1 to a counter, and the sender's `wait()` returns when all
have (so the buffer may be reused). Every store wait is bounded by the group's timeout.

Each buffer is shared once and mapped once per receiver, for the group's lifetime: the sender
alternates between two buffers, and torch keeps a record (a CUDA IPC reference count, an event) per
share and per mapping, so sharing every bucket anew would grow those with every push.
"""

from __future__ import annotations

import datetime
import pickle
import time
from multiprocessing.reduction import ForkingPickler

import torch

from weight_sync.base import Pending, SyncGroup


class IpcGroup(SyncGroup):
    zero_copy_ok = False  # sharing a parameter's own storage would move it (on CPU, into shared memory)

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        if self.device.type == "cpu":
            torch.multiprocessing.set_sharing_strategy("file_system")  # handles by name, not by fd passing
        self._store = torch.distributed.TCPStore(host, port, world_size, is_master=rank == 0,
                                                 timeout=datetime.timedelta(seconds=timeout_s))
        self._seq = 0
        # sender: storage -> (buffer id, pickled handle, the whole buffer, kept alive while shared)
        self._shared: dict[int, tuple[int, bytes, torch.Tensor]] = {}
        self._mapped: dict[int, torch.Tensor] = {}  # receiver: buffer id -> the sender's buffer, mapped
        self._store.add("ipc/joined", 1)
        self._wait_for("ipc/joined", world_size, "every member to join")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Pending:
        if src != 0:
            raise ValueError("the IPC group only sends from its rank 0 (the trainer rank on this device)")
        if self._store is None:
            raise RuntimeError("weight sync (ipc): the group is closed")
        key, self._seq = f"ipc/{self._seq}", self._seq + 1
        if self.rank == 0:
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()  # the bucket is packed before anyone maps it
            self._store.set(key, pickle.dumps(self._locate(tensor)))
            return _SenderPending(self, key, tensor)
        return _ReceiverPending(self, key, tensor)

    def _locate(self, tensor: torch.Tensor) -> dict:
        """Where `tensor` lies: its buffer (shared on first use) and its byte range in it."""
        storage = tensor.untyped_storage()
        if storage._cdata not in self._shared:
            whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            handle = bytes(ForkingPickler.dumps(share(whole)))  # on CPU this moves it into shared memory once
            self._shared[tensor.untyped_storage()._cdata] = (len(self._shared), handle, whole)
        buffer, handle, _ = self._shared[tensor.untyped_storage()._cdata]
        size = tensor.element_size()
        return {"buffer": buffer, "handle": handle, "offset": tensor.storage_offset() * size,
                "nbytes": tensor.numel() * size}

    def _open(self, where: dict) -> torch.Tensor:
        """The bytes of a located tensor, in this process (the buffer mapped on first use)."""
        if where["buffer"] not in self._mapped:
            self._mapped[where["buffer"]] = open_shared(pickle.loads(where["handle"]), self.device)
        return self._mapped[where["buffer"]][where["offset"]: where["offset"] + where["nbytes"]]

    def _wait_for(self, counter: str, value: int, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self._store.add(counter, 0) < value:
            if time.monotonic() > deadline:
                raise TimeoutError(f"weight sync (ipc): waited {self.timeout_s:g} s for {what}")
            time.sleep(0.0005)

    def close(self) -> None:
        self._mapped.clear()
        self._shared.clear()
        self._store = None


class _SenderPending(Pending):
    def __init__(self, group: IpcGroup, key: str, tensor: torch.Tensor):
        self.group, self.key, self.tensor = group, key, tensor  # keeps the bucket alive until all copied it

    def wait(self) -> None:
        self.group._wait_for(f"{self.key}/done", self.group.world_size - 1, f"the receivers to copy {self.key}")
        self.group._store.delete_key(self.key)


class _ReceiverPending(Pending):
    def __init__(self, group: IpcGroup, key: str, tensor: torch.Tensor):
        self.group, self.key, self.tensor = group, key, tensor

    def wait(self) -> None:
        where = pickle.loads(self.group._store.get(self.key))  # blocks up to the store's timeout
        source = self.group._open(where)
        self.tensor.copy_(source.view(self.tensor.dtype).view(-1)[: self.tensor.numel()].view_as(self.tensor))
        if self.tensor.is_cuda:
            torch.cuda.current_stream().synchronize()  # copied before the sender may reuse its buffer
        self.group._store.add(f"{self.key}/done", 1)


def share(tensor: torch.Tensor) -> dict:
    """A picklable handle to `tensor`'s memory for another process on the same device."""
    from torch.multiprocessing.reductions import reduce_tensor

    rebuild, args = reduce_tensor(tensor)
    handle = {"rebuild": rebuild, "args": args}
    if tensor.is_cuda:
        handle["uuid"] = str(torch.cuda.get_device_properties(tensor.device).uuid)
    return handle


def open_shared(handle: dict, device: torch.device) -> torch.Tensor:
    """The tensor behind a `share` handle, mapped (not copied) into this process."""
    args = list(handle["args"])
    if "uuid" in handle:  # CUDA: the sender's device index is in its own CUDA_VISIBLE_DEVICES numbering
        args[6] = local_device_index(handle["uuid"])
    return handle["rebuild"](*args)


def local_device_index(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise RuntimeError(f"weight sync (ipc): the trainer's GPU {uuid} is not visible to this process; "
                       f"the ipc backend needs trainer and generator on the same GPU (resources.colocate)")
