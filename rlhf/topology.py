"""The Ray topology of a run: every actor, named by role, placed by the config's resources.

    topo = build_topology(cfg, device, run_id)   # generators, trainer, critic, reference, weight sync
    ...
    teardown(topo)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import ray

from actors.critic import CriticGroup, CriticTrainer
from actors.reference import Reference
from actors.trainer import PolicyTrainer, TrainerGroup
from reward.model import RewardModel
from rlhf.buffer import ReplayBuffer
from rlhf.config import RunConfig
from rollout.generator import Generator, generator_env
from weight_sync.service import WeightSyncService


class ResourceError(RuntimeError):
    """The Ray cluster cannot host the actors the config asks for."""


@dataclass
class Topology:
    generators: list[Any]  # Generator actors, one vLLM engine each
    trainer: TrainerGroup  # the policy's DeepSpeed ranks
    critic: CriticGroup | None  # the value model's DeepSpeed ranks, when the estimator needs one (gae)
    reference: Any | None  # Reference actor, when kl_coef > 0
    reward_model: Any | None  # reward.model.RewardModel actor, when reward.model.path is set
    weight_sync: WeightSyncService
    buffer: ReplayBuffer


def resolve_device(cfg: RunConfig) -> str:
    if cfg.resources.device != "auto":
        return cfg.resources.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def check_resources(cfg: RunConfig, device: str) -> None:
    """Refuse, naming the shortfall, a config whose actors the cluster could never place (Ray would wait forever)."""
    r, ranks = cfg.resources, cfg.train.ranks
    roles = [("generators", cfg.rollout.num_generators, r.generator_cpus, r.generator_gpus),
             ("trainer ranks", ranks, r.trainer_cpus, r.trainer_gpus)]
    if cfg.uses_reference:
        roles.append(("reference", 1, r.reference_cpus, r.reference_gpus))
    if cfg.uses_critic:
        roles.append(("critic ranks", ranks, r.critic_cpus, r.critic_gpus))
    if cfg.reward.model.path:
        roles.append(("reward model", 1, r.reward_model_cpus, r.reward_model_gpus))
    have = ray.cluster_resources()
    for kind, col in (("CPU", 2), ("GPU", 3)):
        if kind == "GPU" and device != "cuda":
            continue
        need = sum(role[1] * role[col] for role in roles)
        if need > have.get(kind, 0.0) + 1e-9:
            parts = " + ".join(f"{role[1]} {role[0]} x {role[col]:g}" for role in roles)
            raise ResourceError(f"the run needs {need:g} {kind}s ({parts}) but the Ray cluster has "
                                f"{have.get(kind, 0.0):g}; lower resources.* or add nodes")


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
    created += generators
    ranks = _deepspeed_ranks(PolicyTrainer, "trainer-rank", cfg, device, run_id, r.trainer_cpus, r.trainer_gpus,
                             created)
    trainer = TrainerGroup(ranks, cfg)
    critic = None
    if cfg.uses_critic:
        critic = CriticGroup(_deepspeed_ranks(CriticTrainer, "critic-rank", cfg, device, run_id, r.critic_cpus,
                                              r.critic_gpus, created), cfg)
    reference = None
    if cfg.uses_reference:
        reference = Reference.options(name=f"{run_id}:reference", num_cpus=r.reference_cpus,
                                      num_gpus=r.reference_gpus if gpu else 0).remote(cfg, device)
        created.append(reference)
    reward_model = None
    if cfg.reward.model.path:
        reward_model = RewardModel.options(name=f"{run_id}:reward-model", num_cpus=r.reward_model_cpus,
                                           num_gpus=r.reward_model_gpus if gpu else 0).remote(cfg, device)
        created.append(reward_model)
    backend = cfg.weight_sync.backend if cfg.weight_sync.backend != "auto" else ("nccl" if gpu else "gloo")
    weight_sync = WeightSyncService(ranks, generators, cfg.weight_sync, backend)
    weight_sync.connect()
    buffer = ReplayBuffer(capacity_groups=2 * cfg.rollout.prompts_per_step)
    return Topology(generators, trainer, critic, reference, reward_model, weight_sync, buffer)


def _deepspeed_ranks(actor: Any, role: str, cfg: RunConfig, device: str, run_id: str, cpus: float, gpus: float,
                     created: list[Any]) -> list[Any]:
    """cfg.train.ranks actors of one DeepSpeed group, set up together around rank 0's rendezvous."""
    gpu = device == "cuda"
    ranks = [actor.options(name=f"{run_id}:{role}-{i}", num_cpus=cpus, num_gpus=gpus if gpu else 0).remote(
        cfg, i, cfg.train.ranks, device) for i in range(cfg.train.ranks)]
    created += ranks
    master_addr, master_port = ray.get(ranks[0].rendezvous_endpoint.remote())
    ray.get([rank.setup.remote(master_addr, master_port) for rank in ranks])
    return ranks


def teardown(topo: Topology, graceful: bool = True) -> None:
    if graceful:
        with contextlib.suppress(Exception):
            topo.weight_sync.close()
    for actor in [*topo.generators, *topo.trainer.ranks, *(topo.critic.ranks if topo.critic else []),
                  topo.reference, topo.reward_model]:
        if actor is not None:
            ray.kill(actor)
