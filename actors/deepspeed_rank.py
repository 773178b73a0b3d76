"""What every DeepSpeed data-parallel rank shares, policy and critic alike: the rendezvous, the
engine, the loss scaling, and the driver-side sharding of a batch into per-rank mini-batch shards."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import ray
import torch

from rlhf.algorithms import loss_denominator
from rlhf.config import RunConfig
from rlhf.devices import torch_device
from rlhf.types import TrainBatch
from weight_sync.group import free_port


def comm_bucket_elements(num_params: int) -> int:
    """DeepSpeed's gradient-reduce / all-gather / prefetch bucket size, in elements: its default 5e8
    (2 GB of fp32, allocated even for a 50M-parameter model, measured with bench/memory.py) capped at
    the model's size, and at least 1e6 so that large models keep few, large transfers. A multiple of 64:
    ZeRO asserts the bucket is a multiple of its alignment (2 elements for fp32 on one rank)."""
    return int(min(5e8, max(1e6, num_params)) + 63) // 64 * 64


def deepspeed_config(cfg: RunConfig, device: str, lr: float, num_params: int = 500_000_000) -> dict:
    t = cfg.train
    bucket = comm_bucket_elements(num_params)
    zero: dict[str, Any] = {"stage": t.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if t.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
    host = {"device": "cpu", "pin_memory": device == "cuda"}  # on CPU the "host" is where the tensors already are
    if t.offload_optimizer:
        zero["offload_optimizer"] = host
    if t.offload_params:
        zero["offload_param"] = host
    return {
        "train_batch_size": t.mini_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # train.optimizer=torch with ZeRO-Offload steps torch's AdamW on the host, which DeepSpeed refuses
        # for a client optimizer unless told it is meant (it checks no configured one; said for clarity).
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(t.adam_betas), "eps": 1e-8,
                                                  "weight_decay": t.weight_decay, **optimizer_choice(cfg, device)}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def optimizer_choice(cfg: RunConfig, device: str) -> dict[str, Any]:
    """The optimizer parameters that pick the implementation (DeepSpeed's get_optimizer_configuration).

    torch_adam: torch.optim.AdamW, whatever the device. Without it DeepSpeed picks FusedAdam on GPU and
    DeepSpeedCPUAdam under offload, both C++/CUDA ops that its pip wheels ship unbuilt and that it
    JIT-compiles on first use (nvcc and CUDA_HOME on a GPU machine; ~45 s of g++ on CPU). On GPU with the
    optimizer states on the GPU, torch's fused kernel (one launch for all parameters, as FusedAdam). On the
    host (CPU runs, offload) torch's default foreach implementation: CPU runs keep the numbers they had."""
    if cfg.train.optimizer == "deepspeed":
        return {}
    on_gpu = device == "cuda" and not cfg.train.offload_optimizer
    return {"torch_adam": True, **({"fused": True} if on_gpu else {})}


def lr_schedule(cfg: RunConfig) -> Any:
    """None (constant) or a builder DeepSpeed calls with the optimizer; DeepSpeed steps the schedule
    with the optimizer and saves it in checkpoints. Linear: lr * (1 - k / K) at optimizer step k of K."""
    if cfg.train.lr_schedule == "constant":
        return None
    total = cfg.steps * (cfg.rollout_batch_size // cfg.train.mini_batch_size) * cfg.algorithm.ppo_epochs
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: max(0.0, 1.0 - k / total))


def node_host() -> str:
    """Loopback on a one-node cluster (nothing listens beyond the laptop), the node's IP otherwise."""
    return "127.0.0.1" if len(ray.nodes()) == 1 else ray.util.get_node_ip_address()


class DeepSpeedRank:
    """Rank `rank` of `world_size`; subclasses build the model and are the Ray actors."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, device: str):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch_device(device)
        self.backend = "nccl" if device == "cuda" else "gloo"

    def rendezvous_endpoint(self) -> tuple[str, int]:
        """Where rank 0 hosts DeepSpeed's rendezvous (asked of rank 0 before any rank sets up)."""
        host = node_host()
        return host, free_port(host)

    def _start_engine(self, master_addr: str, master_port: int, build_model: Any, lr: float) -> None:
        """Join the DeepSpeed group and wrap `build_model()` in an engine; all ranks call this together."""
        import deepspeed

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")  # Ray gives each rank its own device
        cores = self.cfg.resources.trainer_cores
        if cores and self.device.type == "cpu":  # pinned as a GPU would be its own device
            os.sched_setaffinity(0, cores)
        if self.cfg.train.threads or cores:
            torch.set_num_threads(self.cfg.train.threads or len(cores))
        torch.manual_seed(self.cfg.seed)
        deepspeed.init_distributed(dist_backend=self.backend, auto_mpi_discovery=False)
        model = build_model()
        if self.cfg.train.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, or LoRA's adapters
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable,
                                               config=deepspeed_config(self.cfg, self.device.type, lr,
                                                                       sum(p.numel() for p in trainable)),
                                               lr_scheduler=lr_schedule(self.cfg))
        if self.world_size == 1 and self.cfg.train.zero_stage == 0:
            # Alone, DeepSpeed would still flatten every gradient, all-reduce it with itself and copy it
            # back after each backward (~2 % of a step at 48M parameters). ZeRO 1-3 partition gradients
            # in that path, so it stays on for them.
            self.engine.enable_backward_allreduce = False

    def _backward_step(self, loss: torch.Tensor) -> tuple[float, float]:
        """Backward and (at the accumulation boundary) the optimizer step; returns their seconds."""
        # Each shard's loss is already its share of the mini-batch's loss (global denominator), so
        # undo DeepSpeed's averaging over ranks and skip its 1/gas scaling; it steps at the boundary.
        t0 = self._clock()
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        t1 = self._clock()
        self.engine.step()
        return t1 - t0, self._clock() - t1

    def _clock(self) -> float:
        """perf_counter once the device has run what was queued (CUDA kernels run asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save_checkpoint(self, path: str) -> None:
        """The engine's full state (weights, optimizer, scheduler) under path; all ranks call together."""
        self.engine.save_checkpoint(path, tag="deepspeed")

    def load_checkpoint(self, path: str) -> None:
        loaded, _ = self.engine.load_checkpoint(path, tag="deepspeed")
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")

    def _all_parameters_gathered(self) -> Any:
        """Full parameters on every rank for the duration (ZeRO-3 partitions them; a no-op otherwise)."""
        if self.cfg.train.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)


