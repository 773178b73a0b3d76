"""Hand-computed numbers for the GRPO family, RLOO, REINFORCE++, GAE, dual-clip, the value loss, entropy and DAPO."""

import ast
import inspect
import math
from pathlib import Path

import pytest
import torch

import rlhf.algorithms
from rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    CORRECTIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    EstimatorInputs,
    PolicyLossParams,
    aggregate,
    entropy_from_logits,
    gae_returns,
    groups_with_signal,
    kl_penalty_rewards,
    loss_denominator,
    overlong_penalty,
    token_level_rewards,
    value_loss,
)

ONES = torch.ones(1, 1)  # the mask: the token-level losses do not read it

# Two groups of G = 3. Every row's completion starts after at least one prompt column, and rows end at
# different columns (right padding), as rlhf.types.collate lays them out.
REWARDS = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, -1.0])
MASK = torch.tensor([
    [0, 1, 1, 0],  # 2 tokens
    [0, 0, 1, 1],  # 2
    [0, 1, 1, 1],  # 3
    [0, 0, 1, 0],  # 1
    [0, 1, 0, 0],  # 1
    [0, 0, 0, 1],  # 1
], dtype=torch.float32)


def inputs(**kw) -> EstimatorInputs:
    return EstimatorInputs(REWARDS, MASK, group_size=3, std_eps=0.0, **kw)


def per_sample(adv: list[float]) -> torch.Tensor:
    """One advantage per sample, broadcast over its completion tokens."""
    return torch.tensor(adv).unsqueeze(1) * MASK


def test_registries_hold_exactly_these_names():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"}
    assert set(POLICY_LOSSES) == {"ppo_clip", "ppo_dual_clip", "gspo", "cispo"}
    assert set(CORRECTIONS) == {"none", "token_tis", "token_mask", "seq_tis", "seq_mask"}
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_algorithms_import_only_torch_and_the_standard_library():
    allowed = {"__future__", "collections", "dataclasses", "typing", "torch", "rlhf"}
    for path in Path(rlhf.algorithms.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_grpo_on_the_shared_example():
    # group 1: 1, 0, 0.5 -> mean 0.5, deviations .5 -.5 0, unbiased var (.25+.25)/2 = .25, std .5 -> 1, -1, 0
    # group 2: 2, 2, -1 -> mean 1, deviations 1 1 -2, unbiased var (1+1+4)/2 = 3, std sqrt 3
    s3 = math.sqrt(3)
    want = per_sample([1, -1, 0, 1 / s3, 1 / s3, -2 / s3])
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["grpo"](inputs()), want)


def test_dr_grpo_subtracts_the_group_mean_only():
    # group means 0.5 and 1 (see above); no division by the std
    want = per_sample([1 - 0.5, 0 - 0.5, 0.5 - 0.5, 2 - 1, 2 - 1, -1 - 1])
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["dr_grpo"](inputs()), want)


def test_rloo_leaves_one_out():
    # r_i minus the mean of the other two: 1-(0+.5)/2 = .75, 0-(1+.5)/2 = -.75, .5-(1+0)/2 = 0,
    # 2-(2-1)/2 = 1.5, 2-(2-1)/2 = 1.5, -1-(2+2)/2 = -3
    want = per_sample([0.75, -0.75, 0.0, 1.5, 1.5, -3.0])
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["rloo"](inputs()), want)


def test_rloo_rejects_groups_of_one():
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        ADVANTAGE_ESTIMATORS["rloo"](EstimatorInputs(REWARDS, MASK, group_size=1))


def test_reinforce_pp_on_the_shared_example():
    # gamma 1, no token rewards: each token's return is its sample's reward. Tokens per row 2 2 3 1 1 1 (10).
    # mean = (2*1 + 2*0 + 3*.5 + 2 + 2 - 1) / 10 = 6.5 / 10 = .65
    # var = (2*.35^2 + 2*.65^2 + 3*.15^2 + 1.35^2 + 1.35^2 + 1.65^2) / 10
    #     = (.245 + .845 + .0675 + 1.8225 + 1.8225 + 2.7225) / 10 = 7.525 / 10 = .7525
    std = math.sqrt(0.7525)
    want = per_sample([(r - 0.65) / std for r in [1.0, 0.0, 0.5, 2.0, 2.0, -1.0]])
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["reinforce_pp"](inputs()), want)


