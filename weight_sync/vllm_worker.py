"""The vLLM side of weight sync: mixed into every vLLM worker with
`LLM(..., worker_extension_cls="weight_sync.vllm_worker.WeightSyncWorker")` and reached through
`llm.collective_rpc(...)`, so tensor-parallel workers each join the group with their own rank."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from weight_sync.buckets import ParamMeta, plan_buckets, torch_dtype, unpack
from weight_sync.group import SyncGroup, open_group


class _RotaryReloadFilter(logging.Filter):
    """vLLM's layerwise reload warns "RotaryEmbedding: Failed to load weights" on every reload: the
    rotary cos/sin cache is a buffer no checkpoint holds, and vLLM puts it back untouched. The per-step
    log-prob gap (~3e-7 after each sync) shows positions are intact, so only that line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("RotaryEmbedding: Failed to load weights"))


class WeightSyncWorker:
    _ws_group: SyncGroup | None = None
    _ws_version: int = 0

    def init_weight_sync(self, host: str, port: int, world_size: int, rank_offset: int, backend: str,
                         timeout_s: float, params: list[tuple[str, str, list[int]]], bucket_bytes: int) -> int:
        """Join the trainer's group as rank rank_offset + this worker's rank; remember the bucket plan."""
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadFilter())
        rank = rank_offset + self.rank  # type: ignore[attr-defined]  (the vLLM Worker's rank in its engine)
        self._ws_group = open_group(backend, host, port, rank, world_size, timeout_s)
        self._ws_buckets = plan_buckets([ParamMeta(n, d, tuple(s)) for n, d, s in params], bucket_bytes)
        return rank

    def receive_weights(self, version: int) -> int:
        """Receive every bucket from rank 0 and load it into the model; returns the served version."""
        if self._ws_group is None:
            raise RuntimeError("receive_weights before init_weight_sync")
        group, buckets = self._ws_group, self._ws_buckets
        expected = sum(len(b.params) for b in buckets)
        loaded = 0

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal loaded
            for b in buckets:
                flat = torch.empty(b.numel, dtype=torch_dtype(b.dtype), device=group.device)
                group.broadcast(flat, src=0)
                for name_tensor in unpack(b, flat):
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
        return version

    def weight_version(self) -> int:
        return self._ws_version

    def close_weight_sync(self) -> None:
        if self._ws_group is not None:
            self._ws_group.close()
            self._ws_group = None
