import subprocess
import sys

from tests.conftest import REPO


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rlhf.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_bad_override_exits_2_naming_the_key():
    out = run_cli("--config", "configs/grpo_tiny.yaml", "rollout.temprature=0.5")
    assert out.returncode == 2
    assert "config error: rollout.temprature: unknown key (did you mean rollout.temperature?)" in out.stderr


def test_missing_config_file():
    out = run_cli("--config", "configs/nope.yaml")
    assert out.returncode == 2 and "configs/nope.yaml does not exist" in out.stderr


def test_tiny_model_builder_writes_a_loadable_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlhf.tiny_model", "--out", str(tmp_path / "m"), "--corpus",
                          "examples/charset/prompts.jsonl"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.head_dim == 64 and sum(p.numel() for p in model.parameters()) < 5_000_000
    assert tok.decode(tok("Compute 12 plus 3")["input_ids"]) == "Compute 12 plus 3"
