"""The Ray topology of a run: every actor, named by role, placed by the config's resources.

    topo = build_topology(cfg, device, run_id)   # generators, trainer, critic, reference, weight sync
    ...
    teardown(topo)

or, for runs of one shape one after another (a sweep, a test session), TopologyPool: the actors start
once and each run resets them.

Before any actor starts, the plan (rlhf/plan.py) estimates every actor's memory and refuses what
cannot fit; then every role gets a Ray placement group, one bundle per actor (PACK or SPREAD, on the
nodes that advertise the role's custom resource), and each actor is pinned to its bundle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.critic import CriticGroup, CriticTrainer
from actors.reference import Reference
from actors.trainer import PolicyTrainer, TrainerGroup
from reward.model import RewardModel
from rlhf.buffer import ReplayBuffer
from rlhf.config import RunConfig
from rlhf.plan import ActorPlan, plan_run, strategy, sync_backend
from rollout.generator import Generator, generator_env
from weight_sync.service import WeightSyncService


class ResourceError(RuntimeError):
    """The Ray cluster cannot host the actors the config asks for."""


@dataclass
class Placement:
    """Each role's placement group (absent for a role whose actors ask for no resources) and bundles."""

    groups: dict[str, Any]  # kind -> PlacementGroup
    bundles: dict[str, list[dict[str, float]]]  # kind -> one bundle per actor
    alias: dict[str, str] = field(default_factory=dict)  # colocated: "generator" -> "trainer"

    def options(self, kind: str, index: int) -> dict[str, Any]:
        """Ray actor options that put actor `index` of role `kind` into its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        kind = self.alias.get(kind, kind)
        if kind in self.groups:
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.groups[kind], placement_group_bundle_index=index)}
        bundles = self.bundles.get(kind, [])
        custom = {k: v for k, v in bundles[index].items() if k not in ("CPU", "GPU")} if index < len(bundles) else {}
        return {"resources": custom} if custom else {}

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups.values():
            with contextlib.suppress(Exception):
                remove_placement_group(pg)


def reserve_placement(cfg: RunConfig, run_id: str, plans: list[ActorPlan], timeout_s: float = 60.0) -> Placement:
    """A placement group per role, ready (its bundles reserved on the nodes) before any actor starts."""
    from ray.util.placement_group import placement_group

    bundles: dict[str, list[dict[str, float]]] = {}
    for p in plans:
        bundles.setdefault(p.kind, []).append(p.bundle)
    placement = Placement({}, bundles, {"generator": "trainer"} if cfg.resources.colocate else {})
    try:
        for kind, kind_bundles in bundles.items():
            if all(kind_bundles):  # Ray refuses empty bundles; a role asking for nothing is placed freely
                placement.groups[kind] = placement_group(kind_bundles, strategy=strategy(cfg, kind),
                                                         name=f"{run_id}:{kind}")
        for kind, pg in placement.groups.items():
            ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
            if not ready:
                raise ResourceError(f"the {kind} placement group {bundles[kind]} ({strategy(cfg, kind)}) could not "
                                    f"be placed within {timeout_s:g} s: the cluster has no room for it")
    except BaseException:
        placement.remove()
        raise
    return placement


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
    placement: Placement | None = None

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
        self.generators[i] = _start_generator(self.cfg, self.device, self.run_id, i, self.placement)
        wait_started([self.generators[i]], [f"generator-{i}"])
        self.weight_sync.reconnect()
        if push:
            self.weight_sync.push(self.weight_sync.version)

    def colocated_sleep(self) -> None:
        """resources.colocate: generators free their device memory while the trainer trains. A no-op
        where vLLM has no sleep mode (CPU)."""
        if self.cfg.resources.colocate:
            ray.get([g.sleep.remote() for g in self.generators])

    def colocated_push(self, push: Callable[[], dict[str, float]]) -> dict[str, float]:
        """push() with the colocated generators woken around it (push_after_wake)."""
        if not self.cfg.resources.colocate:
            return push()

        def wake(tags: list[str]) -> None:
            ray.get([g.wake_up.remote(tags) for g in self.generators])

        def release() -> None:
            ray.get([r.release_cached_memory.remote() for r in self.trainer.ranks])

        return push_after_wake(wake, push, release)

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


def push_after_wake(wake: Callable[[list[str]], None], push: Callable[[], dict[str, float]],
                    release_trainer_memory: Callable[[], None]) -> dict[str, float]:
    """The colocated push, in veRL's order: the generators' weights come back (the push writes into
    them), the push, the trainer hands its cached blocks (activations, gradients' buckets, the step's
    temporaries) back to the device, and only then the KV cache comes back, into the room that frees.
    Waking both at once would need the KV cache's memory while the trainer still holds its cache."""
    wake(["weights"])
    metrics = push()
    release_trainer_memory()
    wake(["kv_cache"])
    return metrics


