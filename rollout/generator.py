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

WORKER_EXTENSION = "weight_sync.vllm_worker.WeightSyncWorker"


def generator_env(cfg: RunConfig, device: str) -> dict[str, str]:
    """Environment for the actor's process, set before vLLM is imported."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.rollout.kv_cache_gb)  # else vLLM asks for ~92% of a node
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in the actor's process: starts ~2x faster
        if cfg.rollout.threads:  # else Ray sets OMP_NUM_THREADS to the actor's CPUs
            env["OMP_NUM_THREADS"] = str(cfg.rollout.threads)
    return env


@ray.remote
class Generator:
    def __init__(self, index: int, cfg: RunConfig, device: str):
        import torch
        from vllm import LLM

        if device == "cpu" and cfg.rollout.threads:
            torch.set_num_threads(cfg.rollout.threads)
        self.index = index
        self.cfg = cfg
        self.llm = LLM(
            model=cfg.model.path,
            dtype=cfg.model.dtype,
            seed=cfg.seed + index,
            max_model_len=cfg.rollout.max_model_len,
            enforce_eager=cfg.rollout.enforce_eager,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            trust_remote_code=cfg.model.trust_remote_code,
            worker_extension_cls=WORKER_EXTENSION,
            # Log-probs after temperature scaling, i.e. of the distribution the tokens were drawn
            # from; the trainer divides its logits by the same temperature.
            logprobs_mode="processed_logprobs",
        )
        self.version = 0

    def generate(self, prompts: list[Prompt], seed: int, greedy: bool = False) -> list[SampleGroup]:
        """samples_per_prompt samples of each prompt; with `greedy`, one argmax completion each."""
        from vllm import SamplingParams

        r = self.cfg.rollout
        if greedy:
            params = [SamplingParams(n=1, temperature=0.0, max_tokens=r.max_new_tokens, logprobs=0)] * len(prompts)
        else:
            params = [SamplingParams(n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p,
                                     top_k=r.top_k, max_tokens=r.max_new_tokens, logprobs=0, seed=seed + p.index)
                      for p in prompts]
        outputs = self.llm.generate([{"prompt_token_ids": p.ids} for p in prompts], params, use_tqdm=False)
        groups = []
        for prompt, out in zip(prompts, outputs, strict=True):
            samples = []
            for c in out.outputs:
                ids = list(c.token_ids)
                logprobs = [step[tok].logprob for tok, step in zip(ids, c.logprobs, strict=True)]
                samples.append(Sample(prompt=prompt, completion_ids=ids, rollout_logprobs=logprobs, text=c.text,
                                      truncated=c.finish_reason == "length", policy_version=self.version,
                                      generator=self.index))
            groups.append(SampleGroup(prompt=prompt, samples=samples))
        return groups

    def serving_version(self) -> int:
        return self.version

    def num_workers(self) -> int:
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    def init_weight_sync(self, endpoint, world_size: int, rank_offset: int, params: list, bucket_bytes: int) -> None:
        self.llm.collective_rpc("init_weight_sync", args=(endpoint.host, endpoint.port, world_size, rank_offset,
                                                          endpoint.backend, self.cfg.weight_sync.timeout_s, params,
                                                          bucket_bytes))

    def receive_weights(self, version: int, verify: bool) -> list[tuple[int, list[int] | None]]:
        """Every worker's (served version, per-tensor checksums or None); the service checks them."""
        reports = self.llm.collective_rpc("receive_weights", args=(version, verify))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.version = min(v for v, _ in reports)
        return reports

    def corrupt_next_receive(self, name: str) -> None:
        """For tests: every worker alters tensor `name` of the next push after receiving it."""
        self.llm.collective_rpc("corrupt_next_receive", args=(name,))

    def close_weight_sync(self) -> None:
        self.llm.collective_rpc("close_weight_sync")


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
