"""The placement plan of a run, and its memory estimate, before anything starts.

    python -m rlhf.train --config configs/grpo_tiny.yaml --dry-run

Every role becomes Ray placement-group bundles (rlhf/topology.py builds them): generators (one
bundle per engine; a tensor-parallel engine's workers share its bundle), trainer ranks, critic
ranks, the reference and the reward model. Per actor the plan estimates memory from the model's
shape (instantiated on the meta device, so nothing is loaded):

    trainer / critic rank   parameters, gradients, Adam states (+ the fp32 master partition), each
                            divided over the ranks as the ZeRO stage partitions it, moved to host memory
                            by train.offload_*; activations of one micro-batch at the longest sequence
                            (Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) half-precision bytes per
                            layer; with gradient checkpointing, each layer's input plus one layer's
                            activations and their gradients); the logits and their log-softmax and
                            gradient (3 * b*s*V floats); the optimizer step's temporaries (8 bytes a
                            parameter). bench/memory.py compares this with measured peaks (README).
    generator               weights / TP per worker; the KV cache (rollout.kv_cache_gb on CPU;
                            gpu_memory_utilization of the GPU on GPU, which includes the weights);
                            on CPU one receive buffer per weight bucket (a second copy of the weights)
    reference, reward model weights and the logits of one micro-batch

On CPU every process also pays for its Python, torch and vLLM runtime: RUNTIME_GIB, measured on
this project's machine. The plan refuses, naming the role and the shortfall, an actor larger than a
GPU (resources.gpu_memory_gb) or a node whose actors together exceed its memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf.config import RunConfig

GIB = 2**30
# Resident memory of an idle actor process on CPU (imports, allocator, engine bookkeeping), measured
# with `ps` on this project's machine: a vLLM generator is three processes (the actor, vLLM's engine
# core and its worker); a DeepSpeed rank one.
RUNTIME_GIB = {"generator": 2.1, "trainer": 0.6, "critic": 0.6, "reference": 0.5, "reward_model": 0.5}
# On GPU, what a DeepSpeed rank holds besides its tensors, estimated (not yet measured on this project's
# stack): the CUDA context with torch's kernels (~0.5 GiB with lazy module loading), and an NCCL
# communicator's buffers (NCCL_BUFFSIZE 4 MiB per channel and peer; ~0.25 GiB for a small group).
CUDA_CONTEXT_GIB = 0.5
NCCL_GIB = 0.25


def sync_backend(cfg: RunConfig, device: str) -> str:
    """weight_sync.backend with auto resolved: ipc when colocated, else nccl on GPU and gloo on CPU."""
    backend = cfg.weight_sync.backend
    if backend == "auto":
        backend = "ipc" if cfg.resources.colocate else "nccl" if device == "cuda" else "gloo"
    return backend


def sync_buffer_bytes(cfg: RunConfig, shape: ModelShape) -> float:
    """The two send buffers a sending trainer rank keeps (weight_sync.sender), each the largest bucket:
    weight_sync.bucket_mb, or the embedding when it is larger (a tensor larger than a bucket travels alone)."""
    width = 2 if cfg.model.dtype == "bfloat16" else 4
    return 2 * max(cfg.weight_sync.bucket_mb * 2**20, width * shape.vocab * shape.hidden)


class PlanError(RuntimeError):
    """The run cannot fit: names the role (or node) and the shortfall."""


@dataclass(frozen=True)
class ModelShape:
    params: int
    hidden: int
    layers: int
    heads: int
    vocab: int

    @staticmethod
    def of(path: str, trust_remote_code: bool = False) -> ModelShape:
        """From the HF config at `path`: the model is built on the meta device (no memory, no weights)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        c = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(c, trust_remote_code=trust_remote_code)
        params = sum(p.numel() for p in model.parameters())
        return ModelShape(params, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size)


@dataclass
class ActorPlan:
    role: str  # "generator-0", "trainer-rank-1", ...
    kind: str  # generator | trainer | critic | reference | reward_model
    bundle: dict[str, float]  # the Ray resources of its placement-group bundle
    device_gib: dict[str, float] = field(default_factory=dict)  # on its GPU (on CPU: in host memory)
    host_gib: dict[str, float] = field(default_factory=dict)  # offloaded parts, and the process itself
    node: str = ""  # where the bundle would land in the current cluster ("" = not simulated)
    params: int = 0  # parameters of the model it holds
    colocated_with: str = ""  # resources.colocate: the trainer rank whose bundle (and device) it shares

    @property
    def device_total(self) -> float:
        return sum(self.device_gib.values())

    @property
    def host_total(self) -> float:
        return sum(self.host_gib.values())


