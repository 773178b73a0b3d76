"""The policy objective, GSPO, CISPO and the off-policy corrections: hand-computed numbers, the
first-update invariants for every loss and correction, and the combinations the config refuses."""

import math

import pytest
import torch

from rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    CORRECTIONS,
    POLICY_LOSSES,
    CorrectionParams,
    EstimatorInputs,
    ObjectiveInputs,
    ObjectiveSettings,
    ObjectiveStats,
    PolicyLossParams,
    loss_denominator,
    policy_objective,
)
from rlhf.config import ConfigError, load_config

TINY = "configs/grpo_tiny.yaml"
ln = math.log


def test_gspo_clips_the_sequence_ratio_and_has_gspos_gradient():
    # sample 1: logp - old = ln2, 0 on its mask -> s = exp(ln2 / 2) = 1.4142; A = +1 -> clipped at 1.2
    # sample 2: logp - old = .1, -.1, .3 -> s = exp(.1) = 1.10517; A = -1 -> inside the band: loss 1.10517
    old = torch.zeros(2, 3)
    logp = torch.tensor([[ln(2), 0.0, 5.0], [0.1, -0.1, 0.3]], requires_grad=True)  # 5.0 is off the mask
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([[1.0], [-1.0]]) * mask
    out = POLICY_LOSSES["gspo"](logp, old, adv, mask, PolicyLossParams(0.2, 0.2))
    s2 = math.exp(0.1)
    torch.testing.assert_close(out.ratio * mask, torch.tensor([[math.sqrt(2), math.sqrt(2), 0.0], [s2, s2, s2]]))
    torch.testing.assert_close(out.loss * mask, torch.tensor([[-1.2, -1.2, 0.0], [s2, s2, s2]]))
    assert (out.clipped * mask).tolist() == [[True, True, False], [False, False, False]]
    # seq-mean-token-mean: (1/2) * sum_i 1/|y_i| sum_t loss_t; sample 2's tokens get (1/2)(1/3) * s2 each
    denom = loss_denominator(mask, "seq-mean-token-mean", 3)
    from rlhf.algorithms import aggregate

    aggregate(out.loss, mask, "seq-mean-token-mean", denom).backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [s2 / 6, s2 / 6, s2 / 6]]))
    # ... which is the gradient of GSPO's sequence objective (1/2) * (-A_2 * s_2), s_2 = exp(mean of logp - old)
    direct = logp.detach()[1].clone().requires_grad_()
    (0.5 * torch.exp(direct.mean())).backward()
    torch.testing.assert_close(logp.grad[1], direct.grad)


def test_cispo_clips_the_weight_and_keeps_every_tokens_gradient():
    # ratios 1.5, 0.5, 1.0 with A = +1, -1, +2 and clip .2/.2: weights 1.2, 0.8, 1.0 (no gradient)
    old = torch.zeros(1, 3)
    logp = torch.tensor([[ln(1.5), ln(0.5), 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    out = POLICY_LOSSES["cispo"](logp, old, adv, torch.ones(1, 3), PolicyLossParams(0.2, 0.2))
    torch.testing.assert_close(out.loss, torch.tensor([[-1.2 * ln(1.5), 0.8 * ln(0.5), 0.0]]))
    assert out.clipped.tolist() == [[True, True, False]]
    out.loss.sum().backward()
    # d(-w A logp)/dlogp = -w A: PPO would give tokens 1 and 2 no gradient; CISPO gives -1.2 and +0.8
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.2, 0.8, -2.0]]))


# rho = pi_old / pi_rollout: row 1: 1, 3; row 2: .5, .2
OLD = torch.tensor([[ln(0.5), ln(0.9)], [ln(0.2), ln(0.1)]])
ROLLOUT = torch.tensor([[ln(0.5), ln(0.3)], [ln(0.4), ln(0.5)]])
MASK = torch.ones(2, 2)


