"""Hand-computed numbers for every estimator and loss, and the invariances the trainer relies on."""

import math

import pytest
import torch

from rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    EstimatorInputs,
    PolicyLossParams,
    aggregate,
    loss_denominator,
    token_logprobs,
)
from rlhf.algorithms.registry import Registry

ONES = torch.ones(1, 1)  # the mask: the token-level losses do not read it


def test_grpo_advantages_hand_computed():
    # group 1: rewards 1, 0 -> mean 0.5, unbiased std sqrt(0.5) -> +-0.5/0.7071 = +-0.7071
    # group 2: rewards equal -> advantage 0 for both
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.float32)
    adv = ADVANTAGE_ESTIMATORS["grpo"](EstimatorInputs(rewards, mask, group_size=2, std_eps=0.0))
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[s, s, 0], [-s, 0, 0], [0, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(adv, expected)


def test_grpo_rejects_partial_groups():
    with pytest.raises(ValueError, match="not a whole number of groups of 4"):
        ADVANTAGE_ESTIMATORS["grpo"](EstimatorInputs(torch.zeros(6), torch.ones(6, 2), group_size=4))


def test_ppo_clip_hand_computed():
    # ratio 1.5 A=+1: min(1.5, 1.2) = 1.2 (clipped)    ratio 1.5 A=-1: min(-1.5, -1.2) = -1.5
    # ratio 0.5 A=-1: min(-0.5, -0.8) = -0.8 (clipped) ratio 0.5 A=+1: min(0.5, 0.8) = 0.5
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    old = torch.zeros(1, 4)
    out = POLICY_LOSSES["ppo_clip"](ratio.log(), old, adv, ONES, PolicyLossParams(0.2, 0.2))
    torch.testing.assert_close(out.loss, torch.tensor([[-1.2, 1.5, 0.8, -0.5]]))
    torch.testing.assert_close(out.ratio, ratio)
    assert out.clipped.tolist() == [[True, False, True, False]]


def test_ppo_clip_higher_uses_separate_bounds():
    # clip_high 0.28: ratio 1.5 with A=+1 is clipped at 1.28, ratio 0.5 with A=-1 at 0.8
    ratio = torch.tensor([[1.5, 0.5]])
    out = POLICY_LOSSES["ppo_clip"](ratio.log(), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), ONES,
                                    PolicyLossParams(0.2, 0.28))
    torch.testing.assert_close(out.loss, torch.tensor([[-1.28, 0.8]]))


def test_first_update_has_ratio_one_and_zero_kl():
    logp = torch.randn(3, 5)
    out = POLICY_LOSSES["ppo_clip"](logp, logp.clone(), torch.randn(3, 5), ONES, PolicyLossParams())
    assert torch.equal(out.ratio, torch.ones(3, 5))
    assert torch.equal(KL_ESTIMATORS["k3"](logp, logp.clone()), torch.zeros(3, 5))


def test_kl_estimators_hand_computed():
    # p = 0.5 under the policy, 0.25 under the reference: log_r = ln(0.25/0.5) = -ln 2
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    ln2 = math.log(2)
    torch.testing.assert_close(KL_ESTIMATORS["k1"](logp, ref), torch.tensor([ln2]))
    torch.testing.assert_close(KL_ESTIMATORS["k2"](logp, ref), torch.tensor([0.5 * ln2**2]))
    torch.testing.assert_close(KL_ESTIMATORS["k3"](logp, ref), torch.tensor([0.5 - 1 + ln2]))


def test_aggregations_hand_computed():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    expected = {
        "token-mean": (1 + 2 + 3 + 4) / 4,
        "seq-mean-token-sum": (6 + 4) / 2,
        "seq-mean-token-mean": (2 + 4) / 2,
        "seq-mean-token-sum-norm": (6 + 4) / (2 * 5),  # 5 = max_new_tokens
    }
    assert set(expected) == set(LOSS_AGGREGATIONS)
    for mode, want in expected.items():
        got = aggregate(v, m, mode, loss_denominator(m, mode, max_new_tokens=5))
        assert got.item() == pytest.approx(want), mode


@pytest.mark.parametrize("mode", list(LOSS_AGGREGATIONS))
def test_sharded_loss_sums_to_global_loss(mode):
    torch.manual_seed(0)
    v = torch.randn(8, 6)
    m = (torch.rand(8, 6) > 0.3).float()
    denom = loss_denominator(m, mode, max_new_tokens=6)
    whole = aggregate(v, m, mode, denom)
    shards = [slice(0, 2), slice(2, 5), slice(5, 8)]  # uneven data-parallel shards / micro-batches
    assert sum(aggregate(v[s], m[s], mode, denom) for s in shards).item() == pytest.approx(whole.item(), rel=1e-6)


def test_micro_batch_accumulation_equals_one_big_batch():
    """Gradients of micro-batches x accumulation (global denominator) equal the whole batch's."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    x, adv = torch.randn(8, 5, 4), torch.randn(8, 5)
    mask = (torch.rand(8, 5) > 0.2).float()
    old = torch.zeros(8, 5)

    def loss_of(rows, denom):
        logp = layer(x[rows]).squeeze(-1).tanh() - 1
        out = POLICY_LOSSES["ppo_clip"](logp, old[rows], adv[rows], mask[rows], PolicyLossParams())
        return aggregate(out.loss, mask[rows], "token-mean", denom)

    denom = loss_denominator(mask, "token-mean", 5)
    loss_of(slice(0, 8), denom).backward()
    whole = layer.weight.grad.clone()
    layer.zero_grad()
    for i in range(8):  # batch 1 x accumulation 8
        loss_of(slice(i, i + 1), denom).backward()
    torch.testing.assert_close(layer.weight.grad, whole)


def test_token_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    for temperature in (1.0, 0.7):
        want = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(token_logprobs(logits, tokens, temperature), want)


def test_registry_rejects_duplicates_and_names_unknowns():
    reg = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="'a' is already registered"):
        reg.register("a")(lambda: 2)
    with pytest.raises(KeyError, match=r"unknown thing 'b'; known: \['a'\]"):
        reg["b"]