def trainer_memory(cfg: RunConfig, shape: ModelShape) -> tuple[dict[str, float], dict[str, float]]:
    """(device, host) GiB of one policy (or critic) rank."""
    t, bf16 = cfg.train, cfg.model.dtype == "bfloat16"
    p, world, z = shape.params, t.ranks, t.zero_stage
    width = 2 if bf16 else 4
    parts = {
        "parameters": width * p / (world if z == 3 else 1),
        "gradients": width * p / (world if z >= 2 else 1),
        # Adam's m and v, plus the fp32 master partition ZeRO (stage >= 1) and bf16 keep beside the module
        "optimizer": (8 + (4 if bf16 or z >= 1 else 0)) * p / (world if z >= 1 else 1),
        # the step's temporaries (torch's foreach AdamW: about two fp32 tensors the size of the partition)
        "optimizer_step": 8 * p / (world if z >= 1 else 1),
        "activations": activation_bytes(cfg, shape, training=True),
    }
    device = {k: v / GIB for k, v in parts.items()}
    host: dict[str, float] = {}
    if t.offload_optimizer:
        host["optimizer"] = device.pop("optimizer")
        host["optimizer_step"] = device.pop("optimizer_step")
    if t.offload_params:
        host["parameters"] = device.pop("parameters")
    return device, host


def activation_bytes(cfg: RunConfig, shape: ModelShape, training: bool) -> float:
    """One micro-batch at the longest sequence: the layers' activations (training) and the logits."""
    b = cfg.train.micro_batch_size
    s = min(cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens, cfg.rollout.max_model_len)
    h, layers, a, v = shape.hidden, shape.layers, shape.heads, shape.vocab
    scale = 1.0 if cfg.model.dtype == "bfloat16" else 2.0  # the formula counts half-precision bytes
    per_layer = s * b * h * (34 + 5 * a * s / h) * scale
    logits = 3 * b * s * v * 4.0  # fp32 logits, their log-softmax, and its gradient
    if not training:
        return logits / 3 * 2
    if cfg.train.gradient_checkpointing:  # each layer's input is kept; one layer at a time is recomputed,
        return layers * s * b * h * 2 * scale + 2 * per_layer + logits  # its activations and their gradients
    return layers * per_layer + logits


def generator_memory(cfg: RunConfig, shape: ModelShape, device: str) -> dict[str, float]:
    r, tp = cfg.rollout, cfg.rollout.tensor_parallel_size
    width = 2 if cfg.model.dtype == "bfloat16" else 4
    weights = width * shape.params / GIB
    if device == "cuda":  # vLLM sizes its whole footprint (weights + KV cache) as a fraction of each GPU
        # The receive buffers of a push come on top of vLLM's budget: two buckets in flight, each worker.
        return {f"weights + kv_cache ({tp} GPU{'s' if tp > 1 else ''})": r.gpu_memory_utilization
                * cfg.resources.gpu_memory_gb * tp, "weight_sync_buffers": sync_buffer_bytes(cfg, shape) * tp / GIB}
    return {"weights": weights, "kv_cache": float(r.kv_cache_gb) * tp, "weight_sync_buffers": weights}