def test_reinforce_pp_baseline_on_the_shared_example():
    # centred rewards (dr_grpo's): .5 -.5 0 1 1 -2, over 2 2 3 1 1 1 tokens
    # mean = (1 - 1 + 0 + 1 + 1 - 2) / 10 = 0;  var = (2*.25 + 2*.25 + 0 + 1 + 1 + 4) / 10 = .7
    std = math.sqrt(0.7)
    want = per_sample([c / std for c in [0.5, -0.5, 0.0, 1.0, 1.0, -2.0]])
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](inputs()), want)


def test_reinforce_pp_baseline_zeroes_a_group_without_signal():
    # group 1: 1, 0 -> centred .5, -.5; group 2: 3, 3 -> 0, 0. Tokens 2 2 3 1 -> 8 returns.
    # mean 0; var = (4 * .25) / 8 = .125; .5 / sqrt(.125) = .5 * sqrt(8) = sqrt(2)
    x = EstimatorInputs(torch.tensor([1.0, 0.0, 3.0, 3.0]), MASK[:4], group_size=2, std_eps=0.0)
    s2 = math.sqrt(2)
    want = torch.tensor([[s2], [-s2], [0.0], [0.0]]) * MASK[:4]
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](x), want)


# Token rewards and discounting: gamma 0.5, rows completing in columns 1-2 and 2-3. The 7s are off the mask.
TOKEN_MASK = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.float32)
TOKEN_REWARDS = torch.tensor([[7.0, 0.0, -1.0, 7.0], [7.0, 7.0, 0.0, 0.5]])
TOKEN_INPUTS = EstimatorInputs(torch.tensor([3.0, -2.5]), TOKEN_MASK, group_size=2, std_eps=0.0,
                               token_rewards=TOKEN_REWARDS, gamma=0.5)


def test_token_level_rewards_put_the_outcome_on_the_last_token():
    # row 0: token rewards 0, -1, plus 3 on the last -> 0, 2;  row 1: 0, .5 - 2.5 = -2
    want = torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -2.0]])
    torch.testing.assert_close(token_level_rewards(TOKEN_INPUTS), want)
    empty = EstimatorInputs(torch.tensor([5.0]), torch.zeros(1, 3), group_size=1)
    assert torch.equal(token_level_rewards(empty), torch.zeros(1, 3))  # no token to carry the reward


def test_reinforce_pp_discounts_then_normalises_over_the_batch():
    # returns: row 0: 0 + .5*2 = 1, 2;  row 1: 0 + .5*(-2) = -1, -2
    # mean (1 + 2 - 1 - 2) / 4 = 0;  population var (1 + 4 + 1 + 4) / 4 = 2.5
    s = math.sqrt(2.5)
    want = torch.tensor([[0.0, 1 / s, 2 / s, 0.0], [0.0, 0.0, -1 / s, -2 / s]])
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["reinforce_pp"](TOKEN_INPUTS), want)


# GAE, gamma .9, lam .8 (gamma*lam = .72). The 9s and 5s sit off the mask and must not be read.
GAE_MASK = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.float32)
GAE_VALUES = torch.tensor([[9.0, 0.5, 0.4, 0.6, 9.0], [9.0, 9.0, 9.0, 0.2, 0.3]])
GAE_TOKEN_REWARDS = torch.tensor([[5.0, 0.0, -0.1, 0.0, 5.0], [5.0, 5.0, 5.0, 0.0, 0.0]])
GAE_INPUTS = EstimatorInputs(torch.tensor([1.0, -1.0]), GAE_MASK, group_size=1, values=GAE_VALUES,
                             token_rewards=GAE_TOKEN_REWARDS, gamma=0.9, lam=0.8)


def test_gae_three_tokens_by_hand():
    # row 0, rewards 0, -.1, 0 + 1 = 1; values .5 .4 .6, and 0 after the last token
    #   delta_3 = 1 + .9*0 - .6 = .4
    #   delta_2 = -.1 + .9*.6 - .4 = -.1 + .54 - .4 = .04
    #   delta_1 = 0 + .9*.4 - .5 = .36 - .5 = -.14
    #   A_3 = .4;  A_2 = .04 + .72*.4 = .328;  A_1 = -.14 + .72*.328 = -.14 + .23616 = .09616
    # row 1, rewards 0, -1; values .2 .3
    #   delta_4 = -1 - .3 = -1.3;  delta_3 = 0 + .9*.3 - .2 = .07
    #   A_4 = -1.3;  A_3 = .07 + .72*(-1.3) = .07 - .936 = -.866
    adv = ADVANTAGE_ESTIMATORS["gae"](GAE_INPUTS)
    want = torch.tensor([[0.0, 0.09616, 0.328, 0.4, 0.0], [0.0, 0.0, 0.0, -0.866, -1.3]])
    torch.testing.assert_close(adv, want)
    # returns A + V: .09616 + .5, .328 + .4, .4 + .6;  -.866 + .2, -1.3 + .3
    want_returns = torch.tensor([[0.0, 0.59616, 0.728, 1.0, 0.0], [0.0, 0.0, 0.0, -0.666, -1.0]])
    torch.testing.assert_close(gae_returns(adv, GAE_VALUES, GAE_MASK), want_returns)


