"""The trainer-vs-generator gap alarm: tight enough in fp32 to catch a stale output layer (measured
4e-3 on SmolLM2, 6e-2 on the tied tiny model), loose enough for bf16 rounding, and able to stop a run."""

from __future__ import annotations

import pytest

from rlhf.config import ConfigError, load_config
from rlhf.driver import WeightDesync, gap_alarm
from tests.conftest import REPO

TINY = REPO / "configs" / "grpo_tiny.yaml"


def test_the_default_alarm_follows_the_dtype_and_an_explicit_one_wins():
    assert load_config(TINY).gap_alarm == 1e-3
    assert load_config(TINY, ["model.dtype=bfloat16"]).gap_alarm == 0.1
    assert load_config(TINY, ["weight_sync.logprob_gap_alarm=0.02"]).gap_alarm == 0.02
    with pytest.raises(ConfigError, match="weight_sync.logprob_gap_alarm: must be >= 0"):
        load_config(TINY, ["weight_sync.logprob_gap_alarm=-1"])
    with pytest.raises(ConfigError, match="weight_sync.on_gap_alarm"):
        load_config(TINY, ["weight_sync.on_gap_alarm=ignore"])


def test_a_desynced_gap_warns_or_stops_and_an_in_sync_gap_does_not(capsys):
    alarm = load_config(TINY).gap_alarm
    assert gap_alarm(2e-5, alarm, step=1, stop=True) == 0.0  # SmolLM2 in sync, fp32
    assert capsys.readouterr().out == ""
    assert gap_alarm(3.7e-3, alarm, step=2, stop=False) == 1.0  # SmolLM2 with a stale tied output layer
    assert "WARNING step 2" in capsys.readouterr().out
    with pytest.raises(WeightDesync, match=r"step 2: .* differ by 0.0037 > weight_sync.logprob_gap_alarm=0.001"):
        gap_alarm(3.7e-3, alarm, step=2, stop=True)
