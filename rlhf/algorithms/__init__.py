"""Pure RL math on tensors: no Ray, vLLM or DeepSpeed imports here, so it reads and tests alone."""

from rlhf.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    EstimatorInputs,
    discounted_sum,
    gae_returns,
    grouped_rewards,
    sequence_rewards,
    token_level_rewards,
    whiten_over_mask,
)
from rlhf.algorithms.corrections import CORRECTIONS, Correction, CorrectionParams, sequence_ratio, token_ratio
from rlhf.algorithms.dapo import groups_with_signal, overlong_penalty
from rlhf.algorithms.kl import KL_ESTIMATORS, kl_penalty_rewards
from rlhf.algorithms.logprobs import entropy_from_logits, masked_mean, token_logprobs
from rlhf.algorithms.losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    PolicyLossOutput,
    PolicyLossParams,
    aggregate,
    loss_denominator,
)
from rlhf.algorithms.objective import (
    ObjectiveInputs,
    ObjectiveOutput,
    ObjectiveSettings,
    ObjectiveStats,
    policy_objective,
)
from rlhf.algorithms.value import explained_variance, value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS", "CORRECTIONS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES", "Correction",
    "CorrectionParams", "EstimatorInputs", "ObjectiveInputs", "ObjectiveOutput", "ObjectiveSettings",
    "ObjectiveStats", "PolicyLossOutput", "PolicyLossParams", "aggregate", "discounted_sum", "entropy_from_logits",
    "explained_variance", "gae_returns", "grouped_rewards", "groups_with_signal", "kl_penalty_rewards",
    "loss_denominator", "masked_mean", "overlong_penalty", "policy_objective", "sequence_ratio", "sequence_rewards",
    "token_level_rewards", "token_logprobs", "token_ratio", "value_loss", "whiten_over_mask",
]