@pytest.mark.parametrize("name,params,weight,changed", [
    ("none", CorrectionParams(), [[1, 1], [1, 1]], [[0, 0], [0, 0]]),
    ("token_tis", CorrectionParams(tis_cap=2.0), [[1, 2], [0.5, 0.2]], [[0, 1], [0, 0]]),
    # the band is closed: .5 stays, .2 and 3 go
    ("token_mask", CorrectionParams(band_low=0.5, band_high=2.0), [[1, 0], [0.5, 0]], [[0, 1], [0, 1]]),
    # geometric means: row 1 sqrt(3) = 1.732, row 2 sqrt(.1) = .3162
    ("seq_tis", CorrectionParams(tis_cap=1.5), [[1.5, 1.5], [0.1**0.5] * 2], [[1, 1], [0, 0]]),
    ("seq_mask", CorrectionParams(band_low=0.5, band_high=2.0), [[1, 1], [0, 0]], [[0, 0], [1, 1]]),
])
def test_corrections_by_hand(name, params, weight, changed):
    out = CORRECTIONS[name](OLD.clone().requires_grad_(), ROLLOUT, MASK, params)
    torch.testing.assert_close(out.weight, torch.tensor(weight, dtype=torch.float32))
    assert out.changed.int().tolist() == changed
    assert not out.weight.requires_grad  # a weight, not a path for gradients


def test_sequence_corrections_read_only_the_mask():
    # row 2 without its second token: its geometric mean is .5, inside the band, so it is kept
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = CORRECTIONS["seq_mask"](OLD, ROLLOUT, mask, CorrectionParams(band_low=0.5, band_high=2.0))
    assert out.weight.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_corrections_refuse_bad_bounds():
    with pytest.raises(ValueError, match="cap must be >= 1"):
        CORRECTIONS["token_tis"](OLD, ROLLOUT, MASK, CorrectionParams(tis_cap=0.5))
    with pytest.raises(ValueError, match="band_low <= 1 <= band_high"):
        CORRECTIONS["token_mask"](OLD, ROLLOUT, MASK, CorrectionParams(band_low=1.2))


def test_objective_by_hand():
    # first update (logp == old), rho = 1 and 3, A = 1, token_tis cap 2 -> weights 1, 2
    # policy: -(1 * 1 + 2 * 1) / 2 tokens = -1.5
    # KL in the loss: ref = logp + ln2 -> k3 = 2 - 1 - ln2 = .30685 per token, token-mean .30685, x .1
    # entropy .5 and 1.5 -> token-mean 1.0, x .01
    logp = torch.tensor([[ln(0.5), ln(0.9)]], requires_grad=True)
    rollout = torch.tensor([[ln(0.5), ln(0.3)]])
    ref = logp.detach() + ln(2)
    x = ObjectiveInputs(logp=logp, old_logp=logp.detach(), rollout_logp=rollout, advantages=torch.ones(1, 2),
                        mask=torch.ones(1, 2), denominator=2.0, ref_logp=ref, entropy=torch.tensor([[0.5, 1.5]]))
    k3 = 1 - ln(2)
    out = policy_objective(x, ObjectiveSettings(kl_coef=0.1, entropy_coef=0.01))
    assert out.loss.item() == pytest.approx(-1.5 + 0.1 * k3 - 0.01 * 1.0)
    out.loss.backward()
    # d/dlogp: policy -A * w / 2 = -.5, -1; KL d k3 / dlogp = 1 - exp(ref - logp) = -1, x .1 / 2 = -.05
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.55, -1.05]]))
    s = out.stats
    assert (s.tokens, s.sequences, s.weight, s.changed_tokens, s.changed_sequences) == (2, 1, 3.0, 1, 1)
    assert s.loss_policy == pytest.approx(-1.5) and s.loss_kl == pytest.approx(k3)
    assert s.ratio_dev_max == 0.0 and s.policy_kl == 0.0 and s.clipped == 0
    assert s.mismatch_ratio_max == pytest.approx(3.0)
    assert s.mismatch_kl == pytest.approx(3 - 1 - ln(3))  # k3(rollout, old): 0 + (3 - 1 - ln 3)
    assert s.gap == pytest.approx(ln(3)) and s.gap_tokens == 2 and s.kl_ref == pytest.approx(2 * k3)
    m = s.metrics(optimizer_steps=1)
    assert m["sync/logprob_gap"] == pytest.approx(ln(3) / 2) and m["correction/changed_token_frac"] == 0.5
    assert m["mismatch/ratio_max"] == pytest.approx(3.0) and m["kl/ref"] == pytest.approx(k3)


