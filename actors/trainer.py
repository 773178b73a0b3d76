"""The DeepSpeed policy trainer: one Ray actor per data-parallel rank, plus `TrainerGroup`, the
driver's handle that shards batches over the ranks and merges what they report."""

from __future__ import annotations

import ray
import torch

from actors import lora
from actors.common import batch_logprobs, micro_scores
from actors.deepspeed_rank import DeepSpeedRank, node_host, shard_minibatches, sharded_forward
from rlhf.algorithms import ObjectiveInputs, ObjectiveStats, policy_objective
from rlhf.config import RunConfig
from rlhf.types import TrainBatch
from weight_sync.group import free_port
from weight_sync.sender import WeightSender


@ray.remote
class PolicyTrainer(DeepSpeedRank):
    """Rank `rank` of `world_size`: a DeepSpeed engine around the HF causal LM."""

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the DeepSpeed group and build the engine; all ranks call this together."""
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        self._rendezvous = (master_addr, master_port)

        def build() -> torch.nn.Module:
            model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32,
                                                         trust_remote_code=cfg.model.trust_remote_code)
            return lora.wrap(model, cfg.train) if cfg.train.lora_rank else model

        self._start_engine(master_addr, master_port, build, cfg.train.lr)
        # What a sync sends: every parameter, or with LoRA the merged weights of the adapted modules only.
        params = (lambda: lora.merged_weights(self.engine.module)) if cfg.train.lora_rank else dict(
            self.engine.module.named_parameters())
        if getattr(self, "sender", None) is None:
            self.sender = WeightSender(params, self.rank, cfg.train.zero_stage, cfg.model.dtype)
        else:  # reset(): the weight-sync group stays connected
            self.sender.rebind(params)

    def reset(self, cfg: RunConfig) -> None:
        """Start another run of the same shape on this rank (rlhf.topology.TopologyPool): the model
        reloaded from cfg.model.path, a new optimizer and schedule from cfg.train, the seed reset; the
        process group and the weight-sync group stay. All ranks call this together (DeepSpeed's
        initialize is collective)."""
        import gc

        self.cfg, self.engine = cfg, None
        gc.collect()  # the last run's engine: its parameters, gradients and optimizer states
        self.setup(*self._rendezvous)

    # ---- forward passes ----
    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """This rank's share of the trainer's log-probs; all ranks call it together (ZeRO-3 gathers)."""
        self.engine.eval()
        return batch_logprobs(self.engine, batch, self.cfg.rollout.temperature, self.cfg.train.micro_batch_size,
                              self.device, self.cfg.train.shares_prompts)

    def train(self, minibatches: list[TrainBatch]) -> dict[str, object]:
        """One optimizer step per mini-batch shard: forward, `policy_objective`, backward, step.
        Returns the objective's summed statistics and timings; TrainerGroup reduces them over ranks."""
        objective, temperature = self.cfg.objective, self.cfg.rollout.temperature
        self.engine.train()
        total, first = ObjectiveStats(), None
        s = {"optimizer_steps": 0.0, "forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
        for shard in minibatches:
            for mb in shard.chunks(self.cfg.grad_accum_steps):
                t0 = self._clock()
                scores = micro_scores(self.engine, mb, temperature, self.device, self.cfg.train.shares_prompts,
                                      entropy=objective.entropy_coef > 0)
                logp = scores.logp
                dev = self.device
                out = policy_objective(ObjectiveInputs(
                    logp=logp,
                    # no old log-probs: this is the batch's only update, so the policy before it is this forward's
                    old_logp=logp.detach() if mb.old_logprobs is None else mb.old_logprobs.to(dev),
                    rollout_logp=mb.rollout_logprobs.to(dev), advantages=mb.advantages.to(dev),
                    mask=mb.loss_mask.to(dev), denominator=shard.loss_denominator,
                    ref_logp=None if mb.ref_logprobs is None else mb.ref_logprobs.to(dev),
                    entropy=scores.entropy,
                    on_policy=mb.on_policy_rows()), objective)
                s["forward_s"] += self._clock() - t0
                backward_s, step_s = self._backward_step(out.loss)
                s["backward_s"] += backward_s
                s["optimizer_s"] += step_s  # the optimizer steps at the mini-batch's last micro-batch
                total = total + out.stats
                first = first or out.stats  # nothing has been updated yet: its ratio must be 1 and its KL 0
            s["optimizer_steps"] += 1
            s["grad_norm"] = self._grad_norm()
            s["lr"] = self.engine.get_lr()[0]  # for the next optimizer step
        return s | {"objective": total, "first": first}

    # ---- weight sync (weight_sync.service drives these) ----
    def weight_meta(self) -> list:
        return self.sender.meta()

    def sync_endpoint(self) -> tuple[str, int]:
        host = node_host()
        return host, free_port(host)

    def init_weight_sync(self, backend: str, endpoint, world_size: int, bucket_bytes: int) -> None:
        """Join a sync group as its sender at `endpoint` (a SyncEndpoint), or with None take part in pushes
        without sending (weight_sync.service.sync_links says which ranks send)."""
        self.sender.connect(backend, (endpoint.host, endpoint.port) if endpoint is not None else None, world_size,
                            self.cfg.weight_sync.timeout_s, bucket_bytes)

    def send_weights(self, version: int, verify: bool) -> tuple[int, list[int] | None]:
        return self.sender.send(verify)

    def close_weight_sync(self) -> None:
        self.sender.close()

    def release_cached_memory(self) -> None:
        """Hand the blocks torch's caching allocator keeps free (activations, the step's temporaries) back
        to the device, for a colocated generator's KV cache; the model and optimizer states stay."""
        if self.device.type == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()

    def save_hf(self, path: str) -> None:
        """The policy and its tokenizer in HF format, loadable by transformers and vLLM (rank 0 writes;
        all ranks call, since ZeRO-3 gathers the parameters collectively)."""
        with self._all_parameters_gathered():
            if self.rank == 0:
                from transformers import AutoTokenizer

                if self.cfg.train.lora_rank:  # the merged model, not the adapters: any loader reads it
                    module = self.engine.module
                    module.get_base_model().save_pretrained(path, state_dict=lora.full_state(module))
                else:
                    self.engine.module.save_pretrained(path)
                AutoTokenizer.from_pretrained(self.cfg.model.path).save_pretrained(path)


class TrainerGroup:
    """The driver's view of all trainer ranks: one call per phase, batches sharded over ranks."""

    def __init__(self, ranks: list, cfg: RunConfig):
        self.ranks = ranks
        self.cfg = cfg

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return sharded_forward(self.ranks, batch, lambda rank, shard: rank.compute_logprobs.remote(shard))

    def train(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """ppo_epochs passes over `batch` in mini-batches; each mini-batch is one optimizer step."""
        per_rank = shard_minibatches(batch, self.cfg, step, len(self.ranks), self.cfg.algorithm.loss_agg)
        stats = ray.get([r.train.remote(shards) for r, shards in zip(self.ranks, per_rank)])
        return reduce_rank_stats(stats)

    def save_hf(self, path: str) -> None:
        ray.get([r.save_hf.remote(path) for r in self.ranks])


def reduce_rank_stats(stats: list[dict]) -> dict[str, float]:
    steps = stats[0]["optimizer_steps"]
    total = sum((s["objective"] for s in stats), ObjectiveStats())  # shards' loss shares sum to the global loss
    first = sum((s["first"] for s in stats), ObjectiveStats())
    return total.metrics(steps) | {
        "policy/first_ratio_max_dev": first.ratio_dev_max,
        "policy/first_kl": first.policy_kl / max(first.tokens, 1.0),
        "train/grad_norm": stats[0]["grad_norm"],
        "train/lr": stats[0]["lr"],
        "train/optimizer_steps": steps,
        # where rank 0's train phase went (the slowest rank sets the phase; ranks run the same shapes)
        "train/forward_s": stats[0]["forward_s"],
        "train/backward_s": stats[0]["backward_s"],
        "train/optimizer_s": stats[0]["optimizer_s"],
    }
