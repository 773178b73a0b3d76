"""The single-controller RL loop.

    setup:     config -> dataset, tokenizer, reward functions -> Ray actors -> weight-sync group
    each step: prompts -> rollout -> reward -> replay buffer -> old/reference log-probs
               -> advantages -> train -> weight sync -> log

GRPO as implemented here (Shao et al. 2024) keeps: n samples per prompt, group-normalised outcome
advantages, the PPO clipped surrogate, an optional k3 KL to a frozen reference in the loss. It
departs from the paper in two documented ways: the loss is aggregated token-mean over the
mini-batch by default (DAPO; `algorithm.loss_agg` selects the paper's seq-mean-token-mean), and
the "old" log-probs are recomputed by the trainer before its first update rather than taken from
the generator, so the first update's ratio is exactly 1 and the generator-vs-trainer log-prob
gap is measured every step instead of silently entering the loss.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.reference import Reference
from actors.trainer import PolicyTrainer, TrainerGroup
from reward.api import RewardScorer, WeightedReward, load_reward_fn
from rlhf.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, EstimatorInputs, masked_mean
from rlhf.buffer import ReplayBuffer
from rlhf.config import RunConfig
from rlhf.data import PromptLoader, load_prompt_dataset
from rlhf.metrics import RunLog
from rlhf.types import Prompt, Sample, SampleGroup, TrainBatch, collate
from rollout.generator import Generator, generator_env
from weight_sync.service import WeightSyncService


class ResourceError(RuntimeError):
    """The Ray cluster cannot host the actors the config asks for."""


@dataclass
class Topology:
    generators: list[Any]  # Generator actors, one vLLM engine each
    trainer: TrainerGroup  # the DeepSpeed ranks
    reference: Any | None  # Reference actor, None when kl_coef == 0
    weight_sync: WeightSyncService
    buffer: ReplayBuffer


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
    rewards = [WeightedReward(r.fn, load_reward_fn(r.fn), r.weight) for r in cfg.reward.functions]
    rewards += [WeightedReward(getattr(fn, "__name__", repr(fn)), fn) for fn in reward_fns or []]
    scorer = RewardScorer(rewards)
    log = RunLog(cfg)
    topo = build_topology(cfg, device, run_id=log.dir.name)
    a, group_size = cfg.algorithm, cfg.rollout.samples_per_prompt
    try:
        for step in range(1, cfg.steps + 1):
            m: dict[str, float] = {}
            t_step = time.perf_counter()

            # 1. prompts -> rollout: samples_per_prompt completions of each prompt
            prompts = loader.next_batch(cfg.rollout.prompts_per_step)
            with timed(m, "generate"):
                groups = generate(topo.generators, prompts, seed=cfg.seed * 1_000_003 + step * 10_007)

            # 2. reward, then into the replay buffer
            with timed(m, "reward"):
                m.update(scorer.score(groups))
            topo.buffer.put(groups)

            # 3. the trainer's ("old") and the reference's log-probs of the sampled tokens
            samples = [s for g in topo.buffer.take(cfg.rollout.prompts_per_step) for s in g.samples]
            batch = collate(samples, pad_id)
            with timed(m, "logprobs"):
                old_logprobs = topo.trainer.compute_logprobs(batch)
                ref_logprobs = ray.get(topo.reference.compute_logprobs.remote(batch)) if topo.reference else None

            # 4. advantages
            with timed(m, "advantages"):
                rewards_t = torch.tensor([s.reward for s in samples], dtype=torch.float32)
                advantages = ADVANTAGE_ESTIMATORS[a.advantage](
                    EstimatorInputs(rewards=rewards_t, mask=batch.loss_mask, group_size=group_size,
                                    std_eps=a.std_eps, gamma=a.gamma, lam=a.lam))
            batch = batch.with_(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages)

            # 5. train: ppo_epochs x mini-batches, each an optimizer step
            with timed(m, "train"):
                m.update(topo.trainer.train(batch, step))

            # 6. weight sync: every generator serves the new policy version
            with timed(m, "sync"):
                m.update(topo.weight_sync.push(version=step))

            # 7. log
            m.update(rollout_metrics(samples, batch, m["timing/generate_s"]))
            m["sync/gap_alarm"] = gap_alarm(m["sync/logprob_gap"], cfg.weight_sync.logprob_gap_alarm, step)
            m["timing/step_s"] = time.perf_counter() - t_step
            log.log(step, m)
    except BaseException:
        teardown(topo, graceful=False)  # a failed sync may leave trainer rank 0 inside a broadcast
        raise
    teardown(topo)
    return log.finish({"prompts_skipped_too_long": loader.skipped_too_long, "device": device})


def generate(generators: list[Any], prompts: list[Prompt], seed: int, greedy: bool = False) -> list[SampleGroup]:
    """Split the prompts over the generators; groups come back in prompt order."""
    n = len(generators)
    bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
    parts = ray.get([g.generate.remote(prompts[bounds[i]:bounds[i + 1]], seed, greedy)
                     for i, g in enumerate(generators)])
    return [group for part in parts for group in part]


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
        # The trainer's and the generator's log-probs of the same tokens from the same weights.
        "sync/logprob_gap": masked_mean((batch.old_logprobs - batch.rollout_logprobs).abs(), mask).item(),
    }
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
    t0 = time.perf_counter()
    yield
    metrics[f"timing/{phase}_s"] = time.perf_counter() - t0


# ---- the Ray topology ----

def resolve_device(cfg: RunConfig) -> str:
    if cfg.resources.device != "auto":
        return cfg.resources.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def check_resources(cfg: RunConfig, device: str) -> None:
    """Refuse, naming the shortfall, a config whose actors the cluster could never place (Ray would wait forever)."""
    r = cfg.resources
    with_ref = cfg.algorithm.kl_coef > 0
    kinds = [("CPU", r.generator_cpus, r.trainer_cpus, r.reference_cpus)]
    if device == "cuda":
        kinds.append(("GPU", r.generator_gpus, r.trainer_gpus, r.reference_gpus))
    have = ray.cluster_resources()
    for kind, gen, trn, ref in kinds:
        need = cfg.rollout.num_generators * gen + cfg.train.ranks * trn + (ref if with_ref else 0.0)
        if need > have.get(kind, 0.0) + 1e-9:
            raise ResourceError(
                f"the run needs {need:g} {kind}s ({cfg.rollout.num_generators} generators x {gen:g} + "
                f"{cfg.train.ranks} trainer ranks x {trn:g}" + (f" + reference {ref:g}" if with_ref else "") +
                f") but the Ray cluster has {have.get(kind, 0.0):g}; lower resources.* or add nodes")


def build_topology(cfg: RunConfig, device: str, run_id: str) -> Topology:
    """Every actor of the run, named by role so the Ray dashboard shows who is who."""
    check_resources(cfg, device)
    created: list[Any] = []  # killed again if a later actor fails to start
    try:
        return _build(cfg, device, run_id, created)
    except BaseException:
        for actor in created:
            ray.kill(actor)
        raise


def _build(cfg: RunConfig, device: str, run_id: str, created: list[Any]) -> Topology:
    r, gpu = cfg.resources, device == "cuda"
    generators = [
        Generator.options(name=f"{run_id}:generator-{i}", num_cpus=r.generator_cpus,
                          num_gpus=r.generator_gpus if gpu else 0,
                          runtime_env={"env_vars": generator_env(cfg, device)}).remote(i, cfg, device)
        for i in range(cfg.rollout.num_generators)
    ]
    ranks = [PolicyTrainer.options(name=f"{run_id}:trainer-rank-{i}", num_cpus=r.trainer_cpus,
                                   num_gpus=r.trainer_gpus if gpu else 0).remote(cfg, i, cfg.train.ranks, device)
             for i in range(cfg.train.ranks)]
    created += generators + ranks
    master_addr, master_port = ray.get(ranks[0].rendezvous_endpoint.remote())
    ray.get([rank.setup.remote(master_addr, master_port) for rank in ranks])
    trainer = TrainerGroup(ranks, cfg)
    reference = None
    if cfg.algorithm.kl_coef > 0:
        reference = Reference.options(name=f"{run_id}:reference", num_cpus=r.reference_cpus,
                                      num_gpus=r.reference_gpus if gpu else 0).remote(cfg, device)
        created.append(reference)
    backend = cfg.weight_sync.backend if cfg.weight_sync.backend != "auto" else ("nccl" if gpu else "gloo")
    weight_sync = WeightSyncService(ranks, generators, cfg.weight_sync, backend)
    weight_sync.connect()
    buffer = ReplayBuffer(capacity_groups=2 * cfg.rollout.prompts_per_step)
    return Topology(generators, trainer, reference, weight_sync, buffer)


def teardown(topo: Topology, graceful: bool = True) -> None:
    if graceful:
        with contextlib.suppress(Exception):
            topo.weight_sync.close()
    for actor in [*topo.generators, *topo.trainer.ranks, topo.reference]:
        if actor is not None:
            ray.kill(actor)