def start_roles(colocated_gpu: bool, start_generators: Callable[[], list[Any]],
                wait_started: Callable[[list[Any]], None], sleep: Callable[[list[Any]], None],
                start_others: Callable[[], Any], wake: Callable[[list[Any]], None]) -> tuple[list[Any], Any]:
    """(generators, what start_others returns: the trainer and the other roles), started in the order
    their devices allow.

    Apart, the engines load while the trainer ranks and the other models set up. Colocated on a GPU,
    vLLM's start-up measures the whole device (it refuses to start when less than gpu_memory_utilization
    of it is free, vllm.v1.worker.utils.request_memory, and sizes the KV cache from what its profile saw),
    so a trainer allocating meanwhile makes it fail or shrink at random. There the generators start
    first and go to sleep (weights to host memory, KV cache freed), the others set up on the freed
    device, and the generators wake for the first rollout (as OpenRLHF does)."""
    generators = start_generators()
    if colocated_gpu:
        wait_started(generators)
        sleep(generators)
    others = start_others()
    wait_started(generators)  # apart: the engines loaded meanwhile
    if colocated_gpu:
        wake(generators)
    return generators, others


def resolve_device(cfg: RunConfig) -> str:
    if cfg.resources.device != "auto":
        return cfg.resources.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def check_resources(cfg: RunConfig, device: str) -> None:
    """Refuse, naming the shortfall, a config whose actors the cluster could never place (Ray would wait forever)."""
    r, ranks = cfg.resources, cfg.train.ranks
    engine_gpus = r.generator_gpus * cfg.rollout.tensor_parallel_size  # generator_gpus per tensor-parallel worker
    roles = [("generators", cfg.rollout.num_generators, r.generator_cpus, engine_gpus),
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
    placement = reserve_placement(cfg, run_id, plan_run(cfg, device))  # the plan refuses what cannot fit
    created: list[Any] = []  # killed again if a later actor fails to start
    try:
        return _build(cfg, device, run_id, created, placement)
    except BaseException:
        for actor in created:
            ray.kill(actor)
        placement.remove()
        raise


def _build(cfg: RunConfig, device: str, run_id: str, created: list[Any], placement: Placement) -> Topology:
    r, gpu = cfg.resources, device == "cuda"

    def start_generators() -> list[Any]:
        started = [_start_generator(cfg, device, run_id, i, placement) for i in range(cfg.rollout.num_generators)]
        created.extend(started)
        return started

    def start_others() -> tuple[TrainerGroup, CriticGroup | None, Any, Any]:
        trainer = TrainerGroup(_deepspeed_ranks(PolicyTrainer, "trainer", cfg, device, run_id, r.trainer_cpus,
                                                r.trainer_gpus, created, placement), cfg)
        critic = None
        if cfg.uses_critic:
            critic = CriticGroup(_deepspeed_ranks(CriticTrainer, "critic", cfg, device, run_id, r.critic_cpus,
                                                  r.critic_gpus, created, placement), cfg)
        reference = None
        if cfg.uses_reference:
            reference = Reference.options(name=f"{run_id}:reference", num_cpus=r.reference_cpus,
                                          num_gpus=r.reference_gpus if gpu else 0,
                                          **placement.options("reference", 0)).remote(cfg, device)
            created.append(reference)
        reward_model = None
        if cfg.reward.model.path:
            # Scoring is idempotent: Ray restarts a dead reward model and retries the call on the new one.
            reward_model = RewardModel.options(name=f"{run_id}:reward-model", num_cpus=r.reward_model_cpus,
                                               num_gpus=r.reward_model_gpus if gpu else 0,
                                               max_restarts=cfg.reward.model.max_restarts,
                                               max_task_retries=cfg.reward.model.max_restarts,
                                               **placement.options("reward_model", 0)).remote(cfg, device)
            created.append(reward_model)
        models = {name: a for name, a in (("reference", reference), ("reward-model", reward_model)) if a is not None}
        if gpu and cfg.resources.colocate and models:  # they allocate in their constructors: before the engines wake
            wait_started(list(models.values()), list(models))
        return trainer, critic, reference, reward_model

    generators, (trainer, critic, reference, reward_model) = start_roles(
        r.colocate and gpu, start_generators,
        lambda gs: wait_started(gs, [f"generator-{i}" for i in range(len(gs))]),
        lambda gs: ray.get([g.sleep.remote() for g in gs]),
        start_others,
        lambda gs: ray.get([g.wake_up.remote() for g in gs]))
    ranks = trainer.ranks
    weight_sync = WeightSyncService(ranks, generators, cfg.weight_sync, sync_backend(cfg, device))
    weight_sync.connect()
    buffer = ReplayBuffer(capacity_groups=cfg.buffer_capacity)
    return Topology(generators, trainer, critic, reference, reward_model, weight_sync, buffer, cfg, device, run_id,
                    placement=placement)


def wait_started(actors: list[Any], names: list[str], timeout_s: float = 600.0) -> None:
    """Block until the actors' constructors (vLLM engine start-up: 10-40 s on CPU) have run; a
    constructor that failed raises here, naming the actor. Weight-sync deadlines start after this."""
    refs = {a.__ray_ready__.remote(): name for a, name in zip(actors, names)}
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    if pending:
        raise ResourceError(f"{', '.join(refs[r] for r in pending)} did not start within {timeout_s:g} s "
                            f"(is the cluster short of the resources they ask for?)")
    for ref in done:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"{refs[ref]} failed to start: {e}") from e


