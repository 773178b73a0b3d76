"""The single-controller RL loop.

    setup:     config -> dataset, tokenizer, reward functions -> Ray actors (rlhf/topology.py)
               -> weight-sync group -> resume from a checkpoint, if asked
    each step: a batch from the replay buffer (rlhf/rollouts.py: prompts -> generators -> rewards,
               group by group) -> old/reference log-probs, critic values -> advantages
               -> train (policy, critic) -> weight sync -> log -> eval -> checkpoint

rollout.mode=sync generates each step's batch on the weights just pushed; rollout.mode=async keeps
the generators producing while the trainer trains, with samples at most rollout.max_staleness
versions old, and the loss corrects for the older policy by truncated importance sampling
(algorithm.tis_cap; the generator's log-probs are stored with every sample).

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
import functools
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
    EstimatorInputs,
    explained_variance,
    gae_returns,
    kl_penalty_rewards,
    whiten_over_mask,
)
from rlhf.config import RunConfig
from rlhf.data import PromptLoader, load_prompt_dataset
from rlhf.evaluation import evaluate
from rlhf.metrics import RunLog
from rlhf.rollouts import RolloutStream
from rlhf.shaping import mask_truncated
from rlhf.topology import Topology, TopologyPool, build_topology, resolve_device, teardown
from rlhf.types import Sample, collate
from weight_sync.service import GeneratorLost


def run(cfg: RunConfig, reward_fns: list[Callable[..., Any]] | None = None,
        topologies: TopologyPool | None = None) -> dict[str, Any]:
    """Train `cfg`; extra Python reward callables join the configured ones with weight 1. Returns the summary.
    With `topologies`, the run takes its actors from the pool (a kept topology of the same shape, reset) and
    gives them back when it ends well."""
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
    topo = topologies.take(cfg, device, log.dir.name) if topologies else build_topology(cfg, device, log.dir.name)
    if cfg.resources.colocate and device == "cpu":
        print("resources.colocate on CPU: weights move through shared memory; vLLM has no sleep mode on CPU, so "
              "the generators keep their KV cache while the trainer trains", flush=True)
    a, group_size = cfg.algorithm, cfg.rollout.samples_per_prompt
    stream = None
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
                              environment=bool(cfg.env.cls),
                              timeout_s=cfg.reward.timeout_s, workers=cfg.reward.workers)
        stream = RolloutStream(topo, loader, scorer, cfg, first_step)
        eval_start = {}
        if cfg.eval.every and first_step == 1:  # the policy before any update: what the run's evals compare with
            eval_start = evaluate(topo.generators, scorer, eval_prompts, cfg, restart=topo.restart_generator)
            print(f"eval before training: reward {eval_start['eval/reward/mean']:.3f}", flush=True)
        for step in range(first_step, cfg.steps + 1):
            m: dict[str, float] = {}
            t_step = time.perf_counter()

            # 1-2. prompts -> rollout -> reward -> replay buffer, group by group; a batch comes out
            # (DAPO's dynamic sampling: groups without signal are filtered and replaced)
            groups, rollout = stream.next_batch(step)
            m.update(rollout.metrics())
            topo.colocated_sleep()  # colocated on GPU: the generators' memory goes to the trainer

            # 3. the trainer's ("old") and the reference's log-probs of the sampled tokens; the critic's values
            samples = [s for g in groups for s in g.samples]
            staleness = torch.tensor([step - 1 - s.policy_version for s in samples], dtype=torch.float32)
            batch = collate(samples, pad_id).with_(staleness=staleness)
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
                # colocated: weights wake, push, the trainer's cache is released, then the KV cache wakes
                m.update(topo.colocated_push(functools.partial(push_weights, topo, version=step)))
            stream.weights_pushed()
            if step == cfg.steps:
                rollout = rollout.ended(stream.stop())  # what is still in flight is counted as dropped
                m.update(rollout.metrics())

            # 7. log
            m.update(rollout_metrics(samples, rollout.generation_s))
            if "sync/logprob_gap" in m:  # absent when no sample of the batch came from the trainer's weights
                m["sync/gap_alarm"] = gap_alarm(m["sync/logprob_gap"], cfg.gap_alarm, step,
                                                cfg.weight_sync.on_gap_alarm == "raise")
            m["fault/generator_restarts"] = float(topo.generator_restarts)
            m["buffer/staleness_max"] = staleness.max().item()  # versions behind the trainer
            m["buffer/staleness_mean"] = staleness.mean().item()

            # 8. evaluation on the held-out prompts, with the weights just pushed
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.steps):
                with timed(m, "eval"):
                    m.update(evaluate(topo.generators, scorer, eval_prompts, cfg, restart=topo.restart_generator))
            m["timing/step_s"] = time.perf_counter() - t_step
            # What no phase accounts for: batching, buffer, metrics, the driver's own Python.
            m["timing/idle_s"] = m["timing/step_s"] - sum(v for k, v in m.items() if k.startswith("timing/")
                                                          and k.endswith("_s") and k != "timing/step_s")
            log.log(step, m)
            log.log_samples(step, samples)  # what the model wrote: samples.jsonl, wandb's `samples` table

            # 9. checkpoint
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (
                    step == cfg.steps and cfg.checkpoint.save_final):
                print(f"checkpoint: {checkpoint.save(topo, cfg, step, stream.loader_state(), m)}", flush=True)
    except ray.exceptions.RayActorError as e:  # a trainer, critic or reference rank: the run cannot go on
        if stream is not None:
            stream.halt()
        teardown(topo, graceful=False)
        found = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(cfg))
        raise RunFailed(f"{topo.role_of(e.actor_id)} died ({type(e).__name__}); the run stops. Resubmit with "
                        f"checkpoint.resume=auto to continue from "
                        f"{found[-1] if found else 'the start (no complete checkpoint yet)'}") from e
    except BaseException:
        if stream is not None:
            stream.halt()
        teardown(topo, graceful=False)  # a failed sync may leave trainer rank 0 inside a broadcast
        raise
    if topologies:
        topologies.give_back(topo)
    else:
        teardown(topo)
    check_accounting(log.rows, loader.handed_out)
    evals = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in log.rows if "eval/reward/mean" in r]
    return log.finish({"eval_start": eval_start, "eval_end": evals[-1] if evals else {},
                       "prompts_skipped_too_long": loader.skipped_too_long, "device": device,
                       "generator_restarts": topo.generator_restarts, "weight_sync_backend": topo.weight_sync.backend})


class RunFailed(RuntimeError):
    """An actor the run cannot replace (a trainer, critic or reference rank) died."""


def push_weights(topo: Topology, version: int) -> dict[str, float]:
    """Push `version` to every generator; one that dies meanwhile is replaced and the push repeated."""
    with topo.sync_lock:  # async mode: the rollout stream may be replacing a generator meanwhile
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


def rollout_metrics(samples: list[Sample], generate_s: float) -> dict[str, float]:
    rewards = torch.tensor([s.reward for s in samples])
    lengths = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.float32)
    m = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(samples) > 1 else 0.0,
        "rollout/samples": float(len(samples)),
        "rollout/completion_len": lengths.mean().item(),
        "rollout/truncated_frac": sum(s.truncated for s in samples) / len(samples),
        "rollout/tokens_per_s": lengths.sum().item() / max(generate_s, 1e-9),
        "rollout/policy_version": float(min(s.policy_version for s in samples)),
    }
    episodes = [s.episode for s in samples if s.episode is not None]
    if episodes:  # multi-turn rollouts
        from rollout.agent import episode_metrics

        m.update(episode_metrics(episodes))
    return m  # the trainer-vs-generator gap and kl/ref come from the objective (rlhf/algorithms/objective.py)


def gap_alarm(gap: float, threshold: float, step: int, stop: bool) -> float:
    """1.0 (and a warning, or with `stop` a WeightDesync) when trainer and generator disagree on the
    sampled tokens' log-probs by more than `threshold`."""
    if gap <= threshold:
        return 0.0
    message = (f"step {step}: trainer and generator log-probs differ by {gap:.3g} > weight_sync.logprob_gap_alarm="
               f"{threshold:g}: the generator does not serve the trainer's weights")
    if stop:
        raise WeightDesync(message + " (weight_sync.on_gap_alarm=raise)")
    print(f"WARNING {message}", flush=True)
    return 1.0


class WeightDesync(RuntimeError):
    """The generators sample from other weights than the trainer's (weight_sync.on_gap_alarm=raise)."""


@contextlib.contextmanager
def timed(metrics: dict[str, float], phase: str) -> Iterator[None]:
    """Adds the block's seconds to metrics["timing/<phase>_s"] (a phase may run several times a step)."""
    t0 = time.perf_counter()
    yield
    key = f"timing/{phase}_s"
    metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - t0
