"""Packing parameters into flat buckets. Sender and receivers run `plan_buckets` on the same
metadata, so only the metadata travels by RPC and only flat buffers travel over the group."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass(frozen=True)
class ParamMeta:
    name: str  # the HF checkpoint name, which vLLM's load_weights maps onto its own layout
    dtype: str  # e.g. "float32"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=torch_dtype(self.dtype)).element_size()


@dataclass(frozen=True)
class Bucket:
    dtype: str
    params: tuple[ParamMeta, ...]
    offsets: tuple[int, ...]  # element offset of each param in the flat buffer
    numel: int


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def plan_buckets(params: list[ParamMeta], bucket_bytes: int, alone_bytes: int | None = None) -> list[Bucket]:
    """Consecutive params of one dtype, up to bucket_bytes each; a param larger than a bucket, or of at
    least alone_bytes, gets a bucket alone (see weight_sync.group.alone_bytes)."""
    alone = bucket_bytes if alone_bytes is None else alone_bytes  # a larger param fills a bucket anyway
    groups: list[list[ParamMeta]] = []
    size = 0
    for p in params:
        last = groups[-1] if groups else None
        if (last is None or p.nbytes >= alone or last[0].nbytes >= alone or p.dtype != last[0].dtype
                or size + p.nbytes > bucket_bytes):
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.nbytes
    buckets = []
    for group in groups:
        offsets = list(accumulate((q.numel for q in group), initial=0))  # the last one is the total
        buckets.append(Bucket(group[0].dtype, tuple(group), tuple(offsets[:-1]), offsets[-1]))
    return buckets


def pack(bucket: Bucket, tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """One flat buffer holding the bucket's tensors in order; written into `out` (reused) when given."""
    for meta, t in zip(bucket.params, tensors, strict=True):
        if tuple(t.shape) != meta.shape:
            raise ValueError(f"{meta.name}: shape {tuple(t.shape)} differs from the planned {meta.shape}")
    if out is None:
        return torch.cat([t.detach().reshape(-1).to(torch_dtype(bucket.dtype)) for t in tensors])
    flat = out[: bucket.numel]
    for t, offset in zip(tensors, bucket.offsets):
        flat[offset : offset + t.numel()].copy_(t.detach().reshape(-1))
    return flat


def unpack(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, view) pairs into the flat buffer."""
    return [(m.name, flat[o : o + m.numel].view(m.shape)) for m, o in zip(bucket.params, bucket.offsets)]


CHECKSUM_CHUNK = 1 << 22  # elements per pass: ~100 MB of int64 temporaries at most, wherever it runs
CHECKSUM_PERIOD = 65521  # the position weights are (position + 1) mod this prime
_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def tensor_checksums(bucket: Bucket, flat: torch.Tensor, chunk: int = CHECKSUM_CHUNK) -> list[int]:
    """One exact integer checksum per tensor of a packed bucket.

    The tensor's bytes are read as integers (no float rounding, so sender and receiver agree bit
    for bit) and summed twice: plainly, and weighted by position, so that a flipped bit and two
    swapped elements both change it. Cost: a pass over the bucket, far below the transfer itself.
    Reduced modulo the prime 2**61 - 1 so that it fits the int64 that vLLM's msgpack RPC carries.

    The pass runs `chunk` elements at a time: a whole tensor at once takes 24 bytes of int64
    temporaries per element (the words, the weights, their product), inside the vLLM process on a
    GPU. The int64 sums wrap modulo 2**64 the same way whether taken whole or chunk by chunk, so the
    result does not depend on `chunk`. The position weights repeat with period 65521, so one table of
    up to chunk + 65521 of them, kept per device and grown as needed, serves every chunk as a slice:
    computing them per chunk (an int64 modulo per element) cost more than the rest of the pass.
    """
    longest = min(chunk, max((m.numel for m in bucket.params), default=0))
    table = _position_weights(flat.device, longest + CHECKSUM_PERIOD)
    out = []
    for meta, offset in zip(bucket.params, bucket.offsets):
        values = flat[offset : offset + meta.numel]
        plain = torch.zeros((), dtype=torch.int64, device=flat.device)
        weighted = torch.zeros((), dtype=torch.int64, device=flat.device)
        for start in range(0, meta.numel, chunk):
            words = _as_words(values[start : start + chunk])
            phase = start % CHECKSUM_PERIOD
            plain += words.sum()
            weighted += (words * table[phase : phase + words.numel()]).sum()
        out.append((int(plain) * 1_000_003 + int(weighted)) % (2**61 - 1))
    return out


def _position_weights(device: torch.device, length: int) -> torch.Tensor:
    """At least `length` of (i + 1) % 65521, i = 0, 1, ...: position start + i weighs entry start % 65521 + i."""
    table = _WEIGHTS.get(device)
    if table is None or table.numel() < length:
        table = _WEIGHTS[device] = torch.arange(1, length + 1, dtype=torch.int64, device=device) % CHECKSUM_PERIOD
    return table


def _as_words(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    size = t.element_size()
    word = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return t.view(word).to(torch.int64)
