"""The receiving loop, shared by the vLLM worker extension and bench/weight_sync.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from weight_sync.base import Pending, SyncGroup
from weight_sync.buckets import Bucket, tensor_checksums, torch_dtype, unpack


def receive_buckets(group: SyncGroup, buckets: list[Bucket], sums: list[int] | None = None,
                    tamper: Callable[[Bucket, torch.Tensor], None] | None = None,
                    pool: dict[int, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every bucket broadcast from rank 0, in order.

    The next bucket's receive is posted before the current bucket's tensors are handed out, so
    loading one overlaps with receiving the next. With `sums`, a checksum per tensor is appended.
    With `pool`, bucket i lands in pool[i], allocated on first use and reused by later syncs: the
    yielded tensors are views into it, valid until the next sync (vLLM's layerwise reload holds
    them until a whole layer has arrived, so a buffer is never reused within one sync).
    """

    def post(i: int) -> tuple[torch.Tensor, Pending]:
        b = buckets[i]
        if pool is not None and i in pool:
            flat = pool[i]
        else:
            flat = torch.empty(b.numel, dtype=torch_dtype(b.dtype), device=group.device)
            if pool is not None:
                pool[i] = flat
        return flat, group.broadcast(flat, src=0)

    nxt = post(0) if buckets else None
    for i, bucket in enumerate(buckets):
        flat, pending = nxt
        pending.wait()
        nxt = post(i + 1) if i + 1 < len(buckets) else None
        if tamper is not None:
            tamper(bucket, flat)
        if sums is not None:
            sums.extend(tensor_checksums(bucket, flat))
        yield from unpack(bucket, flat)
