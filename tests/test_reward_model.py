"""The reward-model scorer on the real stack: a Ray actor hosting an HF sequence classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from rlhf.config import load_config
from tests.conftest import REPO, TASK, tiny_overrides

pytestmark = pytest.mark.slow
TINY = REPO / "configs" / "grpo_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    from rlhf.tiny_model import build_reward_model

    out = tmp_path_factory.mktemp("tiny-rm")
    build_reward_model(out, corpus=TASK / "prompts.jsonl")
    return out


def test_the_actor_scores_with_the_model(ray_cluster, tiny_model, tiny_rm, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from reward.model import ModelReward, RewardModel

    cfg = load_config(TINY, tiny_overrides(tiny_model, tmp_path, **{"reward.model.path": str(tiny_rm),
                                                                      "reward.model.batch_size": 2}))
    actor = RewardModel.options(num_cpus=0).remote(cfg, "cpu")
    try:
        prompts = ["Compute 1 plus 2 using only digits:"] * 3 + ["Repeat the letter a many times:"]
        completions = [" 3", " 12345", " abc", " aaaa"]
        got = ModelReward(actor)(prompts=prompts, completions=completions)
        again = ModelReward(actor)(prompts=prompts, completions=completions)
    finally:
        ray.kill(actor)
    tok = AutoTokenizer.from_pretrained(tiny_rm)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    with torch.no_grad():  # one at a time: no padding involved in the reference numbers
        want = [model(**tok(p + c, return_tensors="pt")).logits[0, 0].item() for p, c in zip(prompts, completions)]
    assert got == again  # deterministic
    assert got == pytest.approx(want, abs=1e-4)  # batched (2 per forward, padded) equals one at a time
    assert len(set(round(x, 4) for x in got)) == 4, "the model gave the same score to different completions"


def test_a_run_adds_the_reward_model_and_a_python_callable_to_the_yaml_function(ray_cluster, tiny_model, tiny_rm,
                                                                               tmp_path):
    """YAML function (weight 1) + reward model (0.5) + a callable passed from Python (1) + a remote
    reward served over HTTP by the example server on 127.0.0.1 (0.25)."""
    import rlhf
    from tests.test_remote_reward import example_server_module, running

    def brevity(completions, **kwargs):
        return [1.0 / (1 + len(c)) for c in completions]

    with running(example_server_module().make_server(port=0)) as url:
        cfg = load_config(TINY, tiny_overrides(tiny_model, tmp_path, **{
            "steps": 3, "reward.model.path": str(tiny_rm), "reward.model.weight": 0.5,
            "reward.remote": f"[{{url: '{url}', weight: 0.25}}]"}))
        summary = rlhf.run(cfg, reward_fns=[brevity])
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:  # the total is linear in the components, each logged
        want = (r["reward/charset_reward/mean"] + 0.5 * r["reward/reward_model/mean"] + r["reward/brevity/mean"]
                + 0.25 * r["reward/remote.0/mean"])
        assert r["reward/mean"] == pytest.approx(want, abs=1e-5)
        assert r["reward/reward_model/mean"] != 0.0 and 0 < r["reward/brevity/mean"] <= 1
        # the server computes the same charset score as the local function
        assert r["reward/remote.0/mean"] == pytest.approx(r["reward/charset_reward/mean"], abs=1e-6)