def minibatch_rows(n: int, mini_batch_size: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices of each mini-batch: in order for the first epoch, reshuffled for later ones."""
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.arange(n) if epoch == 0 else torch.randperm(n, generator=gen)
        yield from order.split(mini_batch_size)


def shard_minibatches(batch: TrainBatch, cfg: RunConfig, step: int, world: int,
                      loss_agg: str) -> list[list[TrainBatch]]:
    """Per rank, its shard of every mini-batch of every PPO epoch, each shard carrying the whole
    mini-batch's loss denominator (so shards' losses sum to the mini-batch's loss)."""
    per_rank: list[list[TrainBatch]] = [[] for _ in range(world)]
    for rows in minibatch_rows(batch.size, cfg.train.mini_batch_size, cfg.algorithm.ppo_epochs,
                               seed=cfg.seed * 100_003 + step):
        mb = batch.select(rows)
        mb = mb.with_(loss_denominator=loss_denominator(mb.loss_mask, loss_agg, cfg.rollout.max_new_tokens))
        for r, shard in enumerate(mb.chunks(world)):
            per_rank[r].append(shard)
    return per_rank


def sharded_forward(ranks: list, batch: TrainBatch, call: Any) -> torch.Tensor:
    """[B, T-1] from per-rank [b, t-1] results of `call(rank, shard)`, re-padded to the batch's width."""
    shards = batch.chunks(len(ranks))
    parts = ray.get([call(r, shard) for r, shard in zip(ranks, shards)])
    width = batch.loss_mask.shape[1]
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])
