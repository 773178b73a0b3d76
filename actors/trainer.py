"""The DeepSpeed policy trainer: one Ray actor per data-parallel rank, plus `TrainerGroup`, the
driver's handle that shards batches over the ranks and merges what they report."""

from __future__ import annotations

import ray
import torch

from actors import lora
from actors.common import batch_logprobs, micro_logits
from actors.deepspeed_rank import DeepSpeedRank, node_host, shard_minibatches, sharded_forward
from rlhf.algorithms import (
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    entropy_from_logits,
    token_logprobs,
    truncated_is_weights,
)
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

        def build() -> torch.nn.Module:
            model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32,
                                                         trust_remote_code=cfg.model.trust_remote_code)
            return lora.wrap(model, cfg.train) if cfg.train.lora_rank else model

        self._start_engine(master_addr, master_port, build, cfg.train.lr)
        # What a sync sends: every parameter, or with LoRA the merged weights of the adapted modules only.
        params = (lambda: lora.merged_weights(self.engine.module)) if cfg.train.lora_rank else dict(
            self.engine.module.named_parameters())
        self.sender = WeightSender(params, self.rank, cfg.train.zero_stage, cfg.model.dtype)

    # ---- forward passes ----
    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """This rank's share of the trainer's log-probs; all ranks call it together (ZeRO-3 gathers)."""
        self.engine.eval()
        return batch_logprobs(self.engine, batch, self.cfg.rollout.temperature, self.cfg.train.micro_batch_size,
                              self.device, self.cfg.train.shares_prompts)

    def train(self, minibatches: list[TrainBatch]) -> dict[str, float]:
        """One optimizer step per mini-batch shard; returns sums the group reduces over ranks."""
        a, gas = self.cfg.algorithm, self.cfg.grad_accum_steps
        policy_loss, kl_estimator = POLICY_LOSSES[a.policy_loss], KL_ESTIMATORS[a.kl_estimator]
        self.engine.train()
        s = {"tokens": 0.0, "clipped": 0.0, "approx_kl": 0.0, "loss/policy": 0.0, "loss/kl": 0.0, "entropy": 0.0,
             "optimizer_steps": 0.0, "tis_sum": 0.0, "tis_capped": 0.0, "forward_s": 0.0, "backward_s": 0.0,
             "optimizer_s": 0.0}
        first = True
        for shard in minibatches:
            for mb in shard.chunks(gas):
                t0 = self._clock()
                mask = mb.loss_mask.to(self.device)
                logits = micro_logits(self.engine, mb, self.device, self.cfg.train.shares_prompts)
                logp = token_logprobs(logits, mb.input_ids[:, 1:].to(self.device), self.cfg.rollout.temperature)
                # No old log-probs: this is the batch's only update, so the policy before it is this forward's.
                old = logp.detach() if mb.old_logprobs is None else mb.old_logprobs.to(self.device)
                out = policy_loss(logp, old, mb.advantages.to(self.device), a.clip_low, a.clip_high)
                rollout = mb.rollout_logprobs.to(self.device)
                tis = truncated_is_weights(old, rollout, a.tis_cap)  # samples drawn by the generator's policy
                pg_loss = aggregate(out.loss * tis, mask, a.loss_agg, shard.loss_denominator)
                loss = pg_loss
                if a.kl_coef > 0 and not a.kl_in_reward:
                    kl = aggregate(kl_estimator(logp, mb.ref_logprobs.to(self.device)), mask, a.loss_agg,
                                   shard.loss_denominator)
                    loss = loss + a.kl_coef * kl
                    s["loss/kl"] += kl.item()
                if a.entropy_coef > 0:  # the bonus: higher entropy lowers the loss
                    entropy = aggregate(entropy_from_logits(logits, self.cfg.rollout.temperature), mask, a.loss_agg,
                                        shard.loss_denominator)
                    loss = loss - a.entropy_coef * entropy
                    s["entropy"] += entropy.item()
                s["forward_s"] += self._clock() - t0
                backward_s, step_s = self._backward_step(loss)
                s["backward_s"] += backward_s
                s["optimizer_s"] += step_s  # the optimizer steps at the mini-batch's last micro-batch
                with torch.no_grad():
                    policy_kl = KL_ESTIMATORS["k3"](logp, old) * mask  # KL(pi_old || pi) per token
                    s["tokens"] += mask.sum().item()
                    s["clipped"] += (out.clipped * mask).sum().item()
                    s["approx_kl"] += policy_kl.sum().item()
                    s["loss/policy"] += pg_loss.item()
                    s["tis_sum"] += (tis * mask).sum().item()
                    s["tis_capped"] += ((tis >= a.tis_cap) * mask).sum().item() if a.tis_cap else 0.0
                    if mb.old_logprobs is None:  # what the driver would have measured on a separate pass
                        fresh = mask * mb.on_policy_rows().to(self.device)[:, None]
                        s["gap_sum"] = s.get("gap_sum", 0.0) + ((old - rollout).abs() * fresh).sum().item()
                        s["gap_tokens"] = s.get("gap_tokens", 0.0) + fresh.sum().item()
                        if mb.ref_logprobs is not None:
                            kl_ref = KL_ESTIMATORS["k3"](old, mb.ref_logprobs.to(self.device))
                            s["kl_ref_sum"] = s.get("kl_ref_sum", 0.0) + (kl_ref * mask).sum().item()
                    if first:  # nothing has been updated yet: the ratio must be 1 and the KL 0
                        s["first/ratio_max_dev"] = ((out.ratio - 1).abs() * mask).max().item()
                        s["first/policy_kl"] = policy_kl.sum().item() / max(mask.sum().item(), 1.0)
                        first = False
            s["optimizer_steps"] += 1
            s["grad_norm"] = self._grad_norm()
            s["lr"] = self.engine.get_lr()[0]  # for the next optimizer step
        return s

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


