"""One typed config tree: loaded from YAML, overridden by `key.sub=value`, validated once.

    cfg = load_config("configs/grpo_tiny.yaml", ["train.lr=1e-3", "rollout.temperature=0.8"])

Every section is a frozen dataclass; the loader rejects unknown keys and values of the wrong
type or outside their allowed set with a `ConfigError` that names the dotted key (the parsing
is rlhf.config_parse). Cross-field checks (batch sizes that must divide, resources that must
exist) live in `RunConfig.validate`, which `load_config` calls once. Nothing mutates a config afterwards.

Batch-size vocabulary (used everywhere, defined once):
    prompts_per_step   prompts taken from the dataset per RL step
    samples_per_prompt completions generated for each prompt (GRPO's group size G)
    rollout batch      prompts_per_step * samples_per_prompt samples per RL step
    mini_batch_size    samples per optimizer step, summed over all trainer ranks
    micro_batch_size   samples per forward/backward on one trainer rank
    => optimizer steps per RL step = ppo_epochs * rollout batch / mini_batch_size
    => gradient accumulation steps = mini_batch_size / (micro_batch_size * trainer ranks)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf.config_parse import ConfigError, from_dict, set_dotted


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # local directory or HF id of a causal LM with its tokenizer
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a local .jsonl/.json/.parquet/.csv file, a local dataset dir, or an HF dataset id
    split: str = "train"
    subset: str = ""  # the dataset's configuration name, for hub datasets that have several (gsm8k: "main")
    prompt_key: str = "prompt"
    apply_chat_template: bool = False  # a string prompt becomes a user message; a list of messages is taken as it is
    system_prompt: str = ""  # with apply_chat_template: a system message before prompts that have none
    shuffle: bool = False  # in-order batches make reward curves repeatable (see README)
    max_prompt_tokens: int = 256


@dataclass(frozen=True)
class RolloutConfig:
    num_generators: int = 1  # vLLM engines, each its own Ray actor
    tensor_parallel_size: int = 1  # workers per engine (GPUs on GPU; core groups on CPU), all in the sync group
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    max_model_len: int = 512
    enforce_eager: bool = True  # eager starts ~3x faster than compiled on CPU
    kv_cache_gb: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = 0.5
    max_restarts: int = 3  # a generator actor that dies is replaced this many times in a run, then the run fails
    threads: int = 0  # CPU threads of each engine (OMP); 0 = the actor's Ray CPUs (Ray's default)
    # sync: generate, train, push, repeat (on-policy). async: generators keep producing while the trainer
    # trains, and a batch may come from weights up to max_staleness versions behind the trainer's.
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 1  # async only: older samples are dropped (and counted), never trained
    inflight_on_update: Literal["abort", "finish"] = "abort"  # requests running when new weights arrive:
    # abort = aborted and run again on the new weights; finish = complete on the old ones, then the update
    timeout_s: float = 600.0  # no group finishing for this long while requests are in flight is an error
    buffer_groups: int = 0  # replay-buffer capacity in groups (in flight + ready); 0 = prompts_per_step x
    # (max_staleness + 1) in async mode, prompts_per_step in sync mode. A full buffer stops generation.


@dataclass(frozen=True)
class RewardFnConfig:
    fn: str = ""  # "pkg.module:function" or "path/to/file.py:function"
    weight: float = 1.0


@dataclass(frozen=True)
class RemoteRewardConfig:
    """A reward served over HTTP: batches are POSTed as JSON (reward/remote.py has the protocol)."""

    url: str = ""  # e.g. http://127.0.0.1:8000/score
    weight: float = 1.0
    timeout_s: float = 10.0  # per HTTP attempt
    retries: int = 2  # further attempts after a failed one (connection error, timeout, HTTP 5xx)
    backoff_s: float = 0.5  # wait before retry k: backoff_s * 2**(k-1)
    max_request_mb: float = 16.0  # a batch whose JSON is larger is split into several requests


@dataclass(frozen=True)
class RewardModelConfig:
    """A reward model (HF AutoModelForSequenceClassification) scoring (prompt, completion) in its own actor."""

    path: str = ""  # local directory or HF id; "" = no reward model
    weight: float = 1.0
    batch_size: int = 16
    max_length: int = 1024  # prompt + completion tokens; longer inputs are truncated from the left
    max_restarts: int = 3  # Ray restarts a dead reward-model actor (and retries its call) this many times


@dataclass(frozen=True)
class RewardConfig:
    """The reward functions and what happens when one fails (raises, times out, returns NaN/inf,
    a non-number or the wrong number of values; reward/api.py lists the failure kinds). Functions,
    remote rewards and the reward model add up, each with its weight."""

    functions: tuple[RewardFnConfig, ...] = ()
    remote: tuple[RemoteRewardConfig, ...] = ()
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    on_error: Literal["raise", "penalize"] = "raise"  # raise: stop, naming the function and sample
    penalty: float = 0.0  # under penalize: replaces the failed function's value for that sample (then weighted)
    timeout_s: float = 60.0  # per call of one function on one batch; a late sync call is abandoned, not killed
    workers: int = 4  # threads running sync functions concurrently; async ones share one event loop


@dataclass(frozen=True)
class AlgorithmConfig:
    advantage: str = "grpo"  # name in rlhf.algorithms.ADVANTAGE_ESTIMATORS
    policy_loss: str = "ppo_clip"  # name in rlhf.algorithms.POLICY_LOSSES: ppo_clip, ppo_dual_clip, gspo, cispo
    loss_agg: str = "token-mean"  # name in rlhf.algorithms.LOSS_AGGREGATIONS
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high] (cispo: its IS weight)
    clip_high: float = 0.2
    dual_clip: float = 3.0  # ppo_dual_clip's c > 1: the loss of a negative-advantage token is capped at -c * A
    kl_coef: float = 0.0  # > 0 adds kl_coef * KL(policy || reference) to the loss (or the reward: kl_in_reward)
    kl_estimator: str = "k3"  # name in rlhf.algorithms.KL_ESTIMATORS
    ppo_epochs: int = 1
    std_eps: float = 1e-6  # added to the std in GRPO's and REINFORCE++'s normalisation
    gamma: float = 1.0  # per-token discount (token-level estimators: reinforce_pp, gae)
    lam: float = 1.0  # GAE's lambda
    # true: the KL penalty enters the reward, not the loss: per token for the token estimators
    # (reinforce_pp*, gae; classic PPO), summed into the sequence reward before the group statistics
    # for the outcome ones (grpo, dr_grpo, rloo)
    kl_in_reward: bool = False
    entropy_coef: float = 0.0  # > 0 subtracts entropy_coef * entropy from the loss (an exploration bonus)
    normalize_advantages: bool = False  # whiten advantages over the batch's tokens (usual with gae)
    # DAPO's data-side pieces (Yu et al. 2025)
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and generate more prompts
    max_sampling_rounds: int = 4  # generation rounds per step to fill the batch with informative groups
    overlong_buffer: int = 0  # > 0: soft length penalty over the last N tokens before max_new_tokens
    truncated: Literal["keep", "mask", "penalize"] = "keep"  # samples that hit max_new_tokens
    truncated_penalty: float = -1.0  # added to a truncated sample's reward when truncated=penalize
    # The off-policy correction for samples drawn by an older policy (async) or by a generator that
    # differs slightly from the trainer: name in rlhf.algorithms.CORRECTIONS. token_tis weighs each
    # token's loss by min(pi_old / pi_rollout, tis_cap) (Yao et al. 2025); token_mask drops tokens whose
    # ratio leaves [band_low, band_high] (IcePop); seq_tis / seq_mask do the same per sequence with the
    # geometric-mean ratio; none turns it off.
    correction: str = "token_tis"
    tis_cap: float = 2.0  # token_tis, seq_tis: >= 1
    band_low: float = 0.5  # token_mask, seq_mask: 0 <= band_low <= 1 <= band_high
    band_high: float = 2.0


@dataclass(frozen=True)
class EnvConfig:
    """Multi-turn rollouts (rollout/agent.py): an environment the model talks to over several turns,
    tools it may call, or both. Off unless `cls` or `tools` is set. Needs data.apply_chat_template
    (replies are rendered by the chat template); rollout.max_new_tokens is then per turn."""

    cls: str = ""  # the environment class, "pkg.mod:Class" or "path/file.py:Class"; one instance per trajectory
    kwargs: dict[str, Any] = field(default_factory=dict)  # its constructor's arguments (plus the row's columns)
    max_turns: int = 4  # model turns per trajectory; a trajectory that reaches it unfinished is truncated
    max_total_tokens: int = 0  # prompt + turns + replies; 0 = rollout.max_model_len
    timeout_s: float = 30.0  # per environment call (init, step, close)
    on_error: Literal["raise", "penalize"] = "raise"  # a failed call: stop the run, or end the trajectory
    penalty: float = 0.0  # under penalize: the failed step's reward
    reward: Literal["sum", "last"] = "sum"  # the trajectory's environment reward from its steps' rewards
    # Tools: "pkg.mod:fn" / "file.py:fn" (a function with type hints and an Args: docstring), or
    # "python", the sandboxed code tool (rollout/sandbox.py). Their schemas go to the chat template.
    tools: tuple[str, ...] = ()
    tool_parser: str = "hermes"  # name in rollout.tools' parser registry: <tool_call>{json}</tool_call>
    tool_timeout_s: float = 15.0  # per call (the python tool's own wall-clock limit is 10 s)
    tool_max_chars: int = 4000  # a longer result is cut, and says so

    @property
    def active(self) -> bool:
        return bool(self.cls or self.tools)


@dataclass(frozen=True)
class CriticConfig:
    """The value model, created when the advantage estimator needs one (gae). It uses train.* for
    ranks, ZeRO stage and batch sizes."""

    path: str = ""  # "" = a fresh value head on the policy's own weights (model.path); or a reward model
    lr: float = 1e-5
    value_clip: float = 0.2  # PPO's value clipping around the rollout-time values; 0 = off


@dataclass(frozen=True)
class TrainConfig:
    ranks: int = 1  # DeepSpeed data-parallel ranks, each a Ray actor
    zero_stage: Literal[0, 1, 2, 3] = 0
    lr: float = 1e-6
    lr_schedule: Literal["constant", "linear"] = "constant"  # linear: decays to 0 at the run's last optimizer step
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # torch: torch's AdamW, fused on GPU (DeepSpeed's pip wheel ships no prebuilt ops; its FusedAdam and
    # DeepSpeedCPUAdam JIT-compile on first use, which needs nvcc and CUDA_HOME on GPU machines, g++ on CPU).
    # deepspeed: DeepSpeed's own ops (FusedAdam; DeepSpeedCPUAdam with train.offload_optimizer), where built.
    optimizer: Literal["torch", "deepspeed"] = "torch"
    grad_clip: float = 1.0
    mini_batch_size: int = 32
    micro_batch_size: int = 8
    threads: int = 0  # torch intra-op threads per rank; 0 = the Ray CPUs of the actor
    # Memory (policy and critic alike): ZeRO-Offload of the optimizer states and step (zero_stage >= 1),
    # of the parameters between uses (zero_stage 3); activation checkpointing recomputes each layer's
    # activations in the backward pass instead of keeping them (less memory, ~30 % more compute).
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    # Samples of one prompt (a GRPO group) run the prompt's forward once and continue it from a KV cache
    # that gradients flow back through; same log-probs and gradients as a forward per sample. Off under
    # ZeRO-3 (it would gather every layer twice) and with gradient checkpointing (HF drops the cache).
    share_prompt_forward: bool = True
    # LoRA (peft) on the policy: rank 0 = full fine-tuning. Weight syncs then carry only the merged
    # weights of the target modules (actors/lora.py).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj")

    @property
    def shares_prompts(self) -> bool:
        return self.share_prompt_forward and self.zero_stage != 3 and not self.gradient_checkpointing


# vLLM loads these HF modules into one fused module each (qkv_proj, gate_up_proj): a LoRA sync must
# carry all of a group or none, or the fused module would be reloaded half-filled; so
# train.lora_target_modules names all of a group or none of it.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class WeightSyncConfig:
    # auto: ipc when colocated (CUDA IPC on GPU, shared memory on CPU), else nccl on GPU, gloo on CPU
    backend: Literal["auto", "gloo", "nccl", "ipc"] = "auto"
    bucket_mb: float = 64.0
    timeout_s: float = 120.0  # bounds every RPC and collective of a sync; a late generator is named
    verify: bool = False  # compare per-tensor checksums of sender and receivers after every push
    # Mean |trainer - generator| log-prob of the sampled tokens above which the generator is taken not to serve
    # the trainer's weights. 0 = by model.dtype (GAP_ALARM_BY_DTYPE).
    logprob_gap_alarm: float = 0.0
    on_gap_alarm: Literal["warn", "raise"] = "warn"  # raise: the run stops at the first step over the alarm


# Same weights, fp32 on CPU: 2e-7 - 1e-6 on the tiny models, 3e-6 - 1.1e-5 on SmolLM2-135M; a generator whose tied
# output layer kept its first weights measured 4e-3 - 1e-2 on SmolLM2 (lr 2e-5) and 6e-2 - 1e-1 on the tied tiny model.
# bf16 kernels round at ~4e-3 per value, and their gap reaches ~1e-2 with the weights in sync.
GAP_ALARM_BY_DTYPE = {"float32": 1e-3, "bfloat16": 0.1}


@dataclass(frozen=True)
class ResourcesConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    generator_cpus: float = 1.0
    trainer_cpus: float = 1.0
    reference_cpus: float = 0.0
    critic_cpus: float = 0.0
    reward_model_cpus: float = 0.0
    generator_gpus: float = 1.0  # used only on cuda
    trainer_gpus: float = 1.0
    reference_gpus: float = 1.0
    critic_gpus: float = 1.0
    reward_model_gpus: float = 1.0
    # CPU only: pin generators / trainer ranks to these core ids (as disjoint GPUs would be); () = no pinning
    generator_cores: tuple[int, ...] = ()
    trainer_cores: tuple[int, ...] = ()
    # Placement: every role is a Ray placement group, one bundle per actor (rlhf/plan.py). A *_node names
    # a custom resource that only the chosen nodes advertise (`ray start --resources '{"rollout": 1}'`).
    generator_strategy: Literal["PACK", "SPREAD"] = "PACK"  # engines on as few nodes as fit, or one per node
    trainer_strategy: Literal["PACK", "SPREAD"] = "PACK"  # trainer and critic ranks
    generator_node: str = ""
    trainer_node: str = ""
    critic_node: str = ""
    reference_node: str = ""
    reward_model_node: str = ""
    # Colocated: trainer rank i and generator i share a device (one bundle; fractional *_gpus on GPU).
    # Weights then move by CUDA IPC (shared memory on CPU), and on GPU the generator sleeps (vLLM
    # sleep mode: KV cache freed, weights offloaded) while the trainer trains. Sync mode only.
    colocate: bool = False
    gpu_memory_gb: float = 80.0  # per GPU, for the plan's memory check
    node_memory_gb: float = 0.0  # per node, for the plan's check; 0 = what Ray reports (memory + object store)


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # evaluate every N steps and after the last; 0 = never
    data: DataConfig = field(default_factory=DataConfig)  # the held-out prompts (data.path etc.)
    num_prompts: int = 64  # the first N prompts of the set, the same ones every time
    greedy: bool = True  # false: sample samples_per_prompt completions at the rollout temperature


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # save every N steps; 0 = only the last step (when save_final)
    save_final: bool = True
    keep: int = 2  # newest checkpoints kept; older ones are deleted
    dir: str = ""  # "" = <logging.output_dir>/<name>/checkpoints, the same for every run of that name
    resume: str = ""  # "" = start fresh; "auto" = the newest complete checkpoint in dir (fresh if none); or a path
    keep_best_by: str = ""  # a metric (e.g. eval/reward/mean): the checkpoint with its highest value is never pruned


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str = "runs"
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "rlhf"
    samples_per_step: int = 4  # completions per step written to samples.jsonl (and wandb's `samples` table); 0 = off


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 1
    steps: int = 30
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    env: EnvConfig = field(default_factory=EnvConfig)

    @property
    def gap_alarm(self) -> float:
        """The trainer-vs-generator log-prob gap that counts as a desync (weight_sync.logprob_gap_alarm)."""
        return self.weight_sync.logprob_gap_alarm or GAP_ALARM_BY_DTYPE[self.model.dtype]

    @property
    def rollout_batch_size(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.samples_per_prompt

    @property
    def uses_critic(self) -> bool:
        from rlhf.algorithms import ADVANTAGE_ESTIMATORS

        return "values" in ADVANTAGE_ESTIMATORS.trait(self.algorithm.advantage, "reads")

    @property
    def uses_reference(self) -> bool:
        return self.algorithm.kl_coef > 0

    @property
    def single_update(self) -> bool:
        """One optimizer step per rollout batch: the "old" log-probs are then the training forward's own,
        detached (ratio exactly 1), and the separate pass that would recompute them is skipped."""
        return (self.algorithm.ppo_epochs == 1 and self.train.mini_batch_size == self.rollout_batch_size
                and not (self.algorithm.kl_in_reward and self.uses_reference))

    @property
    def objective(self):  # -> rlhf.algorithms.ObjectiveSettings (imported lazily: config loads without torch)
        """The policy objective's settings (rlhf/algorithms/objective.py), from algorithm.*."""
        from rlhf.algorithms import CorrectionParams, ObjectiveSettings, PolicyLossParams

        a = self.algorithm
        return ObjectiveSettings(
            policy_loss=a.policy_loss, correction=a.correction, loss_agg=a.loss_agg,
            loss_params=PolicyLossParams(clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip),
            correction_params=CorrectionParams(tis_cap=a.tis_cap, band_low=a.band_low, band_high=a.band_high),
            kl_coef=0.0 if a.kl_in_reward else a.kl_coef, kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef)

    @property
    def buffer_capacity(self) -> int:
        """Replay-buffer capacity in groups, counting those in flight (rollout.buffer_groups)."""
        r = self.rollout
        if r.buffer_groups:
            return r.buffer_groups
        return r.prompts_per_step * (r.max_staleness + 1 if r.mode == "async" else 1)

    @property
    def max_staleness(self) -> int:
        """How many policy versions a trained sample may lag the trainer: 0 in sync mode."""
        return self.rollout.max_staleness if self.rollout.mode == "async" else 0

    @property
    def grad_accum_steps(self) -> int:
        return self.train.mini_batch_size // (self.train.micro_batch_size * self.train.ranks)

    def validate(self) -> RunConfig:
        from rlhf import algorithms

        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        need(bool(self.model.path), "model.path", "is required")
        need(bool(self.data.path), "data.path", "is required")
        need(len(self.reward.functions) + len(self.reward.remote) > 0 or bool(self.reward.model.path)
             or bool(self.env.cls), "reward", "needs at least one of reward.functions, reward.remote, "
             "reward.model.path or an environment (env.cls)")
        self._validate_env(need)
        for i, r in enumerate(self.reward.remote):
            need(r.url.startswith(("http://", "https://")), f"reward.remote.{i}.url",
                 f"{r.url!r} is not an http(s) URL")
            need(r.timeout_s > 0 and r.retries >= 0 and r.backoff_s >= 0 and r.max_request_mb > 0,
                 f"reward.remote.{i}", "needs timeout_s > 0, retries >= 0, backoff_s >= 0, max_request_mb > 0")
        need(self.reward.model.batch_size > 0, "reward.model.batch_size", "must be > 0")
        need(self.reward.model.max_restarts >= 0, "reward.model.max_restarts", "must be >= 0")
        need(self.rollout.max_restarts >= 0, "rollout.max_restarts", "must be >= 0")
        need(self.rollout.threads >= 0 and self.train.threads >= 0, "rollout.threads/train.threads", "must be >= 0")
        need(self.rollout.max_staleness >= 0, "rollout.max_staleness", "must be >= 0")
        need(self.rollout.timeout_s > 0, "rollout.timeout_s", "must be > 0")
        need(self.rollout.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be >= 1")
        if self.resources.colocate:
            need(self.rollout.mode == "sync", "resources.colocate",
                 "needs rollout.mode=sync (colocated generator and trainer take turns on one device)")
            need(self.rollout.tensor_parallel_size == 1 and self.rollout.num_generators <= self.train.ranks,
                 "resources.colocate", "needs rollout.tensor_parallel_size=1 and rollout.num_generators <= "
                 "train.ranks (generator i shares trainer rank i's device)")
        need(self.resources.gpu_memory_gb > 0 and self.resources.node_memory_gb >= 0, "resources.gpu_memory_gb",
             "gpu_memory_gb must be > 0 and node_memory_gb >= 0")
        need(self.rollout.buffer_groups == 0 or self.rollout.buffer_groups >= self.rollout.prompts_per_step,
             "rollout.buffer_groups", f"must be 0 (automatic) or >= rollout.prompts_per_step "
             f"({self.rollout.prompts_per_step}): a smaller buffer can never hold a batch")
        for key in ("generator_cores", "trainer_cores"):
            cores = getattr(self.resources, key)
            need(all(c >= 0 for c in cores) and len(set(cores)) == len(cores), f"resources.{key}",
                 f"{list(cores)} must be distinct core ids >= 0")
        need(self.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
        need(self.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
        need(self.eval.every >= 0, "eval.every", "must be >= 0")
        need(self.logging.samples_per_step >= 0, "logging.samples_per_step", "must be >= 0")
        need(not self.eval.every or bool(self.eval.data.path), "eval.data.path", "is required when eval.every > 0")
        need(self.eval.num_prompts > 0, "eval.num_prompts", "must be > 0")
        for i, r in enumerate(self.reward.functions):
            need(":" in r.fn, f"reward.functions.{i}.fn", f"{r.fn!r} must look like 'pkg.mod:fn' or 'file.py:fn'")
        need(self.reward.timeout_s > 0, "reward.timeout_s", "must be > 0")
        need(self.reward.workers > 0, "reward.workers", "must be > 0")
        need(abs(self.reward.penalty) < float("inf"), "reward.penalty", "must be a finite number")
        need(self.steps > 0, "steps", "must be > 0")
        for key in ("num_generators", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "kv_cache_gb"):
            need(getattr(self.rollout, key) > 0, f"rollout.{key}", "must be > 0")
        need(self.rollout.temperature > 0, "rollout.temperature", "must be > 0 (greedy rollouts give GRPO no signal)")
        need(0 < self.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        need(self.train.ranks > 0, "train.ranks", "must be > 0")
        need(self.train.lr > 0, "train.lr", "must be > 0")
        need(not self.train.offload_optimizer or self.train.zero_stage >= 1, "train.offload_optimizer",
             "needs train.zero_stage >= 1 (ZeRO-Offload partitions the optimizer states)")
        need(not self.train.offload_params or self.train.zero_stage == 3, "train.offload_params",
             "needs train.zero_stage = 3 (only ZeRO-3 partitions the parameters)")
        if self.train.lora_rank:
            targets = set(self.train.lora_target_modules)
            need(self.train.lora_rank > 0 and bool(targets), "train.lora_rank", "must be >= 0, with target modules")
            need(self.train.zero_stage <= 2, "train.lora_rank", "LoRA needs train.zero_stage <= 2 (the adapters "
                 "are small; ZeRO-3 partitioning of the frozen base is not supported with them)")
            for group in FUSED_GROUPS:
                need(not (targets & set(group)) or set(group) <= targets, "train.lora_target_modules",
                     f"{sorted(targets & set(group))} without {sorted(set(group) - targets)}: vLLM fuses "
                     f"{'/'.join(group)} into one module, so adapt all of them or none")
        need(self.train.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
        per_step = self.train.micro_batch_size * self.train.ranks
        need(self.train.mini_batch_size % per_step == 0, "train.mini_batch_size",
             f"{self.train.mini_batch_size} must be a multiple of micro_batch_size * ranks = {per_step}")
        need(self.rollout_batch_size % self.train.mini_batch_size == 0, "train.mini_batch_size",
             f"{self.train.mini_batch_size} must divide the rollout batch "
             f"(prompts_per_step * samples_per_prompt = {self.rollout_batch_size})")
        need(self.algorithm.ppo_epochs > 0, "algorithm.ppo_epochs", "must be > 0")
        need(self.algorithm.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0")
        need(0 <= self.algorithm.clip_low < 1, "algorithm.clip_low", "must be in [0, 1)")
        need(self.algorithm.clip_high >= 0, "algorithm.clip_high", "must be >= 0")
        for key, registry in (("advantage", algorithms.ADVANTAGE_ESTIMATORS),
                              ("policy_loss", algorithms.POLICY_LOSSES),
                              ("correction", algorithms.CORRECTIONS),
                              ("loss_agg", algorithms.LOSS_AGGREGATIONS),
                              ("kl_estimator", algorithms.KL_ESTIMATORS)):
            name = getattr(self.algorithm, key)
            need(name in registry, f"algorithm.{key}", f"unknown {name!r}; choose one of {sorted(registry)}")
        self._validate_objective(need)
        need(self.critic.lr > 0, "critic.lr", "must be > 0")
        need(self.critic.value_clip >= 0, "critic.value_clip", "must be >= 0")
        need(self.algorithm.entropy_coef >= 0, "algorithm.entropy_coef", "must be >= 0")
        need(self.algorithm.max_sampling_rounds > 0, "algorithm.max_sampling_rounds", "must be > 0")
        need(0 <= self.algorithm.overlong_buffer < self.rollout.max_new_tokens, "algorithm.overlong_buffer",
             f"must be in [0, rollout.max_new_tokens={self.rollout.max_new_tokens})")
        need(not (self.algorithm.dynamic_sampling and self.rollout.samples_per_prompt < 2),
             "algorithm.dynamic_sampling", "needs rollout.samples_per_prompt >= 2 (a group of one has no spread)")
        need(0 <= self.algorithm.gamma <= 1, "algorithm.gamma", "must be in [0, 1]")
        need(0 <= self.algorithm.lam <= 1, "algorithm.lam", "must be in [0, 1]")
        need(self.weight_sync.bucket_mb > 0, "weight_sync.bucket_mb", "must be > 0")
        need(self.weight_sync.timeout_s > 0, "weight_sync.timeout_s", "must be > 0")
        need(self.weight_sync.logprob_gap_alarm >= 0, "weight_sync.logprob_gap_alarm", "must be >= 0 (0: by dtype)")
        # Settings that only one mode reads are refused in the other: the run would not do what they say.
        for section, key, active, when in (
                ("rollout", "max_staleness", self.rollout.mode == "async", "rollout.mode=async"),
                ("rollout", "inflight_on_update", self.rollout.mode == "async", "rollout.mode=async"),
                *(("critic", f.name, self.uses_critic, "a critic (algorithm.advantage=gae)")
                  for f in dataclasses.fields(CriticConfig))):
            value, default = getattr(getattr(self, section), key), getattr(type(getattr(self, section))(), key)
            need(active or value == default, f"{section}.{key}", f"is set to {value!r}, but is read only with {when}")
        return self

    def _validate_env(self, need) -> None:
        e = self.env
        need(not e.cls or ":" in e.cls, "env.cls", f"{e.cls!r} must look like 'pkg.mod:Class' or 'file.py:Class'")
        for i, t in enumerate(e.tools):
            need(t == "python" or ":" in t, f"env.tools.{i}", f"{t!r} must be 'python' or look like 'pkg.mod:fn'")
        if not e.active:
            defaults = EnvConfig()
            for f in dataclasses.fields(EnvConfig):
                need(getattr(e, f.name) == getattr(defaults, f.name), f"env.{f.name}",
                     "is read only with an environment or tools (env.cls, env.tools)")
            return
        need(self.data.apply_chat_template, "data.apply_chat_template", "must be true with env.cls or env.tools: "
             "the replies of the environment and the tools are rendered by the chat template")
        need(e.max_turns > 0, "env.max_turns", "must be > 0")
        need(e.timeout_s > 0 and e.tool_timeout_s > 0, "env.timeout_s/tool_timeout_s", "must be > 0")
        need(e.tool_max_chars > 0, "env.tool_max_chars", "must be > 0")
        need(abs(e.penalty) < float("inf"), "env.penalty", "must be a finite number")
        need(0 <= e.max_total_tokens <= self.rollout.max_model_len, "env.max_total_tokens",
             f"must be in [0, rollout.max_model_len={self.rollout.max_model_len}] (0: max_model_len)")
        need(self.rollout.max_new_tokens < self.max_total_tokens, "rollout.max_new_tokens",
             f"(per turn) must be below the trajectory's budget {self.max_total_tokens} (env.max_total_tokens)")

    @property
    def max_total_tokens(self) -> int:
        """A multi-turn trajectory's token budget: prompt, turns and replies."""
        return self.env.max_total_tokens or self.rollout.max_model_len

    def _validate_objective(self, need) -> None:
        """Combinations of algorithm.* that would fail, or silently do nothing, are refused by name."""
        from rlhf import algorithms

        a, d = self.algorithm, AlgorithmConfig()
        need(a.tis_cap >= 1, "algorithm.tis_cap", "must be >= 1 (a cap below 1 down-weights even on-policy "
             "tokens; algorithm.correction=none turns the correction off)")
        need(0 <= a.band_low <= 1 <= a.band_high, "algorithm.band_low/band_high",
             f"need 0 <= band_low <= 1 <= band_high, got [{a.band_low}, {a.band_high}]")
        need(a.dual_clip > 1, "algorithm.dual_clip", "must be > 1 (Ye et al. 2020 use 3)")
        need(not a.kl_in_reward or a.kl_coef > 0, "algorithm.kl_in_reward",
             "needs algorithm.kl_coef > 0: with no KL there is nothing to put in the reward")
        estimator, loss = algorithms.ADVANTAGE_ESTIMATORS, algorithms.POLICY_LOSSES
        loss_level, correction_level = loss.trait(a.policy_loss, "level"), algorithms.CORRECTIONS.trait(
            a.correction, "level")
        need(not (loss_level == "sequence" and correction_level == "token" and a.correction != "none"),
             "algorithm.correction", f"{a.correction!r} weighs tokens, but algorithm.policy_loss={a.policy_loss!r} "
             f"is sequence-level: choose a sequence-level correction (seq_tis, seq_mask) or none")
        paper_agg = loss.trait(a.policy_loss, "loss_agg")
        need(paper_agg is None or a.loss_agg == paper_agg, "algorithm.loss_agg",
             f"algorithm.policy_loss={a.policy_loss!r} is defined with {paper_agg!r} aggregation "
             f"(got {a.loss_agg!r}); set algorithm.loss_agg={paper_agg}")
        # A setting that the chosen functions never read is refused: the run would not do what it says.
        used = (estimator.trait(a.advantage, "reads") | loss.trait(a.policy_loss, "reads")
                | algorithms.CORRECTIONS.trait(a.correction, "reads"))
        by_estimator, by_correction = f"the advantage estimator {a.advantage!r}", f"the correction {a.correction!r}"
        readers = {"gamma": by_estimator, "lam": by_estimator, "dual_clip": f"the policy loss {a.policy_loss!r}",
                   "tis_cap": by_correction, "band_low": by_correction, "band_high": by_correction}
        for key, who in readers.items():
            need(key in used or getattr(a, key) == getattr(d, key), f"algorithm.{key}",
                 f"is set to {getattr(a, key)!r}, but {who} does not read it")
        for key, active, when in (("kl_estimator", a.kl_coef > 0, "algorithm.kl_coef > 0"),
                                  ("truncated_penalty", a.truncated == "penalize", "algorithm.truncated=penalize"),
                                  ("max_sampling_rounds", a.dynamic_sampling, "algorithm.dynamic_sampling=true")):
            need(active or getattr(a, key) == getattr(d, key), f"algorithm.{key}",
                 f"is set to {getattr(a, key)!r}, but is read only with {when}")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML (if given), apply `key.sub=value` overrides, build and validate the tree."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(RunConfig, inherit_eval_prompt_format(data)).validate()


EVAL_INHERITS = ("prompt_key", "apply_chat_template", "system_prompt", "max_prompt_tokens")


def inherit_eval_prompt_format(data: dict[str, Any]) -> dict[str, Any]:
    """Held-out prompts are rendered like the training prompts: each of EVAL_INHERITS that `data` sets
    and `eval.data` does not, `eval.data` takes from `data` (a chat model asked in plain text answers
    something else than what it is trained to answer)."""
    train, evaluation = data.get("data"), data.get("eval")
    if not isinstance(train, dict) or not isinstance(evaluation, dict) or not isinstance(evaluation.get("data"), dict):
        return data  # nothing to inherit, or a shape from_dict will name
    inherited = {k: train[k] for k in EVAL_INHERITS if k in train and k not in evaluation["data"]}
    return {**data, "eval": {**evaluation, "data": {**evaluation["data"], **inherited}}}
