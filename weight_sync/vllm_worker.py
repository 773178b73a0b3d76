"""The vLLM side of weight sync: mixed into every vLLM worker with
`LLM(..., worker_extension_cls="weight_sync.vllm_worker.WeightSyncWorker")` and reached through
`llm.collective_rpc(...)`, so tensor-parallel workers each join the group with their own rank."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from weight_sync.buckets import Bucket, ParamMeta, plan_buckets
from weight_sync.group import SyncGroup, alone_bytes, open_group
from weight_sync.receiver import receive_buckets


class _RotaryReloadFilter(logging.Filter):
    """vLLM's layerwise reload warns "RotaryEmbedding: Failed to load weights" on every reload: the
    rotary cos/sin cache is a buffer no checkpoint holds, and vLLM puts it back untouched. The per-step
    log-prob gap (~3e-7 after each sync) shows positions are intact, so only that line is dropped.
    With `partial` (LoRA syncs carry only the adapted modules) the same line for every module left
    out is dropped too: those modules keep their weights, and the log-prob gap still checks the rest."""

    def __init__(self, partial: bool = False):
        super().__init__()
        self.partial = partial

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("RotaryEmbedding: Failed to load weights"):
            return False
        return not (self.partial and message.endswith(": Failed to load weights"))


class WeightSyncWorker:
    _ws_group: SyncGroup | None = None
    _ws_version: int = 0

    def init_weight_sync(self, host: str, port: int, world_size: int, rank_offset: int, backend: str,
                         timeout_s: float, params: list[tuple[str, str, list[int]]], bucket_bytes: int,
                         partial: bool = False) -> int:
        """Join the trainer's group as rank rank_offset + this worker's rank; remember the bucket plan.
        `partial`: syncs carry only some modules' weights (LoRA's adapted ones)."""
        log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        if getattr(self, "_ws_filter", None) is not None:  # a reconnect: one filter, not one per group
            log.removeFilter(self._ws_filter)
        self._ws_filter = _RotaryReloadFilter(partial)
        log.addFilter(self._ws_filter)
        rank = rank_offset + self.rank  # type: ignore[attr-defined]  (the vLLM Worker's rank in its engine)
        self._ws_group = open_group(backend, host, port, rank, world_size, timeout_s)
        self._ws_buckets = plan_buckets([ParamMeta(n, d, tuple(s)) for n, d, s in params], bucket_bytes,
                                        alone_bytes(backend, bucket_bytes))
        from vllm.platforms import current_platform

        # On CPU, fresh buffers cost more in page faults than the transfer; keep one per bucket across
        # syncs (an extra copy of the weights in RAM). CUDA's caching allocator makes this moot on GPU.
        self._ws_pool: dict[int, torch.Tensor] | None = {} if current_platform.is_cpu() else None
        return rank

    def receive_weights(self, version: int, verify: bool) -> tuple[int, list[int] | None]:
        """Receive every bucket from rank 0 and load it into the model. Returns the version now served
        and, if `verify`, a checksum per received tensor (compared with the sender's by the driver)."""
        if self._ws_group is None:
            raise RuntimeError("receive_weights before init_weight_sync")
        expected = sum(len(b.params) for b in self._ws_buckets)
        sums: list[int] | None = [] if verify else None
        loaded = 0

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal loaded
            for name_tensor in receive_buckets(self._ws_group, self._ws_buckets, sums, self._ws_maybe_corrupt,
                                               self._ws_pool):
                loaded += 1
                yield name_tensor

        tensors = stream()
        from vllm.platforms import current_platform

        runner = self.model_runner  # type: ignore[attr-defined]
        if current_platform.is_cpu():
            # vLLM's CPU backend repacks Linear weights for its kernels and empties the originals, so
            # in-place load_weights cannot work; reload_weights re-runs the repacking on the new tensors.
            runner.reload_weights(weights_iterator=tensors)
        else:
            runner.model.load_weights(tensors)  # the in-place fast path
        consumed = loaded
        for _ in tensors:  # receive what the loader left, or the sender would wait forever
            pass
        if consumed != expected:
            raise RuntimeError(f"vLLM loaded {consumed} of the {expected} tensors it was sent")
        self._ws_version = version
        return version, sums

    def corrupt_next_receive(self, name: str) -> None:
        """For tests: alter tensor `name` in the next push after it arrives, as a bad link would."""
        self._ws_corrupt = name

    def _ws_maybe_corrupt(self, bucket: Bucket, flat: torch.Tensor) -> None:
        name = getattr(self, "_ws_corrupt", None)
        for meta, offset in zip(bucket.params, bucket.offsets):
            if meta.name == name:
                flat[offset] += 1
                self._ws_corrupt = None

    def close_weight_sync(self) -> None:
        if self._ws_group is not None:
            self._ws_group.close()
            self._ws_group = None
