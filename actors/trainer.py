"""The DeepSpeed policy trainer: one Ray actor per data-parallel rank, plus `TrainerGroup`, the
driver's handle that shards batches over the ranks and merges what they report."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray
import torch

from actors.common import batch_logprobs, micro_logprobs, torch_device
from rlhf.algorithms import KL_ESTIMATORS, POLICY_LOSSES, aggregate, loss_denominator
from rlhf.config import RunConfig
from rlhf.types import TrainBatch
from weight_sync.group import free_port
from weight_sync.sender import WeightSender


def deepspeed_config(cfg: RunConfig, device: str) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.mini_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "optimizer": {
            "type": "AdamW",
            # On CPU, torch's AdamW: DeepSpeed's default fused Adam needs CUDA, and its CPU Adam
            # JIT-compiles for ~45 s on first use.
            "params": {"lr": t.lr, "betas": list(t.adam_betas), "eps": 1e-8, "weight_decay": t.weight_decay,
                       "torch_adam": device == "cpu"},
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@ray.remote
class PolicyTrainer:
    """Rank `rank` of `world_size`: a DeepSpeed engine around the HF causal LM."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, device: str):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch_device(device)
        self.backend = "nccl" if device == "cuda" else "gloo"

    def rendezvous_endpoint(self) -> tuple[str, int]:
        """Where rank 0 hosts DeepSpeed's rendezvous (asked of rank 0 before any rank sets up)."""
        host = node_host()
        return host, free_port(host)

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the DeepSpeed group and build the engine; all ranks call this together."""
        import deepspeed
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")  # Ray gives each rank its own device
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.seed)
        deepspeed.init_distributed(dist_backend=self.backend, auto_mpi_discovery=False)
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32,
                                                     trust_remote_code=cfg.model.trust_remote_code)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=deepspeed_config(cfg, self.device.type))
        self.sender = WeightSender(dict(self.engine.module.named_parameters()), self.rank, cfg.train.zero_stage,
                                   cfg.model.dtype)

    # ---- forward passes ----
    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """This rank's share of the trainer's log-probs; all ranks call it together (ZeRO-3 gathers)."""
        self.engine.eval()
        return batch_logprobs(self.engine, batch, self.cfg.rollout.temperature, self.cfg.train.micro_batch_size,
                              self.device)

    def train(self, minibatches: list[TrainBatch]) -> dict[str, float]:
        """One optimizer step per mini-batch shard; returns sums the group reduces over ranks."""
        a, gas = self.cfg.algorithm, self.cfg.grad_accum_steps
        policy_loss, kl_estimator = POLICY_LOSSES[a.policy_loss], KL_ESTIMATORS[a.kl_estimator]
        self.engine.train()
        s = {"tokens": 0.0, "clipped": 0.0, "approx_kl": 0.0, "loss/policy": 0.0, "loss/kl": 0.0,
             "optimizer_steps": 0.0}
        first = True
        for shard in minibatches:
            for mb in shard.chunks(gas):
                mask = mb.loss_mask.to(self.device)
                logp = micro_logprobs(self.engine, mb, self.cfg.rollout.temperature, self.device)
                old = mb.old_logprobs.to(self.device)
                out = policy_loss(logp, old, mb.advantages.to(self.device), a.clip_low, a.clip_high)
                pg_loss = aggregate(out.loss, mask, a.loss_agg, shard.loss_denominator)
                loss = pg_loss
                if a.kl_coef > 0:
                    kl = aggregate(kl_estimator(logp, mb.ref_logprobs.to(self.device)), mask, a.loss_agg,
                                   shard.loss_denominator)
                    loss = loss + a.kl_coef * kl
                    s["loss/kl"] += kl.item()
                # Each shard's loss is already its share of the mini-batch's loss (global denominator),
                # so undo DeepSpeed's averaging over ranks and skip its 1/gas scaling.
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                self.engine.step()
                with torch.no_grad():
                    policy_kl = KL_ESTIMATORS["k3"](logp, old) * mask  # KL(pi_old || pi) per token
                    s["tokens"] += mask.sum().item()
                    s["clipped"] += (out.clipped * mask).sum().item()
                    s["approx_kl"] += policy_kl.sum().item()
                    s["loss/policy"] += pg_loss.item()
                    if first:  # nothing has been updated yet: the ratio must be 1 and the KL 0
                        s["first/ratio_max_dev"] = ((out.ratio - 1).abs() * mask).max().item()
                        s["first/policy_kl"] = policy_kl.sum().item() / max(mask.sum().item(), 1.0)
                        first = False
            s["optimizer_steps"] += 1
            grad_norm = self.engine.get_global_grad_norm()
            s["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        return s

    # ---- weight sync (weight_sync.service drives these) ----
    def weight_meta(self) -> list:
        return self.sender.meta()

    def sync_endpoint(self) -> tuple[str, int]:
        host = node_host()
        return host, free_port(host)

    def init_weight_sync(self, endpoint, world_size: int, bucket_bytes: int) -> None:
        self.sender.connect(endpoint.backend, endpoint.host, endpoint.port, world_size,
                            self.cfg.weight_sync.timeout_s, bucket_bytes)

    def send_weights(self, version: int, verify: bool) -> tuple[int, list[int] | None]:
        return self.sender.send(verify)

    def close_weight_sync(self) -> None:
        self.sender.close()

    def save_hf(self, path: str) -> None:
        """The policy and its tokenizer in HF format, loadable by transformers and vLLM (rank 0 writes;
        all ranks call, since ZeRO-3 gathers the parameters collectively)."""
        gather = contextlib.nullcontext()
        if self.cfg.train.zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        with gather:
            if self.rank == 0:
                from transformers import AutoTokenizer

                self.engine.module.save_pretrained(path)
                AutoTokenizer.from_pretrained(self.cfg.model.path).save_pretrained(path)


def node_host() -> str:
    """Loopback on a one-node cluster (nothing listens beyond the laptop), the node's IP otherwise."""
    return "127.0.0.1" if len(ray.nodes()) == 1 else ray.util.get_node_ip_address()


