"""The rollout generator: a Ray actor hosting one vLLM engine.

It turns prompts into groups of samples_per_prompt completions with token ids and the per-token
log-probs of the sampled tokens, stamped with the policy version its weights come from. Weights
arrive through the weight-sync group (weight_sync.vllm_worker), never through disk.
"""

from __future__ import annotations

from collections.abc import Callable

import ray

from rlhf.config import RunConfig
from rlhf.types import Prompt, Sample, SampleGroup
from rollout.decode import completion_texts

WORKER_EXTENSION = "weight_sync.vllm_worker.WeightSyncWorker"


def generator_env(cfg: RunConfig, device: str) -> dict[str, str]:
    """Environment for the actor's process, set before vLLM is imported."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.rollout.kv_cache_gb)  # else vLLM asks for ~92% of a node
        if cfg.rollout.tensor_parallel_size == 1:
            # Engine core and model worker run inside the actor's process, as in `vllm.LLM` (vLLM's CPU platform
            # otherwise forces a worker process, and the engine core runs in one more): no process boundary on
            # the generator's cores, no shared-memory hop per decoding step (rollout.engine). At 48M parameters
            # the worker's own process alone cost a batch 2.0 s instead of 1.35 s.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if cfg.rollout.threads:  # else Ray sets OMP_NUM_THREADS to the actor's CPUs
            env["OMP_NUM_THREADS"] = str(cfg.rollout.threads)
        if cfg.resources.generator_cores:  # vLLM binds its OMP threads to these cores, not to a whole NUMA node
            env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind(cfg.resources.generator_cores,
                                                        cfg.rollout.tensor_parallel_size)
    return env


def omp_bind(cores: tuple[int, ...] | list[int], tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `tp` CPU workers: the cores split into tp contiguous groups,
    "0,1|2,3". vLLM's automatic binding gives each TP worker a NUMA node, which a laptop has one of."""
    cores = sorted(cores)
    if len(cores) < tp:
        raise ValueError(f"rollout.tensor_parallel_size={tp} needs at least {tp} CPU cores, the generator has "
                         f"{cores}")
    bounds = [round(i * len(cores) / tp) for i in range(tp + 1)]
    return "|".join(",".join(map(str, cores[bounds[i]:bounds[i + 1]])) for i in range(tp))


class RunEnded(RuntimeError):
    """A request of a run that has ended (Generator.reset): nobody waits for its result any more."""


