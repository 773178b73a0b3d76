"""The Ray topology of a run: every actor, named by role, placed by the config's resources.

    topo = build_topology(cfg, device, run_id)   # generators, trainer, critic, reference, weight sync
    ...
    teardown(topo)
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
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
    cfg: RunConfig
    device: str
    run_id: str
    generator_restarts: int = 0
    sync_lock: threading.RLock = field(default_factory=threading.RLock)  # pushes and generator replacements

    def restart_generator(self, i: int, push: bool = True) -> None:
        """Replace dead generator i: a new engine joins a new weight-sync group and (with `push`) gets
        the current weights, so what it generates next is stamped with the version the others serve."""
        with self.sync_lock:
            self._restart_generator(i, push)

    def _restart_generator(self, i: int, push: bool) -> None:
        self.generator_restarts += 1
        if self.generator_restarts > self.cfg.rollout.max_restarts:
            raise RuntimeError(f"generator-{i} died; {self.generator_restarts - 1} generator restarts already "
                               f"this run (rollout.max_restarts={self.cfg.rollout.max_restarts})")
        print(f"generator-{i} died: starting a new one (restart {self.generator_restarts} of "
              f"{self.cfg.rollout.max_restarts})", flush=True)
        with contextlib.suppress(Exception):
            ray.kill(self.generators[i], no_restart=True)
        self.generators[i] = _start_generator(self.cfg, self.device, self.run_id, i)
        self.weight_sync.reconnect()
        if push:
            self.weight_sync.push(self.weight_sync.version)

    def role_of(self, actor_id: str | None) -> str:
        """The role of the actor with this hex id ("trainer-rank-0", ...), for error messages."""
        named = {f"generator-{i}": g for i, g in enumerate(self.generators)}
        named.update({f"trainer-rank-{i}": r for i, r in enumerate(self.trainer.ranks)})
        named.update({f"critic-rank-{i}": r for i, r in enumerate(self.critic.ranks if self.critic else [])})
        named.update({"reference": self.reference, "reward-model": self.reward_model})
        for role, actor in named.items():
            if actor is not None and actor._actor_id.hex() == actor_id:
                return role
        return "an actor"


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
    generators = [_start_generator(cfg, device, run_id, i) for i in range(cfg.rollout.num_generators)]
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
        # Scoring is idempotent: Ray restarts a dead reward model and retries the call on the new one.
        reward_model = RewardModel.options(name=f"{run_id}:reward-model", num_cpus=r.reward_model_cpus,
                                           num_gpus=r.reward_model_gpus if gpu else 0,
                                           max_restarts=cfg.reward.model.max_restarts,
                                           max_task_retries=cfg.reward.model.max_restarts).remote(cfg, device)
        created.append(reward_model)
    backend = cfg.weight_sync.backend if cfg.weight_sync.backend != "auto" else ("nccl" if gpu else "gloo")
    weight_sync = WeightSyncService(ranks, generators, cfg.weight_sync, backend)
    weight_sync.connect()
    buffer = ReplayBuffer(capacity_groups=cfg.buffer_capacity)
    return Topology(generators, trainer, critic, reference, reward_model, weight_sync, buffer, cfg, device, run_id)


def _start_generator(cfg: RunConfig, device: str, run_id: str, i: int) -> Any:
    r = cfg.resources
    options = dict(name=f"{run_id}:generator-{i}", num_cpus=r.generator_cpus,
                   num_gpus=r.generator_gpus if device == "cuda" else 0,
                   runtime_env={"env_vars": generator_env(cfg, device)})
    deadline = time.monotonic() + 30
    while True:
        try:
            return Generator.options(**options).remote(i, cfg, device)
        except ValueError:  # a dead actor's name is released asynchronously
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


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
