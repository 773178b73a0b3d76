# Copied from the team's peer benchmark, shared/peer_trl (run_trl.py). Added here for bench/vs_trl.py's real-model
# size (smollm2): --reward, --chat, --max-completion-length, --temperature, --max-prompt-length and
# --no-gradient-checkpointing. Without them it runs exactly as the peer's copy does.
"""Peer benchmark: TRL GRPOTrainer (trl 1.16.0) on CPU, fp32.

usage: python run_trl.py --model DIR --prompts FILE --steps N [--use-vllm] [--lr 1e-5] [--out DIR]
                         [--reward MODULE:FUNCTION] [--chat] [--max-completion-length 32] [--temperature 1.0]
                         [--max-prompt-length 64] [--no-gradient-checkpointing]

Per optimizer step: 8 prompts x num_generations=4 = 32 completions (TRL's per_device_train_batch_size counts
completions, so it is 32), max_completion_length 32, beta 0.0, temperature 1.0, fp32, logging every step.
Prints one JSON line per step (step, wall time, reward mean, per-phase times from TRL's profiling hooks) and a
final summary JSON: samples_per_second = completions/s over steps 2..N (step 1 = warm-up excluded), total wall,
mean reward of the first 5 and last 5 steps.

Added options (the defaults are the peer's settings above):
  --reward MODULE:FUNCTION  one of our reward functions (reward/api.py's signature: prompts and completions as
                            strings, the row's other columns by name) in place of the peer's reward.py, wrapped in
                            TRL's signature by trl_reward; imported with the repository root first on sys.path.
  --chat                    each string prompt becomes one user message (a conversational dataset), so TRL renders
                            it with the tokenizer's chat template and an opened assistant turn, as our
                            data.apply_chat_template=true does; prompts are measured after rendering.
  --no-gradient-checkpointing  TRL's GRPOConfig turns activation checkpointing on by default: every layer's
                            forward runs again in the backward pass (~1/3 more compute); our trainer runs without it.
"""
import argparse
import functools
import importlib
import json
import os
import statistics
import sys
import time

T_START = time.time()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS_PER_STEP = 8
NUM_GENERATIONS = 4
MAX_PROMPT_LENGTH = 64  # TRL 1.16 has no max_prompt_length option any more; enforced here by filtering.
TRL_EXTRAS = ("trainer_state", "log_extra", "log_metric", "environments")  # TRL's kwargs that are no dataset column


def _text(x):
    """A TRL prompt or completion as a string: conversational ones are lists of messages."""
    if isinstance(x, list):
        return "".join(m.get("content", "") for m in x if isinstance(m, dict))
    return x


def trl_reward(fn):
    """Our reward function `fn(prompts, completions, completion_ids, **columns)` (strings in, one float or None
    per completion out) in TRL's reward-function signature: TRL passes conversational prompts and completions as
    message lists, and adds its own keyword arguments (TRL_EXTRAS), which are dropped here."""

    @functools.wraps(fn)  # TRL names the reward in its logs by __name__
    def reward(prompts, completions, completion_ids=None, **kwargs):
        columns = {k: v for k, v in kwargs.items() if k not in TRL_EXTRAS}
        return fn(prompts=[_text(p) for p in prompts], completions=[_text(c) for c in completions],
                  completion_ids=completion_ids, **columns)

    return reward