def test_gae_with_zero_values_and_lambda_one_is_the_discounted_return():
    # same rewards as the reinforce_pp example: discounted returns 1, 2 and -1, -2 (before normalising)
    x = EstimatorInputs(TOKEN_INPUTS.rewards, TOKEN_MASK, group_size=2, values=torch.zeros(2, 4),
                        token_rewards=TOKEN_REWARDS, gamma=0.5, lam=1.0)
    want = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, -1.0, -2.0]])
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS["gae"](x), want)


def test_gae_without_values_says_so():
    with pytest.raises(ValueError, match="gae needs critic values"):
        ADVANTAGE_ESTIMATORS["gae"](EstimatorInputs(REWARDS, MASK, group_size=3))


@pytest.mark.parametrize("name", list(ADVANTAGE_ESTIMATORS))
def test_every_estimator_is_zero_off_the_mask(name):
    torch.manual_seed(0)
    adv = ADVANTAGE_ESTIMATORS[name](inputs(values=torch.randn(6, 4), token_rewards=torch.randn(6, 4)))
    assert adv.shape == MASK.shape
    assert torch.all(adv[MASK == 0] == 0)


def test_kl_penalty_rewards_hand_computed():
    # p = .5 under the policy, .25 under the reference: k1 = ln 2, k3 = .5 - 1 + ln 2 (see test_algorithms.py)
    logp, ref = torch.full((1, 2), math.log(0.5)), torch.full((1, 2), math.log(0.25))
    mask = torch.tensor([[0.0, 1.0]])
    ln2 = math.log(2)
    torch.testing.assert_close(kl_penalty_rewards(logp, ref, mask, 0.1), torch.tensor([[0.0, -0.1 * ln2]]))
    torch.testing.assert_close(kl_penalty_rewards(logp, ref, mask, 0.1, "k3"),
                               torch.tensor([[0.0, -0.1 * (0.5 - 1 + ln2)]]))


def test_dual_clip_four_sign_and_ratio_cases():
    # clip .2/.2, c = 3; loss = max(-r*A, -clip(r)*A), then for A < 0 at most -3*A
    # r 1.5 A +1: max(-1.5, -1.2) = -1.2 (ratio clip)    r .5 A +1: max(-.5, -.8) = -.5
    # r .5  A -1: max(.5, .8) = .8 (ratio clip)          r 2  A -1: max(2, 1.2) = 2 < 3, kept
    # r 4   A -1: max(4, 1.2) = 4 > 3 -> 3 (dual clip)   r 4  A +1: max(-4, -1.2) = -1.2, no dual clip for A > 0
    ratio = torch.tensor([[1.5, 0.5, 0.5, 2.0, 4.0, 4.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0]])
    logp = ratio.log().requires_grad_()
    out = POLICY_LOSSES["ppo_dual_clip"](logp, torch.zeros(1, 6), adv, ONES, PolicyLossParams(0.2, 0.2, 3.0))
    torch.testing.assert_close(out.loss, torch.tensor([[-1.2, -0.5, 0.8, 2.0, 3.0, -1.2]]))
    assert out.clipped.tolist() == [[True, False, True, False, True, True]]
    # d(-r*A)/dlogp = -r*A on the unclipped tokens (-.5 and 2); a clipped token has no gradient
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, 0.0, 2.0, 0.0, 0.0]]))
    plain = POLICY_LOSSES["ppo_clip"](ratio.log(), torch.zeros(1, 6), adv, ONES, PolicyLossParams(0.2, 0.2))
    torch.testing.assert_close(plain.loss, torch.tensor([[-1.2, -0.5, 0.8, 2.0, 4.0, -1.2]]))  # no dual clip


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        POLICY_LOSSES["ppo_dual_clip"](torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), ONES,
                                       PolicyLossParams(dual_clip=1.0))


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_at_ratio_one_no_loss_clips_and_the_surrogates_are_minus_a(name):
    torch.manual_seed(0)
    logp, adv, mask = torch.randn(3, 5), torch.randn(3, 5), torch.ones(3, 5)
    out = POLICY_LOSSES[name](logp, logp.clone(), adv, mask, PolicyLossParams(0.2, 0.28))
    torch.testing.assert_close(out.ratio, torch.ones(3, 5))
    # the PPO-style surrogates are -ratio * A = -A; CISPO's loss is -w * A * logp with w = 1
    torch.testing.assert_close(out.loss, -adv * logp if name == "cispo" else -adv)
    assert not out.clipped.any()