def test_the_gap_counts_only_rows_from_the_trainers_weights():
    logp = torch.zeros(2, 2)
    x = ObjectiveInputs(logp=logp, old_logp=logp, rollout_logp=torch.full((2, 2), -0.1), advantages=torch.ones(2, 2),
                        mask=torch.ones(2, 2), denominator=4.0, on_policy=torch.tensor([0.0, 1.0]))
    s = policy_objective(x, ObjectiveSettings()).stats
    assert s.gap == pytest.approx(0.2) and s.gap_tokens == 2
    stale = ObjectiveInputs(**{**x.__dict__, "on_policy": torch.zeros(2)})
    assert "sync/logprob_gap" not in policy_objective(stale, ObjectiveSettings()).stats.metrics(1)


def test_objective_refuses_missing_inputs_by_name():
    x = ObjectiveInputs(logp=torch.zeros(1, 1), old_logp=torch.zeros(1, 1), rollout_logp=torch.zeros(1, 1),
                        advantages=torch.ones(1, 1), mask=torch.ones(1, 1), denominator=1.0)
    with pytest.raises(ValueError, match="no reference log-probs"):
        policy_objective(x, ObjectiveSettings(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        policy_objective(x, ObjectiveSettings(entropy_coef=0.1))


def test_shards_stats_add_up_to_the_whole_batchs():
    torch.manual_seed(0)
    b, t = 6, 4
    logp, old, rollout = torch.randn(b, t), torch.randn(b, t) * 0.1, torch.randn(b, t) * 0.1
    mask, adv = (torch.rand(b, t) > 0.3).float(), torch.randn(b, t)
    denom = loss_denominator(mask, "token-mean", t)
    settings = ObjectiveSettings(correction="token_mask")

    def run(rows):
        return policy_objective(ObjectiveInputs(logp=logp[rows], old_logp=old[rows], rollout_logp=rollout[rows],
                                                advantages=adv[rows], mask=mask[rows], denominator=denom), settings)

    whole = run(slice(0, b))
    parts = [run(slice(0, 2)), run(slice(2, 3)), run(slice(3, b))]
    assert sum(p.loss for p in parts).item() == pytest.approx(whole.loss.item(), rel=1e-6)
    summed = sum((p.stats for p in parts), ObjectiveStats())
    for name in ("tokens", "sequences", "weight", "changed_tokens", "mismatch_kl", "gap", "mismatch_ratio_max"):
        assert getattr(summed, name) == pytest.approx(getattr(whole.stats, name), rel=1e-6), name


@pytest.mark.parametrize("loss", list(POLICY_LOSSES))
@pytest.mark.parametrize("correction", list(CORRECTIONS))
def test_first_update_ratio_one_and_kl_zero_for_every_loss_and_correction(loss, correction):
    torch.manual_seed(1)
    logp = torch.randn(4, 5, requires_grad=True)
    x = ObjectiveInputs(logp=logp, old_logp=logp.detach(), rollout_logp=logp.detach() + 0.05 * torch.randn(4, 5),
                        advantages=torch.randn(4, 1).expand(4, 5), mask=torch.ones(4, 5), denominator=20.0)
    s = policy_objective(x, ObjectiveSettings(policy_loss=loss, correction=correction)).stats
    assert s.ratio_dev_max < 1e-6 and abs(s.policy_kl) < 1e-6 and s.clipped == 0


def test_outcome_estimators_fold_the_kl_into_the_sequence_reward():
    # rewards 1, 0; token rewards -.1, -.1 and 0, (-.3 off the mask) -> sequence rewards .8, 0
    # dr_grpo: r - mean = +-.4 (without the KL: +-.5); rloo with G = 2: 2 * (r - mean) = +-.8
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    x = EstimatorInputs(torch.tensor([1.0, 0.0]), mask, group_size=2,
                        token_rewards=torch.tensor([[-0.1, -0.1], [0.0, -0.3]]))
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["dr_grpo"](x), torch.tensor([[0.4, 0.4], [-0.4, 0.0]]))
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["rloo"](x), torch.tensor([[0.8, 0.8], [-0.8, 0.0]]))


def test_kl_in_reward_takes_the_kl_out_of_the_loss():
    cfg = load_config(TINY, ["algorithm.kl_coef=0.1", "algorithm.kl_in_reward=true"])
    assert cfg.objective.kl_coef == 0.0 and cfg.uses_reference and not cfg.single_update
    assert load_config(TINY, ["algorithm.kl_coef=0.1"]).objective.kl_coef == 0.1