def _start_generator(cfg: RunConfig, device: str, run_id: str, i: int, placement: Placement | None) -> Any:
    r = cfg.resources
    options = dict(name=f"{run_id}:generator-{i}", num_cpus=r.generator_cpus,
                   num_gpus=r.generator_gpus * cfg.rollout.tensor_parallel_size if device == "cuda" else 0,
                   runtime_env={"env_vars": generator_env(cfg, device)},
                   **(placement.options("generator", i) if placement else {}))
    deadline = time.monotonic() + 30
    while True:
        try:
            return Generator.options(**options).remote(i, cfg, device)
        except ValueError:  # a dead actor's name is released asynchronously
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _deepspeed_ranks(actor: Any, kind: str, cfg: RunConfig, device: str, run_id: str, cpus: float, gpus: float,
                     created: list[Any], placement: Placement) -> list[Any]:
    """cfg.train.ranks actors of one DeepSpeed group, set up together around rank 0's rendezvous."""
    gpu = device == "cuda"
    ranks = [actor.options(name=f"{run_id}:{kind}-rank-{i}", num_cpus=cpus, num_gpus=gpus if gpu else 0,
                           **placement.options(kind, i)).remote(cfg, i, cfg.train.ranks, device)
             for i in range(cfg.train.ranks)]
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
    if topo.placement is not None:
        topo.placement.remove()