def load_reward(spec):
    """The peer's reward (bench/peer_trl/reward.py) for spec "", else the function `module:name`, wrapped."""
    if not spec:
        from reward import reward  # the peer's module, found first on sys.path (this script's directory)

        return reward
    # the repository root before this directory, whose reward.py would shadow the repository's reward package
    sys.path.insert(0, REPO)
    module, _, name = spec.partition(":")
    return trl_reward(getattr(importlib.import_module(module), name))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--use-vllm", action="store_true")
    # 1e-5 and 1e-4 do not move the reward of this random-init model within 30 steps; 3e-3 does (see README).
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--vllm-cpu-reload-workaround", action="store_true",
                    help="NOT stock TRL: replace TRL's colocate weight sync (per-parameter model.load_weights, which "
                         "fails on vLLM's CPU backend because it prepacks Linear weights and drops the Parameters) by "
                         "vLLM's model_runner.reload_weights(weights_iterator=...), which re-runs the prepacking.")
    ap.add_argument("--out", default=os.path.join(os.environ.get("BENCH_ROOT", "/tmp/peer_trl"), "out", "trl_run"))
    ap.add_argument("--reward", default="", help="MODULE:FUNCTION of a reward in reward/api.py's signature "
                                                 "(default: the peer's reward.py)")
    ap.add_argument("--chat", action="store_true", help="string prompts become user messages (chat template)")
    ap.add_argument("--max-completion-length", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-prompt-length", type=int, default=MAX_PROMPT_LENGTH,
                    help="prompt tokens (after the chat template with --chat); a longer prompt stops the run")
    ap.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="GRPOConfig(gradient_checkpointing=False); TRL's default is True")
    a = ap.parse_args()

    import torch
    import trl
    import trl.extras.profiling as prof
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    reward = load_reward(a.reward)

    # ---- per-phase timing: TRL only ships its profiling timings to wandb/mlflow/trackio; collect them here ----
    phases = {}

    def _log_metrics(self, duration):
        phases[self.name] = phases.get(self.name, 0.0) + duration

    prof.ProfilingContext._log_metrics = _log_metrics

    if a.vllm_cpu_reload_workaround:
        from trl.generation.vllm_generation import VLLMGeneration

        def sync_weights(self):
            assert self.mode == "colocate" and not self.enable_sleep_mode
            weights = [(n, p.detach()) for n, p in self._iter_named_params()]
            self.llm.llm_engine.model_executor.driver_worker.model_runner.reload_weights(weights_iterator=weights)
            self.llm.reset_prefix_cache()

        VLLMGeneration.sync_weights = sync_weights

    tok = AutoTokenizer.from_pretrained(a.model)
    ds = load_dataset("json", data_files=a.prompts, split="train")
    n0 = len(ds)
    if a.chat:  # a conversational dataset: TRL applies the chat template (add_generation_prompt=True)
        ds = ds.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}]}, remove_columns=["prompt"])

        def n_tokens(r):
            return len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
    else:
        def n_tokens(r):
            return len(tok(r["prompt"])["input_ids"])
    ds = ds.filter(lambda r: n_tokens(r) <= a.max_prompt_length)
    assert len(ds) == n0, f"prompts longer than {a.max_prompt_length} tokens were dropped"

    cfg = GRPOConfig(
        output_dir=a.out,
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,  # completions per device per step
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=NUM_GENERATIONS,
        max_completion_length=a.max_completion_length,
        learning_rate=a.lr,
        beta=0.0,
        temperature=a.temperature,
        bf16=False,
        fp16=False,
        use_cpu=True,
        # unless asked, GRPOConfig's own default (True), as the peer runs it
        **({"gradient_checkpointing": False} if a.no_gradient_checkpointing else {}),
        logging_steps=1,
        max_steps=a.steps,
        save_strategy="no",
        report_to="none",
        seed=a.seed,
        # prompts.jsonl alternates the two task kinds, so in-order batches are always 4 "sum" + 4 "repeat" prompts;
        # with TRL's default shuffling the batch mix (and so the mean reward) swings from step to step.
        shuffle_dataset=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_vllm=a.use_vllm,
        vllm_mode="colocate",
        vllm_max_model_length=512 if a.use_vllm else None,
    )

    class StepLogger(TrainerCallback):
        def __init__(self):
            self.t_prev = None
            self.rows = []
            self.step_wall = {}

        def on_train_begin(self, args, state, control, **kw):
            self.t_prev = time.time()
            self.t_train_begin = self.t_prev

        def on_step_end(self, args, state, control, **kw):
            now = time.time()
            self.step_wall[state.global_step] = now - self.t_prev
            self.t_prev = now

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "reward" not in logs:
                return
            s = state.global_step
            row = {"step": s, "wall_s": round(self.step_wall.get(s, float("nan")), 3),
                   "t_since_start_s": round(time.time() - T_START, 2),
                   "reward_mean": round(logs["reward"], 4), "reward_std": round(logs.get("reward_std", 0.0), 4),
                   "completion_len_mean": round(logs.get("completions/mean_length", 0.0), 2),
                   "trl_step_time_s": logs.get("step_time"), "grad_norm": logs.get("grad_norm"),
                   "loss": logs.get("loss"), "entropy": logs.get("entropy"),
                   "vllm_vs_trainer_logp_diff_mean": logs.get("sampling/sampling_logp_difference/mean"),
                   "phases_s": {k: round(v, 3) for k, v in sorted(phases.items())}}
            phases.clear()
            self.rows.append(row)
            print(json.dumps(row), flush=True)

    cb = StepLogger()
    t_init = time.time()
    trainer = GRPOTrainer(model=a.model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[cb])
    init_s = time.time() - t_init
    phases.clear()
    print(json.dumps({"event": "trainer_ready", "init_s": round(init_s, 2), "trl": trl.__version__,
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "use_vllm": a.use_vllm,
                      "gradient_checkpointing": cfg.gradient_checkpointing, "chat": a.chat,
                      "reward": a.reward or "peer_trl/reward.py"}),
          flush=True)
    t_train = time.time()
    trainer.train()
    train_s = time.time() - t_train

    rows = cb.rows
    steady = [r for r in rows if r["step"] >= 2]
    steady_s = sum(r["wall_s"] for r in steady)
    n_comp = PROMPTS_PER_STEP * NUM_GENERATIONS
    phase_tot = {}
    for r in steady:
        for k, v in r["phases_s"].items():
            phase_tot[k] = phase_tot.get(k, 0.0) + v
    summary = {
        "summary": "run_trl", "use_vllm": a.use_vllm,
        "vllm_cpu_reload_workaround": a.vllm_cpu_reload_workaround, "steps": len(rows), "lr": a.lr,
        "completions_per_step": n_comp,
        "samples_per_second": round(n_comp * len(steady) / steady_s, 3) if steady else None,
        "step_s_median": round(statistics.median(r["wall_s"] for r in steady), 3) if steady else None,
        "step_s_min": round(min(r["wall_s"] for r in steady), 3) if steady else None,
        "step_s_max": round(max(r["wall_s"] for r in steady), 3) if steady else None,
        "step1_s": rows[0]["wall_s"] if rows else None,
        "phases_s_per_step_mean_steps2toN": {k: round(v / len(steady), 3) for k, v in sorted(phase_tot.items())},
        "reward_first5_mean": round(statistics.mean(r["reward_mean"] for r in rows[:5]), 4),
        "reward_last5_mean": round(statistics.mean(r["reward_mean"] for r in rows[-5:]), 4),
        "trainer_init_s": round(init_s, 2), "train_s": round(train_s, 2),
        "total_wall_s": round(time.time() - T_START, 2),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