class TrainerGroup:
    """The driver's view of all trainer ranks: one call per phase, batches sharded over ranks."""

    def __init__(self, ranks: list, cfg: RunConfig):
        self.ranks = ranks
        self.cfg = cfg

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        shards = batch.chunks(len(self.ranks))
        parts = ray.get([r.compute_logprobs.remote(shard) for r, shard in zip(self.ranks, shards)])
        width = batch.loss_mask.shape[1]
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

    def train(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """ppo_epochs passes over `batch` in mini-batches; each mini-batch is one optimizer step."""
        world = len(self.ranks)
        per_rank: list[list[TrainBatch]] = [[] for _ in range(world)]
        for rows in minibatch_rows(batch.size, self.cfg.train.mini_batch_size, self.cfg.algorithm.ppo_epochs,
                                   seed=self.cfg.seed * 100_003 + step):
            mb = batch.select(rows)
            mb = mb.with_(loss_denominator=loss_denominator(mb.loss_mask, self.cfg.algorithm.loss_agg,
                                                            self.cfg.rollout.max_new_tokens))
            for r, shard in enumerate(mb.chunks(world)):
                per_rank[r].append(shard)
        stats = ray.get([r.train.remote(shards) for r, shards in zip(self.ranks, per_rank)])
        return reduce_rank_stats(stats)

    def save_hf(self, path: str) -> None:
        ray.get([r.save_hf.remote(path) for r in self.ranks])


def minibatch_rows(n: int, mini_batch_size: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices of each mini-batch: in order for the first epoch, reshuffled for later ones."""
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.arange(n) if epoch == 0 else torch.randperm(n, generator=gen)
        yield from order.split(mini_batch_size)


def reduce_rank_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    tokens = sum(s["tokens"] for s in stats)
    steps = stats[0]["optimizer_steps"]
    return {
        "loss/policy": sum(s["loss/policy"] for s in stats) / steps,  # shards' shares sum to the global loss
        "loss/kl": sum(s["loss/kl"] for s in stats) / steps,
        "policy/clip_frac": sum(s["clipped"] for s in stats) / max(tokens, 1.0),
        "policy/approx_kl": sum(s["approx_kl"] for s in stats) / max(tokens, 1.0),
        "policy/first_ratio_max_dev": max(s["first/ratio_max_dev"] for s in stats),
        "policy/first_kl": max(s["first/policy_kl"] for s in stats),
        "train/grad_norm": stats[0]["grad_norm"],
        "train/optimizer_steps": steps,
    }