@ray.remote
class Generator:
    """An async Ray actor around a vLLM LLMEngine stepped on a thread of its own (rollout.engine): every
    call is a coroutine, so groups submitted one by one (`generate_group`) share the engine's batches and
    each returns as soon as it is done.

    Weight updates and requests in flight (`rollout.inflight_on_update`): new requests wait at a
    gate while an update runs; with "abort" the running ones are aborted and run again on the new
    weights, with "finish" they complete on the old ones first. Either way every sample comes from
    exactly one policy version, the one it is stamped with."""

    def __init__(self, index: int, cfg: RunConfig, device: str):
        import asyncio
        import os

        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from rollout.engine import EngineThread

        tp = cfg.rollout.tensor_parallel_size
        if device == "cpu" and cfg.resources.generator_cores:
            os.sched_setaffinity(0, cfg.resources.generator_cores)  # the engine thread (and process) inherit it
        if device == "cpu" and tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind(sorted(os.sched_getaffinity(0)), tp)
        self.index = index
        self.cfg = cfg
        from vllm.platforms import current_platform

        # Colocated with a trainer rank: vLLM's sleep mode frees the device between rollouts (GPU only).
        self._can_sleep = cfg.resources.colocate and current_platform.is_sleep_mode_available()
        args = EngineArgs(
            model=cfg.model.path,
            dtype=cfg.model.dtype,
            seed=cfg.seed + index,
            tensor_parallel_size=tp,
            # TP workers as processes of this actor, on the devices Ray gave it. Inside a placement group
            # vLLM would pick its Ray backend, which asks Ray for devices again (and is refused on CPU).
            distributed_executor_backend="mp" if tp > 1 else None,
            max_model_len=cfg.rollout.max_model_len,
            enforce_eager=cfg.rollout.enforce_eager,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            trust_remote_code=cfg.model.trust_remote_code,
            worker_extension_cls=WORKER_EXTENSION,
            # Log-probs after temperature scaling, i.e. of the distribution the tokens were drawn
            # from; the trainer divides its logits by the same temperature.
            logprobs_mode="processed_logprobs",
            disable_log_stats=True,
            enable_sleep_mode=self._can_sleep,
            # On CPU no prompt is prefilled in chunks: a chunked prefill discards the token it samples and
            # rewinds the request's seeded generator (gpu_model_runner: gen.set_offset), which a CPU
            # torch.Generator cannot do ("CPU Generator does not use offset"); every rollout request is
            # seeded. Seen once a step's prompts exceed the batch's token budget (multi-turn trajectories).
            enable_chunked_prefill=False if device == "cpu" else None,
            max_num_batched_tokens=max(cfg.rollout.max_model_len, 2048) if device == "cpu" else None,
        )
        self.engine = EngineThread(lambda: LLMEngine.from_engine_args(args))
        self.agent = None
        if cfg.env.active:  # multi-turn rollouts: environment, tools (rollout/agent.py)
            from rollout.agent import Agent

            self.agent = Agent(cfg)
        self.version = 0
        self._open = asyncio.Event()  # cleared while a weight update runs
        self._open.set()
        self._idle = asyncio.Event()  # set while no request is in flight
        self._idle.set()
        self._inflight: set[str] = set()
        self._delay_s = 0.0
        self._run = 0  # counts reset()s: a request of an earlier run never starts, or restarts, on a later one

    async def _complete(self, ids: list[int], params, run: int) -> tuple:
        """Run one request of run `run` (see reset) to its end on one policy version: (the final
        RequestOutput, that version)."""
        import uuid

        while True:
            await self._open.wait()
            if run != self._run:
                raise RunEnded(f"generator-{self.index}: the run this request belongs to has ended")
            version, request_id = self.version, uuid.uuid4().hex
            self._inflight.add(request_id)
            self._idle.clear()
            try:
                final = await self.engine.generate(request_id, {"prompt_token_ids": ids}, params)
            finally:
                self._inflight.discard(request_id)
                if not self._inflight:
                    self._idle.set()
            if final is not None:
                return final, version
            # aborted by a weight update: run again, on the new weights (or by reset: end)

    def _params(self, prompt: Prompt, seed: int, greedy: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        r = self.cfg.rollout
        # detokenize=False: generate_group decodes each finished completion once (completion_texts)
        if greedy:
            return SamplingParams(n=1, temperature=0.0, max_tokens=r.max_new_tokens, logprobs=0,
                                  output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False)
        return SamplingParams(n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_tokens=r.max_new_tokens, logprobs=0, seed=seed + prompt.index,
                              output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False)

    async def generate_group(self, prompt: Prompt, seed: int, greedy: bool = False) -> SampleGroup:
        """samples_per_prompt samples of one prompt (with `greedy`, one argmax completion), seeded by
        seed + prompt.index so that the group does not depend on what else the engine is running."""
        import asyncio

        if self.agent is not None:
            return await self._multi_turn_group(prompt, seed, greedy)
        out, version = await self._complete(prompt.ids, self._params(prompt, seed, greedy), self._run)
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        samples = []
        completions = [list(c.token_ids) for c in out.outputs]
        for c, ids, text in zip(out.outputs, completions, completion_texts(self.engine.llm.tokenizer, prompt.ids,
                                                                          completions), strict=True):
            logprobs = [step[tok].logprob for tok, step in zip(ids, c.logprobs, strict=True)]
            samples.append(Sample(prompt=prompt, completion_ids=ids, rollout_logprobs=logprobs, text=text,
                                  truncated=c.finish_reason == "length", policy_version=version,
                                  generator=self.index))
        return SampleGroup(prompt=prompt, samples=samples)

    async def _multi_turn_group(self, prompt: Prompt, seed: int, greedy: bool) -> SampleGroup:
        """The group as samples_per_prompt trajectories run side by side (rollout/agent.py), each with its
        own environment; their turns share the engine's batches with every other request in flight."""
        import asyncio

        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from rollout.agent import TurnOutput, run_episode

        r, agent, run = self.cfg.rollout, self.agent, self._run

        async def complete(ids: list[int], max_tokens: int, turn_seed: int) -> TurnOutput:
            params = SamplingParams(n=1, temperature=0.0 if greedy else r.temperature, top_p=r.top_p, top_k=r.top_k,
                                    max_tokens=max_tokens, logprobs=0, seed=None if greedy else turn_seed,
                                    output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False)
            out, version = await self._complete(ids, params, run)
            c = out.outputs[0]
            tokens = list(c.token_ids)
            return TurnOutput(tokens, [step[t].logprob for t, step in zip(tokens, c.logprobs, strict=True)],
                              cut=c.finish_reason == "length", version=version)

        prompt_ids = agent.prompt_ids(prompt)
        base = (seed + prompt.index) * 64  # each trajectory's seed depends only on its prompt and place in the group
        episodes = await asyncio.gather(*(
            run_episode(complete, agent.decode, agent.renderer, prompt_ids, agent.prompt_messages(prompt),
                        agent.settings, base + k, runner=agent.runner(prompt.row), toolbox=agent.toolbox)
            for k in range(1 if greedy else r.samples_per_prompt)))
        return SampleGroup(prompt=prompt, samples=[agent.sample(prompt, e, self.index, self.version)
                                                   for e in episodes])

    async def generate(self, prompts: list[Prompt], seed: int, greedy: bool = False) -> list[SampleGroup]:
        """generate_group for every prompt, run together; groups in prompt order."""
        import asyncio

        return list(await asyncio.gather(*(self.generate_group(p, seed, greedy) for p in prompts)))

    async def sleep(self) -> bool:
        """Free the KV cache and move the weights to host memory (vLLM sleep level 1) while the colocated
        trainer trains. False, doing nothing, where the platform has no sleep mode (CPU)."""
        if not self._can_sleep:
            return False
        await self.engine.call(self.engine.llm.sleep, level=1)
        return True

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back the device memory sleep() freed: "weights", "kv_cache", or (None) both; what is
        awake already stays as it is. A no-op where the platform has no sleep mode."""
        if self._can_sleep and await self.engine.call(self.engine.llm.is_sleeping):
            await self.engine.call(self.engine.llm.wake_up, tags)

    async def reset_prefix_cache(self) -> None:
        await self.engine.call(self.engine.llm.reset_prefix_cache)

    async def engine_only(self, prompts: list[Prompt], seed: int) -> tuple[float, int, int, int]:
        """For bench/rollout_overhead.py: the engine alone on one batch, timed here, without Ray or the
        conversion to samples -> (seconds, tokens, completions, torch threads)."""
        import asyncio
        import time

        import torch

        t0 = time.perf_counter()
        done = await asyncio.gather(*(self._complete(p.ids, self._params(p, seed, False), self._run)
                                     for p in prompts))
        dt = time.perf_counter() - t0
        outs = [out for out, _version in done]
        return dt, sum(len(c.token_ids) for o in outs for c in o.outputs), sum(len(o.outputs) for o in outs), \
            await self.engine.call(torch.get_num_threads)  # the engine thread's

    async def reset(self, cfg: RunConfig) -> None:
        """Serve another run of the same shape (rlhf.topology.TopologyPool): the last run's requests still
        in flight are aborted and never restarted, its settings give way to `cfg`'s, and a test's
        slow_down ends. The weights stay until the new run's first push (version 0, its trainer's)."""
        self._run += 1
        if self._inflight:
            await self.engine.abort(list(self._inflight))
        await self._idle.wait()
        self.cfg, self._delay_s = cfg, 0.0
        self.agent = None
        if cfg.env.active:
            from rollout.agent import Agent

            self.agent = Agent(cfg)

    def serving_version(self) -> int:
        return self.version

    def slow_down(self, delay_s: float) -> None:
        """For tests: every group returns delay_s seconds late (a slow or overloaded engine)."""
        self._delay_s = delay_s

    def num_workers(self) -> int:
        return self.engine.llm.vllm_config.parallel_config.world_size

    async def init_weight_sync(self, endpoint, world_size: int, rank_offset: int, params: list,
                               bucket_bytes: int) -> None:
        await self._workers("init_weight_sync", endpoint.host, endpoint.port, world_size, rank_offset,
                            endpoint.backend, self.cfg.weight_sync.timeout_s, params, bucket_bytes,
                            self.cfg.train.lora_rank > 0)

    async def receive_weights(self, version: int, verify: bool) -> list[tuple[int, list[int] | None]]:
        """Every worker's (served version, per-tensor checksums or None); the service checks them."""
        self._open.clear()
        try:
            if self._inflight and self.cfg.rollout.inflight_on_update == "abort":
                await self.engine.abort(list(self._inflight))
            await self._idle.wait()  # bounded by the service's deadline on this call
            reports = await self._workers("receive_weights", version, verify)
            # cached KV blocks were computed with the old weights
            await self.engine.call(self.engine.llm.reset_prefix_cache)
            self.version = min(v for v, _ in reports)
        finally:
            self._open.set()
        return reports

    async def corrupt_next_receive(self, name: str) -> None:
        """For tests: every worker alters tensor `name` of the next push after receiving it."""
        await self._workers("corrupt_next_receive", name)

    async def close_weight_sync(self) -> None:
        await self._workers("close_weight_sync")

    async def _workers(self, method: str, *args) -> list:
        """Every vLLM worker's answer to `method` of the weight-sync extension (weight_sync.vllm_worker)."""
        return await self.engine.call(self.engine.llm.collective_rpc, method, args=args)


def generate_groups(generators: list, prompts: list[Prompt], seed: int, greedy: bool = False,
                    restart: Callable[[int], None] | None = None) -> list[SampleGroup]:
    """Split the prompts over the generator actors; groups come back in prompt order.

    A generator that dies on the way loses only its share: `restart(i)` replaces generators[i] (a
    new engine serving the current weights) and that share is generated again there, with the same
    per-prompt seeds. Without `restart`, the death is an error naming the generator."""
    n = len(generators)
    bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
    shares = {i: prompts[bounds[i]:bounds[i + 1]] for i in range(n) if bounds[i] < bounds[i + 1]}
    done: dict[int, list[SampleGroup]] = {}
    while shares:
        refs = {i: generators[i].generate.remote(share, seed, greedy) for i, share in shares.items()}
        dead = []
        for i, ref in refs.items():
            try:
                done[i] = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if restart is None:
                    raise RuntimeError(f"generator-{i} died while generating ({type(e).__name__})") from e
                dead.append(i)
        for i in dead:
            restart(i)
        shares = {i: shares[i] for i in dead}
    return [group for i in sorted(done) for group in done[i]]
