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


class _ReloadFilter(logging.Filter):
    """vLLM's layerwise reload warns "<Layer>: Failed to load weights" for every layer a reload leaves
    alone, where here that is by design: the rotary cos/sin cache is a buffer no checkpoint holds, and
    vLLM puts it back untouched; a tied output layer shares the embedding's weight, which a sync carries
    under the embedding's name (and which `repack_shared_weights` re-packs). The per-step log-prob gap
    checks that both are intact, so only those lines are dropped. With `partial` (LoRA syncs carry only
    the adapted modules) the same line for every module left out is dropped too: those modules keep
    their weights, and the log-prob gap still checks the rest."""

    def __init__(self, expected: tuple[str, ...], partial: bool = False):
        super().__init__()
        self.expected = tuple(f"{layer}: Failed to load weights" for layer in expected)
        self.partial = partial

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.expected):
            return False
        return not (self.partial and message.endswith(": Failed to load weights"))


def repack_shared_weights(model: torch.nn.Module) -> list[str]:
    """Re-pack the CPU kernels of every layer whose weight another layer shares: a tied output layer.

    vLLM's CPU linear kernels compute from their own packed copy of a weight (a oneDNN handle made by
    `process_weights_after_loading`). A tied `lm_head` holds `embed_tokens.weight` itself, and the
    checkpoint (and every sync) carries that tensor only once, under the embedding's name; a layerwise
    reload re-processes a layer only when its own weights arrive, so the embedding's values change while
    the output layer keeps computing logits from the packed copy of the first weights. Nothing fails:
    the generator silently samples from a policy whose output layer never trains. The first layer of
    each group (the embedding) is left alone: the reload re-processed it with its own weights, and
    re-packing a 49k-vocabulary matrix costs ~0.1 s. Returns the names of the layers re-packed."""
    repacked = []
    for group in shared_weight_groups(model):
        for name, module in group[1:]:
            module.quant_method.process_weights_after_loading(module)
            repacked.append(name)
    return repacked


def shared_weight_groups(model: torch.nn.Module) -> list[list[tuple[str, torch.nn.Module]]]:
    """The layers with a kernel (`quant_method`) that hold one weight between them, in module order:
    the first is the one a checkpoint names the weight after (embed_tokens), the others alias it."""
    sharing: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None and getattr(module, "quant_method", None) is not None:
            sharing.setdefault(id(weight), []).append((name, module))
    return [group for group in sharing.values() if len(group) > 1]


def check_shared_kernels(model: torch.nn.Module) -> None:
    """Raise unless every layer that shares a weight computes with the weight it holds now: its kernel's
    output on a probe input against `F.linear` with the live weight, relative to the output's scale. fp32
    kernels agree to ~1e-6 (summation order); SmolLM2's stale output layer one step of lr 2e-5 after the
    first push was 1.1e-4 off. Kernels in bf16/fp16 round more."""
    generator = torch.Generator().manual_seed(0)
    for group in shared_weight_groups(model):
        for name, module in group:
            weight = module.weight
            probe = torch.randn(4, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
            want = torch.nn.functional.linear(probe, weight).float()
            got = module.quant_method.apply(module, probe).float()
            error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
            if error > (2e-5 if weight.dtype == torch.float32 else 3e-2):
                raise RuntimeError(f"after the push, {name} computes with other weights than the {tuple(weight.shape)} "
                                   f"weight it shares with {group[0][0]} (relative error {error:.2g})")


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
        model = self.model_runner.model  # type: ignore[attr-defined]
        aliases = {type(m).__name__ for group in shared_weight_groups(model) for _, m in group[1:]}
        self._ws_filter = _ReloadFilter(("RotaryEmbedding", *sorted(aliases)), partial)
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
        runner = self.model_runner  # type: ignore[attr-defined]
        # One path on every device: vLLM's layerwise reload (vllm.model_executor.model_loader.reload) loads
        # each layer through its checkpoint loaders and re-runs the layer's process_weights_after_loading, then
        # copies the result into the kernel tensors the engine holds. That is what quantized and fp8 layers
        # need (their kernels hold transformed weights), and what vLLM's CPU kernels need (they repack Linear
        # weights and empty the originals, so a plain load_weights fails there).
        self.reload_weights(weights_iterator=tensors)  # type: ignore[attr-defined]  (vLLM's Worker, CPUWorker too)
        repack_shared_weights(runner.model)  # a no-op off CPU, where unquantized kernels use the weight itself
        if verify:
            check_shared_kernels(runner.model)
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