@pytest.mark.parametrize("overrides,key", [
    (["algorithm.kl_in_reward=true"], "algorithm.kl_in_reward"),  # kl_coef 0: nothing to put in the reward
    (["algorithm.policy_loss=gspo", "algorithm.loss_agg=seq-mean-token-mean"], "algorithm.correction"),
    (["algorithm.policy_loss=gspo", "algorithm.correction=seq_tis"], "algorithm.loss_agg"),
    (["algorithm.gamma=0.9"], "algorithm.gamma"),  # grpo reads no discount
    (["algorithm.advantage=reinforce_pp", "algorithm.lam=0.9"], "algorithm.lam"),  # only gae reads lambda
    (["algorithm.dual_clip=4"], "algorithm.dual_clip"),  # only ppo_dual_clip reads it
    (["algorithm.correction=none", "algorithm.tis_cap=3"], "algorithm.tis_cap"),
    (["algorithm.band_high=3"], "algorithm.band_high"),  # token_tis has no band
    (["algorithm.kl_estimator=k1"], "algorithm.kl_estimator"),  # no KL at kl_coef 0
    (["algorithm.truncated_penalty=-2"], "algorithm.truncated_penalty"),  # truncated=keep
    (["algorithm.max_sampling_rounds=8"], "algorithm.max_sampling_rounds"),  # no dynamic sampling
    (["algorithm.tis_cap=0.5"], "algorithm.tis_cap"),
    (["algorithm.correction=token_mask", "algorithm.band_low=1.5"], "algorithm.band_low/band_high"),
    (["algorithm.policy_loss=ppo_dual_clip", "algorithm.dual_clip=1"], "algorithm.dual_clip"),
    (["algorithm.correction=icepop"], "algorithm.correction"),
    (["rollout.max_staleness=3"], "rollout.max_staleness"),  # sync mode trains on the weights just pushed
    (["critic.lr=1e-4"], "critic.lr"),  # grpo runs no critic
])
def test_config_refuses_combinations_that_fail_or_do_nothing(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        load_config(TINY, overrides)


@pytest.mark.parametrize("overrides", [
    ["algorithm.policy_loss=gspo", "algorithm.correction=seq_tis", "algorithm.loss_agg=seq-mean-token-mean"],
    ["algorithm.policy_loss=gspo", "algorithm.correction=none", "algorithm.loss_agg=seq-mean-token-mean"],
    ["algorithm.policy_loss=cispo", "algorithm.correction=token_mask", "algorithm.band_high=5"],
    ["algorithm.policy_loss=ppo_dual_clip", "algorithm.dual_clip=4", "algorithm.correction=seq_mask"],
    ["algorithm.advantage=gae", "algorithm.gamma=0.99", "algorithm.lam=0.95"],
    ["algorithm.kl_coef=0.05", "algorithm.kl_in_reward=true", "algorithm.kl_estimator=k1"],
])
def test_config_accepts_the_combinations_that_go_together(overrides):
    load_config(TINY, overrides)


def test_every_estimator_loss_and_correction_declares_its_traits():
    for name in ADVANTAGE_ESTIMATORS:
        assert ADVANTAGE_ESTIMATORS.trait(name, "reads") <= {"token_rewards", "values", "gamma", "lam"}
    for name in POLICY_LOSSES:
        assert POLICY_LOSSES.trait(name, "level") in ("token", "sequence")
    for name in CORRECTIONS:
        assert CORRECTIONS.trait(name, "level") in ("token", "sequence")
    assert [n for n in ADVANTAGE_ESTIMATORS if "values" in ADVANTAGE_ESTIMATORS.trait(n, "reads")] == ["gae"]


def test_the_gap_and_the_mismatch_skip_the_environments_tokens():
    # a multi-turn row: model tokens at columns 0 and 3; columns 1, 2 are an environment reply, where the
    # generator stored no log-prob (0) and the trainer's is whatever the model gives them (-5)
    old = torch.tensor([[-1.0, -5.0, -5.0, -2.0]])
    rollout = torch.tensor([[-1.1, 0.0, 0.0, -2.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    x = ObjectiveInputs(logp=old, old_logp=old, rollout_logp=rollout, advantages=torch.ones(1, 4), mask=mask,
                        denominator=2.0)
    s = policy_objective(x, ObjectiveSettings()).stats
    assert s.gap == pytest.approx(0.1) and s.gap_tokens == 2 and s.tokens == 2
    assert s.mismatch_ratio_max == pytest.approx(math.exp(0.1))  # not exp(5) from the reply
