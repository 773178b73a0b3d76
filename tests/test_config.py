from pathlib import Path

import pytest

from rlhf.config import ConfigError, RunConfig, from_dict, load_config

TINY = "configs/grpo_tiny.yaml"


def test_tiny_config_loads_and_derives_batch_sizes():
    cfg = load_config(TINY)
    assert cfg.rollout_batch_size == 32  # 8 prompts x 4 samples
    assert cfg.grad_accum_steps == 2  # a mini-batch of 32 in micro-batches of 16 on 1 rank
    cfg = load_config(TINY, ["train.micro_batch_size=4", "train.ranks=2"])
    assert cfg.grad_accum_steps == 4  # 32 / (4 x 2 ranks)


def test_overrides_are_typed_and_nested():
    cfg = load_config(TINY, ["train.lr=1e-3", "rollout.temperature=0.5", "train.zero_stage=2",
                             "reward.functions.0.weight=2", "data.shuffle=true"])
    assert cfg.train.lr == 1e-3 and cfg.rollout.temperature == 0.5 and cfg.train.zero_stage == 2
    assert cfg.reward.functions[0].weight == 2.0 and cfg.data.shuffle is True


@pytest.mark.parametrize("override, message", [
    ("rollout.temprature=0.5", r"rollout.temprature: unknown key \(did you mean rollout.temperature\?\)"),
    ("train.lr=fast", r"train.lr: expected a number, got 'fast'"),
    ("train.zero_stage=4", r"train.zero_stage: 4 is not one of \[0, 1, 2, 3\]"),
    ("rollout.samples_per_prompt=2.5", r"rollout.samples_per_prompt: expected an integer"),
    ("data.shuffle=1", r"data.shuffle: expected true or false"),
    ("algorithm.advantage=gae2", r"algorithm.advantage: unknown 'gae2'"),
    ("train.mini_batch_size=24", r"train.mini_batch_size: 24 must be a multiple of micro_batch_size \* ranks = 16"),
    ("train.mini_batch_size=64", r"train.mini_batch_size: 64 must divide the rollout batch "
                                 r"\(prompts_per_step \* samples_per_prompt = 32\)"),
    ("rollout.temperature=0", r"rollout.temperature: must be > 0"),
    ("reward.functions.3.fn=x:y", r"reward.functions.3.fn: '3' is not an index of a list of 1 items"),
    ("lr", r"override 'lr' must look like key.sub=value"),
    ("train=3", r"train: expected a mapping"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_missing_required_and_missing_file():
    with pytest.raises(ConfigError, match="model.path: is required"):
        from_dict(RunConfig, {}).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/no_such.yaml")


def test_config_is_frozen():
    cfg = load_config(TINY)
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_the_estimator_decides_which_models_run():
    assert load_config(TINY, ["algorithm.advantage=gae"]).uses_critic
    assert not load_config(TINY).uses_critic and not load_config(TINY).uses_reference
    assert load_config(TINY, ["algorithm.kl_coef=0.01"]).uses_reference


@pytest.mark.parametrize("override, message", [
    ("algorithm.overlong_buffer=32", r"algorithm.overlong_buffer: must be in \[0, rollout.max_new_tokens=32\)"),
    ("algorithm.truncated=drop", r"algorithm.truncated: 'drop' is not one of \['keep', 'mask', 'penalize'\]"),
    ("critic.value_clip=-1", r"critic.value_clip: must be >= 0"),
])
def test_algorithm_knobs_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_linear_lr_schedule_decays_to_zero_at_the_last_optimizer_step():
    import torch

    from actors.deepspeed_rank import lr_schedule

    # 3 steps x (32 samples / mini-batch 16) x 2 epochs = 12 optimizer steps
    cfg = load_config(None, ["model.path=m", "data.path=d", "reward.functions=[{fn: f.py:g}]", "steps=3",
                             "train.mini_batch_size=16", "algorithm.ppo_epochs=2", "train.lr=0.1",
                             "train.lr_schedule=linear"])
    assert lr_schedule(load_config(None, ["model.path=m", "data.path=d", "reward.functions=[{fn: f.py:g}]"])) is None
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = lr_schedule(cfg)(opt)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * (1 - k / 12) for k in range(12)])
    assert opt.param_groups[0]["lr"] == 0.0
