"""Pure RL math on tensors: no Ray, vLLM or DeepSpeed imports here, so it reads and tests alone."""

from rlhf.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    EstimatorInputs,
    discounted_sum,
    gae_returns,
    grouped_rewards,
    token_level_rewards,
    whiten_over_mask,
)
from rlhf.algorithms.dapo import groups_with_signal, overlong_penalty
from rlhf.algorithms.kl import KL_ESTIMATORS, kl_penalty_rewards
from rlhf.algorithms.logprobs import entropy_from_logits, masked_mean, token_logprobs
from rlhf.algorithms.losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    PolicyLossOutput,
    aggregate,
    loss_denominator,
    truncated_is_weights,
)
from rlhf.algorithms.value import explained_variance, value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES", "EstimatorInputs",
    "PolicyLossOutput", "aggregate", "discounted_sum", "entropy_from_logits", "gae_returns", "grouped_rewards",
    "groups_with_signal", "kl_penalty_rewards", "loss_denominator", "masked_mean", "overlong_penalty",
    "token_level_rewards", "token_logprobs", "truncated_is_weights", "value_loss", "explained_variance",
    "whiten_over_mask",
]