def build_plan(cfg: RunConfig, device: str, shape: ModelShape | None = None) -> list[ActorPlan]:
    """Every actor of the run with its bundle and memory estimate."""
    shape = shape or ModelShape.of(cfg.model.path, cfg.model.trust_remote_code)
    r, gpu, plans = cfg.resources, device == "cuda", []
    cpu_runtime = (lambda kind: {"runtime": RUNTIME_GIB[kind]}) if not gpu else (lambda kind: {})

    def bundle(cpus: float, gpus: float, node: str) -> dict[str, float]:
        b = {"CPU": cpus}
        if gpu and gpus:
            b["GPU"] = gpus
        if node:
            b[node] = 0.001  # a custom resource only the chosen node(s) advertise
        return {k: v for k, v in b.items() if v}

    gen_gpus = r.generator_gpus * cfg.rollout.tensor_parallel_size
    for i in range(cfg.rollout.num_generators):
        mem = generator_memory(cfg, shape, device)
        plans.append(ActorPlan(f"generator-{i}", "generator", bundle(r.generator_cpus, gen_gpus, r.generator_node),
                               mem if gpu else {}, mem if not gpu else {}, params=shape.params))
    roles = [("trainer", "trainer-rank", r.trainer_cpus, r.trainer_gpus, r.trainer_node)]
    if cfg.uses_critic:
        roles.append(("critic", "critic-rank", r.critic_cpus, r.critic_gpus, r.critic_node))
    backend = sync_backend(cfg, device)
    senders = range(min(cfg.rollout.num_generators, cfg.train.ranks)) if backend == "ipc" else range(1)
    for kind, name, cpus, gpus, node in roles:
        for i in range(cfg.train.ranks):
            dev, host = trainer_memory(cfg, shape)
            if not gpu:
                dev, host = {}, {**dev, **host}
            else:
                dev["cuda_context"] = CUDA_CONTEXT_GIB
                if cfg.train.ranks > 1:
                    dev["nccl (DeepSpeed)"] = NCCL_GIB
                if kind == "trainer" and i in senders:
                    dev["weight_sync_buffers"] = sync_buffer_bytes(cfg, shape) / GIB
                    if backend == "nccl":
                        dev["nccl (weight sync)"] = NCCL_GIB
            plans.append(ActorPlan(f"{name}-{i}", kind, bundle(cpus, gpus, node), dev, host))
    if cfg.uses_reference:
        mem = {"weights": 4 * shape.params / GIB, "logits": activation_bytes(cfg, shape, training=False) / GIB}
        plans.append(ActorPlan("reference", "reference", bundle(r.reference_cpus, r.reference_gpus, r.reference_node),
                               mem if gpu else {}, mem if not gpu else {}))
    if cfg.reward.model.path:
        rm = ModelShape.of(cfg.reward.model.path, cfg.model.trust_remote_code)
        mem = {"weights": 4 * rm.params / GIB}
        plans.append(ActorPlan("reward-model", "reward_model",
                               bundle(r.reward_model_cpus, r.reward_model_gpus, r.reward_model_node),
                               mem if gpu else {}, mem if not gpu else {}))
    for p in plans:
        p.host_gib.update(cpu_runtime(p.kind))
    if r.colocate:  # generator i rides in trainer rank i's bundle, which grows by the generator's resources
        trainers = [p for p in plans if p.kind == "trainer"]
        for g in (p for p in plans if p.kind == "generator"):
            t = trainers[int(g.role.rsplit("-", 1)[1])]
            t.bundle = {k: t.bundle.get(k, 0.0) + g.bundle.get(k, 0.0) for k in {*t.bundle, *g.bundle}}
            g.bundle, g.colocated_with = {}, t.role
    return plans


def strategy(cfg: RunConfig, kind: str) -> str:
    r = cfg.resources
    return r.generator_strategy if kind == "generator" else r.trainer_strategy if kind in ("trainer", "critic") \
        else "PACK"


def node_name(nodes: list[dict[str, Any]], i: int) -> str:
    return f"{nodes[i].get('NodeManagerAddress', 'node')}#{i}"


def place(plans: list[ActorPlan], nodes: list[dict[str, Any]], cfg: RunConfig) -> None:
    """Simulate Ray's placement of the bundles on `nodes` (ray.nodes() entries): first fit, each role
    PACKed next to its previous bundle or SPREAD to the next node. Fills ActorPlan.node; raises
    PlanError naming a bundle that fits nowhere."""
    free = [dict(n["Resources"]) for n in nodes]
    last: dict[str, int] = {}
    for p in plans:
        if p.colocated_with:
            continue
        order = list(range(len(free)))
        if p.kind in last:
            k = (last[p.kind] + (1 if strategy(cfg, p.kind) == "SPREAD" else 0)) % len(order)
            order = order[k:] + order[:k]
        fits = [i for i in order if all(free[i].get(key, 0.0) + 1e-9 >= v for key, v in p.bundle.items())]
        if not fits:
            need = ", ".join(f"{k} {v:g}" for k, v in p.bundle.items())
            raise PlanError(f"{p.role}: no node has {need} free (the cluster has {len(nodes)} node(s); "
                            f"the roles before it took the rest)")
        for key, v in p.bundle.items():
            free[fits[0]][key] -= v
        p.node, last[p.kind] = node_name(nodes, fits[0]), fits[0]
    by_role = {p.role: p for p in plans}
    for p in plans:
        if p.colocated_with:
            p.node = by_role[p.colocated_with].node