def test_policy_losses_share_one_signature():
    params = {name: [(p.name, p.kind) for p in inspect.signature(POLICY_LOSSES[name]).parameters.values()]
              for name in POLICY_LOSSES}
    assert len({tuple(p) for p in params.values()}) == 1, params


def test_value_loss_both_branches():
    # V_old .5, c .2 -> V clipped into [.3, .7]; return 1
    # V 1:  (1-1)^2 = 0,   clipped .7: (.7-1)^2 = .09 -> max .09 -> .045 (clipped branch)
    # V .6: inside the range, both (.6-1)^2 = .16 -> .08
    # V 0:  (0-1)^2 = 1,   clipped .3: (.3-1)^2 = .49 -> max 1 -> .5 (unclipped branch)
    v = torch.tensor([[1.0, 0.6, 0.0]])
    old, ret = torch.full((1, 3), 0.5), torch.ones(1, 3)
    torch.testing.assert_close(value_loss(v, old, ret, clip_range=0.2), torch.tensor([[0.045, 0.08, 0.5]]))
    torch.testing.assert_close(value_loss(v, old, ret, clip_range=None), torch.tensor([[0.0, 0.08, 0.5]]))
    # token-mean over the first two tokens: (.045 + .08) / 2 = .0625
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    per_token = value_loss(v, old, ret, clip_range=0.2)
    got = aggregate(per_token, mask, "token-mean", loss_denominator(mask, "token-mean", 3))
    assert got.item() == pytest.approx(0.0625)


def test_entropy_hand_computed_and_stable():
    # uniform over 4: ln 4.  [0, ln 3] -> p = 1/4, 3/4: H = 1/4 ln 4 + 3/4 ln(4/3)
    two = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -1e4, -1e4]]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[math.log(4), two]]))
    torch.testing.assert_close(entropy_from_logits(logits + 1e4), torch.tensor([[math.log(4), two]]))
    # temperature 2 halves [0, 2 ln 3] to [0, ln 3]
    hot = torch.tensor([[[0.0, 2 * math.log(3)]]])
    torch.testing.assert_close(entropy_from_logits(hot, temperature=2.0), torch.tensor([[two]]))
    # a masked vocabulary entry (-inf) has probability 0 and changes nothing
    masked = torch.tensor([[[0.0, math.log(3), -math.inf]]])
    torch.testing.assert_close(entropy_from_logits(masked), torch.tensor([[two]]))


def test_entropy_matches_minus_sum_p_log_p():
    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 3, 11)
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(logp.exp() * logp).sum(-1))


def test_overlong_penalty_regimes_and_boundaries():
    # max_len 20, buffer 4: free up to 16, ramp (16 - L) / 4 on 17..20, -1 beyond
    lengths = torch.tensor([10, 16, 17, 18, 20, 21, 30])
    want = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=20, buffer=4), want)
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(lengths, max_len=20, buffer=0)


def test_groups_with_signal():
    # G = 3: all 1s (drop), mixed (keep), all .5 (drop), spread .25 (kept at eps 0, dropped at eps .5)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.25, 0.0])
    assert groups_with_signal(rewards, 3).tolist() == [False, True, False, True]
    assert groups_with_signal(rewards, 3, eps=0.5).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="not a whole number of groups"):
        groups_with_signal(rewards[:5], 3)


def test_gae_over_a_multi_turn_mask_with_holes():
    # model tokens at columns 0, 1 and 4; columns 2, 3 are the environment's reply (mask 0, values ignored)
    # gamma .5, lam 1, reward 1 on the last model token; V_next skips the hole:
    # delta_0 = .5 * .4 - .5 = -.3, delta_1 = .5 * V_4 - .4 = .5 * .2 - .4 = -.3, delta_4 = 1 - .2 = .8
    # A_4 = .8, A_1 = -.3 + .5 * .8 = .1, A_0 = -.3 + .5 * .1 = -.25
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 9.0, 9.0, 0.2]])
    x = EstimatorInputs(torch.tensor([1.0]), mask, group_size=1, values=values, gamma=0.5, lam=1.0)
    adv = ADVANTAGE_ESTIMATORS["gae"](x)
    torch.testing.assert_close(adv, torch.tensor([[-0.25, 0.1, 0.0, 0.0, 0.8]]))
    torch.testing.assert_close(gae_returns(adv, values, mask), torch.tensor([[0.25, 0.5, 0.0, 0.0, 1.0]]))
