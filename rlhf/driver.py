"""The single-controller RL loop.

    setup:     config -> dataset, tokenizer, reward functions -> Ray actors (rlhf/topology.py)
               -> weight-sync group -> resume from a checkpoint, if asked
    each step: prompts -> rollout -> reward -> replay buffer -> old/reference log-probs, critic values
               -> advantages -> train (policy, critic) -> weight sync -> log -> eval -> checkpoint

GRPO as implemented here (Shao et al. 2024) keeps: n samples per prompt, group-normalised outcome
advantages, the PPO clipped surrogate, an optional k3 KL to a frozen reference in the loss. It
departs from the paper in two documented ways: the loss is aggregated token-mean over the
mini-batch by default (DAPO; `algorithm.loss_agg` selects the paper's seq-mean-token-mean), and
the "old" log-probs are the trainer's, not the generator's, so the first update's ratio is exactly 1
and the generator-vs-trainer log-prob gap is measured every step instead of silently entering the
loss. With several updates per batch (epochs, mini-batches) the trainer computes them in a pass of
their own; with one (`cfg.single_update`) they are its training forward's, detached, and the pass
is skipped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
import torch

from reward.api import RewardScorer, WeightedReward, load_reward_fn
from reward.model import ModelReward
from reward.remote import RemoteReward
from rlhf import checkpoint
from rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    EstimatorInputs,
    explained_variance,
    gae_returns,
    groups_with_signal,
    kl_penalty_rewards,
    masked_mean,
    whiten_over_mask,
)
from rlhf.config import RunConfig
from rlhf.data import PromptLoader, load_prompt_dataset
from rlhf.evaluation import evaluate
from rlhf.metrics import RunLog
from rlhf.shaping import mask_truncated, shape_rewards
from rlhf.topology import Topology, build_topology, resolve_device, teardown
from rlhf.types import Sample, SampleGroup, TrainBatch, collate
from rollout.generator import generate_groups
from weight_sync.service import GeneratorLost


def run(cfg: RunConfig, reward_fns: list[Callable[..., Any]] | None = None) -> dict[str, Any]:
    """Train `cfg`; extra Python reward callables join the configured ones with weight 1. Returns the summary."""
    if not ray.is_initialized():
        ray.init()
    device = resolve_device(cfg)

    # ---- setup ----
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = PromptLoader(load_prompt_dataset(cfg.data), tokenizer, cfg.data, cfg.seed)
    eval_prompts = []
    if cfg.eval.every:
        eval_set = load_prompt_dataset(cfg.eval.data)
        eval_prompts = PromptLoader(eval_set, tokenizer, cfg.eval.data, cfg.seed).next_batch(
            min(cfg.eval.num_prompts, len(eval_set)))
    rewards = [WeightedReward(r.fn, load_reward_fn(r.fn), r.weight) for r in cfg.reward.functions]  # fail fast
    rewards += [WeightedReward(f"remote.{i}", RemoteReward.from_config(r), r.weight)
                for i, r in enumerate(cfg.reward.remote)]
    rewards += [WeightedReward(getattr(fn, "__name__", repr(fn)), fn) for fn in reward_fns or []]
    resume_from = checkpoint.resume_path(cfg)
    log = RunLog(cfg)
    topo = build_topology(cfg, device, run_id=log.dir.name)
    a, group_size = cfg.algorithm, cfg.rollout.samples_per_prompt
    try:
        first_step = 1
        if resume_from is not None:  # trainer (and critic) state, prompt position; generators get the weights
            state = checkpoint.restore(topo, resume_from)
            loader.load_state_dict(state["loader"])
            topo.weight_sync.push(version=state["policy_version"])
            first_step = state["step"] + 1
            print(f"resumed from {resume_from} at step {first_step}", flush=True)
        if topo.reward_model is not None:
            rewards.append(WeightedReward("reward_model", ModelReward(topo.reward_model), cfg.reward.model.weight))
        scorer = RewardScorer(rewards, on_error=cfg.reward.on_error, penalty=cfg.reward.penalty,
                              timeout_s=cfg.reward.timeout_s, workers=cfg.reward.workers)
        for step in range(first_step, cfg.steps + 1):
            m: dict[str, float] = {}
            t_step = time.perf_counter()

            # 1-2. prompts -> rollout -> reward (DAPO's dynamic sampling: more rounds until every group has signal)
            groups = collect_groups(topo, loader, scorer, cfg, step, m)
            topo.buffer.put(groups)

            # 3. the trainer's ("old") and the reference's log-probs of the sampled tokens; the critic's values
            samples = [s for g in topo.buffer.take(len(groups)) for s in g.samples]
            batch = collate(samples, pad_id)
            if a.truncated == "mask":
                batch = mask_truncated(batch, samples)
            with timed(m, "logprobs"):
                old_logprobs = None if cfg.single_update else topo.trainer.compute_logprobs(batch)
                ref_logprobs = ray.get(topo.reference.compute_logprobs.remote(batch)) if topo.reference else None
                values = topo.critic.compute_values(batch) if topo.critic else None

            # 4. advantages (and the critic's targets)
            with timed(m, "advantages"):
                mask = batch.loss_mask
                token_rewards = None
                if a.kl_in_reward and ref_logprobs is not None:
                    token_rewards = kl_penalty_rewards(old_logprobs, ref_logprobs, mask, a.kl_coef, a.kl_estimator)
                rewards_t = torch.tensor([s.reward for s in samples], dtype=torch.float32)
                advantages = ADVANTAGE_ESTIMATORS[a.advantage](EstimatorInputs(
                    rewards=rewards_t, mask=mask, group_size=group_size, std_eps=a.std_eps, values=values,
                    token_rewards=token_rewards, gamma=a.gamma, lam=a.lam))
                returns = gae_returns(advantages, values, mask) if values is not None else None
                if a.normalize_advantages:
                    advantages = whiten_over_mask(advantages, mask, a.std_eps)
            batch = batch.with_(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
                                values=values, returns=returns)

            # 5. train: ppo_epochs x mini-batches, each an optimizer step; then the critic on the same batch
            with timed(m, "train"):
                m.update(topo.trainer.train(batch, step))
                if topo.critic:
                    m.update(topo.critic.train(batch, step))
                    m["critic/explained_var"] = explained_variance(values, returns, mask)

            # 6. weight sync: every generator serves the new policy version
            with timed(m, "sync"):
                m.update(push_weights(topo, version=step))

            # 7. log
            m.update(rollout_metrics(samples, batch, m["timing/generate_s"]))
            m["sync/gap_alarm"] = gap_alarm(m["sync/logprob_gap"], cfg.weight_sync.logprob_gap_alarm, step)
            m["fault/generator_restarts"] = float(topo.generator_restarts)
            m["buffer/groups"] = float(len(topo.buffer))
            m["buffer/staleness_max"] = float(step - 1 - m["rollout/policy_version"])  # versions behind the trainer

            # 8. evaluation on the held-out prompts, with the weights just pushed
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.steps):
                with timed(m, "eval"):
                    m.update(evaluate(topo.generators, scorer, eval_prompts, cfg, restart=topo.restart_generator))
            m["timing/step_s"] = time.perf_counter() - t_step
            # What no phase accounts for: batching, buffer, metrics, the driver's own Python.
            m["timing/idle_s"] = m["timing/step_s"] - sum(v for k, v in m.items() if k.startswith("timing/")
                                                          and k.endswith("_s") and k != "timing/step_s")
            log.log(step, m)

            # 9. checkpoint
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (
                    step == cfg.steps and cfg.checkpoint.save_final):
                print(f"checkpoint: {checkpoint.save(topo, cfg, step, loader.state_dict(), m)}", flush=True)
    except ray.exceptions.RayActorError as e:  # a trainer, critic or reference rank: the run cannot go on
        teardown(topo, graceful=False)
        found = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(cfg))
        raise RunFailed(f"{topo.role_of(e.actor_id)} died ({type(e).__name__}); the run stops. Resubmit with "
                        f"checkpoint.resume=auto to continue from "
                        f"{found[-1] if found else 'the start (no complete checkpoint yet)'}") from e
    except BaseException:
        teardown(topo, graceful=False)  # a failed sync may leave trainer rank 0 inside a broadcast
        raise
    teardown(topo)
    check_accounting(log.rows, loader.handed_out)
    return log.finish({"prompts_skipped_too_long": loader.skipped_too_long, "device": device,
                       "generator_restarts": topo.generator_restarts})


class RunFailed(RuntimeError):
    """An actor the run cannot replace (a trainer, critic or reference rank) died."""


def push_weights(topo: Topology, version: int) -> dict[str, float]:
    """Push `version` to every generator; one that dies meanwhile is replaced and the push repeated."""
    while True:
        try:
            return topo.weight_sync.push(version)
        except GeneratorLost as e:
            print(f"weight sync: {e}", flush=True)
            topo.restart_generator(e.index, push=False)


ACCOUNTS = ("taken", "trained", "filtered", "dropped")  # data/prompts_<account>, logged every step


def check_accounting(rows: list[dict[str, Any]], handed_out: int) -> None:
    """Every prompt the loader handed out ends trained, filtered or dropped, in exactly one step."""
    for r in rows:
        taken, trained, filtered, dropped = (r[f"data/prompts_{k}"] for k in ACCOUNTS)
        if taken != trained + filtered + dropped:
            raise AccountingError(f"step {r['step']}: prompts taken {taken:g} != trained {trained:g} + filtered "
                                  f"{filtered:g} + dropped {dropped:g}")
    taken = sum(r["data/prompts_taken"] for r in rows)
    if taken != handed_out:
        raise AccountingError(f"the loader handed out {handed_out} prompts but the steps account for {taken:g}")


class AccountingError(RuntimeError):
    """A prompt was lost or counted twice."""


def collect_groups(topo: Topology, loader: PromptLoader, scorer: RewardScorer, cfg: RunConfig, step: int,
                   m: dict[str, float]) -> list[SampleGroup]:
    """prompts_per_step scored groups. With dynamic sampling, groups whose rewards are all equal
    (no signal for a group baseline) are set aside and more prompts generated, up to
    max_sampling_rounds; if the batch is still short, set-aside groups fill it. Every prompt taken
    is counted: data/prompts_taken = data/prompts_trained + data/prompts_filtered."""
    a, want = cfg.algorithm, cfg.rollout.prompts_per_step
    kept: list[SampleGroup] = []
    set_aside: list[SampleGroup] = []
    taken = 0
    for round_ in range(a.max_sampling_rounds if a.dynamic_sampling else 1):
        prompts = loader.next_batch(want - len(kept))
        taken += len(prompts)
        with timed(m, "generate"):
            new = generate_groups(topo.generators, prompts, seed=cfg.seed * 1_000_003 + step * 10_007 + round_ * 101,
                                  restart=topo.restart_generator)
        with timed(m, "reward"):
            for key, value in scorer.score(new).items():  # failure counts add up over rounds; means are the last
                m[key] = m.get(key, 0.0) + value if key.endswith("failures") or "/failures/" in key else value
            m.update(shape_rewards([s for g in new for s in g.samples], a, cfg.rollout.max_new_tokens))
        if not a.dynamic_sampling:
            kept = new
            break
        rewards = torch.tensor([s.reward for g in new for s in g.samples])
        for g, signal in zip(new, groups_with_signal(rewards, cfg.rollout.samples_per_prompt).tolist()):
            (kept if signal else set_aside).append(g)
        if len(kept) == want:
            break
    filled = want - len(kept)
    kept += set_aside[:filled]
    m.update({"data/prompts_taken": float(taken), "data/prompts_trained": float(len(kept)),
              "data/prompts_filtered": float(taken - len(kept)), "data/prompts_dropped": 0.0,
              "data/filled_without_signal": float(filled)})
    return kept


def rollout_metrics(samples: list[Sample], batch: TrainBatch, generate_s: float) -> dict[str, float]:
    rewards = torch.tensor([s.reward for s in samples])
    lengths = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.float32)
    mask = batch.loss_mask
    m = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(samples) > 1 else 0.0,
        "rollout/samples": float(len(samples)),
        "rollout/completion_len": lengths.mean().item(),
        "rollout/truncated_frac": sum(s.truncated for s in samples) / len(samples),
        "rollout/tokens_per_s": lengths.sum().item() / max(generate_s, 1e-9),
        "rollout/policy_version": float(min(s.policy_version for s in samples)),
    }
    if batch.old_logprobs is not None:  # else the trainer measured both in its forward (cfg.single_update)
        # The trainer's and the generator's log-probs of the same tokens from the same weights.
        m["sync/logprob_gap"] = masked_mean((batch.old_logprobs - batch.rollout_logprobs).abs(), mask).item()
        if batch.ref_logprobs is not None:
            m["kl/ref"] = masked_mean(KL_ESTIMATORS["k3"](batch.old_logprobs, batch.ref_logprobs), mask).item()
    return m


def gap_alarm(gap: float, threshold: float, step: int) -> float:
    """1.0 (and a warning) when trainer and generator disagree on the sampled tokens' log-probs."""
    if gap <= threshold:
        return 0.0
    print(f"WARNING step {step}: trainer and generator log-probs differ by {gap:.3g} > "
          f"weight_sync.logprob_gap_alarm={threshold:g}: the generator may not serve the trainer's weights",
          flush=True)
    return 1.0


@contextlib.contextmanager
def timed(metrics: dict[str, float], phase: str) -> Iterator[None]:
    """Adds the block's seconds to metrics["timing/<phase>_s"] (a phase may run several times a step)."""
    t0 = time.perf_counter()
    yield
    key = f"timing/{phase}_s"
    metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - t0