def check(plans: list[ActorPlan], nodes: list[dict[str, Any]], cfg: RunConfig, device: str) -> None:
    """Refuse what cannot fit: an actor above its share of a GPU, or a node's actors above its memory."""
    r = cfg.resources
    if device == "cuda":
        check_gpu_sharing(cfg)
        for p in plans:
            gpus = p.bundle.get("GPU", 0.0)
            if p.kind == "generator":  # vLLM's budget is a fraction of each GPU; the weights must fit in it
                tp = cfg.rollout.tensor_parallel_size
                need = (2 if cfg.model.dtype == "bfloat16" else 4) * p.params / GIB / tp
                have = cfg.rollout.gpu_memory_utilization * r.gpu_memory_gb
                what = (f"its weights ({need:.1f} GiB per GPU at tensor_parallel_size={tp}) in "
                        f"rollout.gpu_memory_utilization x resources.gpu_memory_gb = {have:.1f} GiB")
                if need <= have and not r.colocate:  # the receive buffers must fit beside vLLM's budget
                    buffers = p.device_gib.get("weight_sync_buffers", 0.0) / tp
                    need, have = have + buffers, r.gpu_memory_gb * min(p.bundle.get("GPU", 1.0) / tp, 1.0)
                    what = (f"rollout.gpu_memory_utilization x resources.gpu_memory_gb plus the weight-sync receive "
                            f"buffers ({buffers:.2f} GiB) in its share of a GPU ({have:.1f} GiB)")
            else:
                need, have = p.device_total, r.gpu_memory_gb * min(gpus, 1.0)
                what = f"{need:.1f} GiB on its GPU ({breakdown(p.device_gib)}) but gets {have:.1f} GiB"
                if r.colocate and p.kind == "trainer":  # the generator's share of the GPU comes on top
                    generator = next((g for g in plans if g.colocated_with == p.role), None)
                    if generator is not None:
                        need += generator.device_total
                    have = r.gpu_memory_gb
                    what = (f"{p.device_total:.1f} GiB ({breakdown(p.device_gib)}) plus the colocated generator's "
                            f"rollout.gpu_memory_utilization x {r.gpu_memory_gb:g} GiB and receive buffers on one GPU")
            if need > have:
                raise PlanError(f"{p.role} does not fit: {what}; short by {need - have:.1f} GiB")
    for i, n in enumerate(nodes):
        res = n.get("Resources", {})
        total = r.node_memory_gb or (res.get("memory", 0.0) + res.get("object_store_memory", 0.0)) / GIB
        here = [p for p in plans if p.node == node_name(nodes, i)]
        need = sum(p.host_total for p in here)
        if here and total and need > total:
            worst = max(here, key=lambda p: p.host_total)
            raise PlanError(f"node {node_name(nodes, i)} does not fit its actors: they need {need:.1f} GiB of host "
                            f"memory, it has "
                            f"{total:.1f} GiB: short by {need - total:.1f} GiB; the largest is {worst.role} "
                            f"({worst.host_total:.1f} GiB: {breakdown(worst.host_gib)})")