def reduce_rank_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    tokens = sum(s["tokens"] for s in stats)
    steps = stats[0]["optimizer_steps"]
    measured = {}  # single_update: the gap and the reference KL come from the training forward
    gap_tokens = sum(s.get("gap_tokens", 0.0) for s in stats)
    if gap_tokens:  # only samples of the weights the trainer holds: older ones differ by design
        measured["sync/logprob_gap"] = sum(s["gap_sum"] for s in stats) / gap_tokens
    if "kl_ref_sum" in stats[0]:
        measured["kl/ref"] = sum(s["kl_ref_sum"] for s in stats) / max(tokens, 1.0)
    return measured | {
        "loss/policy": sum(s["loss/policy"] for s in stats) / steps,  # shards' shares sum to the global loss
        "loss/kl": sum(s["loss/kl"] for s in stats) / steps,
        "policy/entropy": sum(s["entropy"] for s in stats) / steps,  # 0 unless entropy_coef > 0
        "policy/clip_frac": sum(s["clipped"] for s in stats) / max(tokens, 1.0),
        "policy/approx_kl": sum(s["approx_kl"] for s in stats) / max(tokens, 1.0),
        "policy/first_ratio_max_dev": max(s["first/ratio_max_dev"] for s in stats),
        "policy/tis_weight": sum(s["tis_sum"] for s in stats) / max(tokens, 1.0),
        "policy/tis_capped_frac": sum(s["tis_capped"] for s in stats) / max(tokens, 1.0),
        "policy/first_kl": max(s["first/policy_kl"] for s in stats),
        "train/grad_norm": stats[0]["grad_norm"],
        "train/lr": stats[0]["lr"],
        "train/optimizer_steps": steps,
        # where rank 0's train phase went (the slowest rank sets the phase; ranks run the same shapes)
        "train/forward_s": stats[0]["forward_s"],
        "train/backward_s": stats[0]["backward_s"],
        "train/optimizer_s": stats[0]["optimizer_s"],
    }