# What a run may change on a kept topology: everything its actors read per call. The rest of
# rollout.* and train.* (and model, resources, weight_sync) is fixed when the actors start.
PER_RUN_ROLLOUT = ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "temperature", "top_p", "top_k",
                   "max_restarts", "mode", "max_staleness", "inflight_on_update", "timeout_s", "buffer_groups")
PER_RUN_TRAIN = ("lr", "lr_schedule", "weight_decay", "adam_betas", "optimizer", "grad_clip", "mini_batch_size",
                 "micro_batch_size", "share_prompt_forward")


def topology_shape(cfg: RunConfig) -> tuple | None:
    """What the actors of cfg's topology fix when they start: a kept topology serves another run only if
    the shapes are equal. None for a run whose topology is never kept: a critic's or a reward model's
    state is not reset."""
    if cfg.uses_critic or cfg.reward.model.path:
        return None
    rollout = dataclasses.replace(cfg.rollout, **{f: getattr(type(cfg.rollout)(), f) for f in PER_RUN_ROLLOUT})
    train = dataclasses.replace(cfg.train, **{f: getattr(type(cfg.train)(), f) for f in PER_RUN_TRAIN})
    return cfg.model, cfg.resources, cfg.weight_sync, cfg.uses_reference, rollout, train


def reset_topology(topo: Topology, cfg: RunConfig, timeout_s: float = 600.0) -> None:
    """Make topo serve cfg's run from its start: the generators drop the last run's requests, every trainer
    rank rebuilds its engine from cfg.model.path (new optimizer, schedule and seed), the reference takes
    cfg's settings, and a push brings the trainer's fresh weights to the generators as version 0."""
    plan_run(cfg, topo.device)  # refuses what cannot fit, as a first build would
    # Deadlines guard against a hang only: an engine rebuild takes seconds.
    ray.get([g.reset.remote(cfg) for g in topo.generators], timeout=timeout_s)
    # Colocated on a GPU the generators sleep while the ranks rebuild, as at start-up (start_roles),
    # and wake around the push (a no-op elsewhere).
    topo.colocated_sleep()
    refs = [r.reset.remote(cfg) for r in topo.trainer.ranks]
    refs += [topo.reference.reset.remote(cfg)] if topo.reference is not None else []
    ray.get(refs, timeout=timeout_s)
    topo.cfg, topo.trainer.cfg = cfg, cfg
    topo.buffer = ReplayBuffer(capacity_groups=cfg.buffer_capacity)
    topo.generator_restarts = 0
    topo.colocated_push(lambda: topo.weight_sync.push(version=0))


class TopologyPool:
    """Runs of one shape on one set of actors: `rlhf.run(cfg, topologies=pool)` takes the topology the
    last run kept when its shape (topology_shape) is this run's, and resets it (reset_topology);
    otherwise it tears the kept one down and builds anew. A run that ends well gives its topology back;
    one that fails tears it down. vLLM's and DeepSpeed's start-up (15-20 s a run for the tiny model on
    2 cores, and the first batch's warm-up) is then paid once per shape, not once per run."""

    def __init__(self) -> None:
        self._kept: Topology | None = None

    def take(self, cfg: RunConfig, device: str, run_id: str) -> Topology:
        kept, self._kept = self._kept, None
        shape = topology_shape(cfg)
        if kept is not None and kept.device == device and shape is not None and topology_shape(kept.cfg) == shape:
            try:
                reset_topology(kept, cfg)
            except BaseException:
                teardown(kept, graceful=False)
                raise
            return kept
        if kept is not None:
            teardown(kept)
        return build_topology(cfg, device, run_id)

    def give_back(self, topo: Topology) -> None:
        """Keep topo for the next run of its shape (tear it down if it has none)."""
        if topology_shape(topo.cfg) is None:
            teardown(topo)
        else:
            self._kept = topo

    def close(self) -> None:
        if self._kept is not None:
            teardown(self._kept)
            self._kept = None