def check_gpu_sharing(cfg: RunConfig) -> None:
    """Refuse GPU shares that make a GPU run fail at start-up or at its first push, naming the roles.

    Ray grants fractional GPUs by packing: actors (or bundles) whose shares add up to at most 1 may land
    on one GPU, and nothing says they will not.
      - resources.colocate means one GPU: generator i rides in trainer rank i's bundle, and a bundle of
        more than one GPU gets two, the two processes each see their own, and the ipc push cannot map
        the trainer's memory.
      - NCCL refuses a communicator with two ranks on one GPU: DeepSpeed's (trainer ranks, critic ranks),
        vLLM's tensor-parallel one (its workers), and the weight sync's over nccl (trainer rank 0 and every
        generator worker).
      - vLLM reserves rollout.gpu_memory_utilization of the whole device per engine: engines that may share
        a GPU must add up to at most 1.
    """
    r, rollout = cfg.resources, cfg.rollout
    tp, backend = rollout.tensor_parallel_size, sync_backend(cfg, "cuda")
    if r.colocate:
        total = r.trainer_gpus + r.generator_gpus
        if total > 1 + 1e-9:
            raise PlanError(f"resources.colocate: trainer-rank-i and generator-i must share one GPU, but "
                            f"resources.trainer_gpus + resources.generator_gpus = {r.trainer_gpus:g} + "
                            f"{r.generator_gpus:g} = {total:g}: their bundle would span two GPUs and each would see "
                            f"only its own (the ipc push then fails); use fractions adding up to 1, e.g. 0.5 and 0.5")
        if backend == "nccl":
            raise PlanError("weight_sync.backend=nccl with resources.colocate: trainer-rank-0 and generator-0 share "
                            "a GPU, and NCCL refuses two ranks of one communicator on one GPU; use "
                            "weight_sync.backend=ipc (or auto)")
    if tp > 1 and abs(r.generator_gpus - 1) > 1e-9:
        raise PlanError(f"rollout.tensor_parallel_size={tp}: each generator's {tp} workers form an NCCL group and "
                        f"need a GPU each, so resources.generator_gpus must be 1 (it is {r.generator_gpus:g}: the "
                        f"engine would get {r.generator_gpus * tp:g} GPUs for {tp} workers)")
    bundle = r.trainer_gpus + (r.generator_gpus if r.colocate else 0.0)  # what one trainer rank's bundle holds
    groups = [("trainer", cfg.train.ranks, bundle, "resources.trainer_gpus"),
              ("critic", cfg.train.ranks if cfg.uses_critic else 0, r.critic_gpus, "resources.critic_gpus")]
    for kind, ranks, share, key in groups:
        if ranks > 1 and 2 * share <= 1 + 1e-9:
            raise PlanError(f"{kind}-rank-0 and {kind}-rank-1 may share one GPU ({key}={share:g} each per bundle): "
                            f"NCCL refuses two ranks of DeepSpeed's communicator on one GPU; give each {kind} rank "
                            f"more than half a GPU")
    workers = rollout.num_generators * tp
    if backend == "nccl" and not r.colocate:
        if r.trainer_gpus + r.generator_gpus <= 1 + 1e-9:
            raise PlanError(f"weight_sync.backend=nccl: trainer-rank-0 (resources.trainer_gpus={r.trainer_gpus:g}) and "
                            f"generator-0 (resources.generator_gpus={r.generator_gpus:g}) may share one GPU, and NCCL "
                            f"refuses two ranks of the weight-sync communicator on one GPU; give them shares adding up "
                            f"to more than 1, or colocate them (resources.colocate, weight sync over ipc)")
        if workers > 1 and 2 * r.generator_gpus <= 1 + 1e-9:
            raise PlanError(f"weight_sync.backend=nccl: generator-0 and generator-1 may share one GPU "
                            f"(resources.generator_gpus={r.generator_gpus:g} each), and NCCL refuses two ranks of the "
                            f"weight-sync communicator on one GPU")
    if not r.colocate and rollout.num_generators > 1 and r.generator_gpus < 1:
        per_gpu = min(rollout.num_generators, int(1 / r.generator_gpus + 1e-9))
        total = per_gpu * rollout.gpu_memory_utilization
        if per_gpu > 1 and total > 1 + 1e-9:
            names = ", ".join(f"generator-{i}" for i in range(per_gpu))
            raise PlanError(f"{names} may share one GPU (resources.generator_gpus={r.generator_gpus:g} each), and each "
                            f"reserves rollout.gpu_memory_utilization={rollout.gpu_memory_utilization:g} of the whole "
                            f"device: {total:g} of it together; lower rollout.gpu_memory_utilization to at most "
                            f"{1 / per_gpu:.2f}, or give each generator a whole GPU")


def breakdown(parts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in parts.items())


def format_plan(plans: list[ActorPlan], device: str) -> str:
    gpu = device == "cuda"
    rows = [("actor", "bundle", "node", "GPU GiB" if gpu else "", "host GiB", "breakdown (GiB)")]
    for p in plans:
        parts = {**p.device_gib, **{f"host {k}": v for k, v in p.host_gib.items()}} if gpu else p.host_gib
        rows.append((p.role, ", ".join(f"{k} {v:g}" for k, v in p.bundle.items()), p.node or "-",
                     f"{p.device_total:.2f}" if gpu else "", f"{p.host_total:.2f}", breakdown(parts)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    total = sum(p.host_total for p in plans)
    lines.append(f"total host memory {total:.2f} GiB" + (f", device {sum(p.device_total for p in plans):.2f} GiB"
                                                          if device == "cuda" else ""))
    return "\n".join(lines)


def plan_run(cfg: RunConfig, device: str, nodes: list[dict[str, Any]] | None = None) -> list[ActorPlan]:
    """The plan for `cfg` on the current Ray cluster (or `nodes`), checked: raises PlanError if it cannot fit."""
    import ray

    nodes = nodes if nodes is not None else [n for n in ray.nodes() if n.get("Alive", True)]
    plans = build_plan(cfg, device)
    place(plans, nodes, cfg)
    check(plans, nodes, cfg, device)
    return plans

