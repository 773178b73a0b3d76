"""Pure RL math on tensors: no Ray, vLLM or DeepSpeed imports here, so it reads and tests alone."""

from rlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS, EstimatorInputs
from rlhf.algorithms.kl import KL_ESTIMATORS
from rlhf.algorithms.logprobs import masked_mean, token_logprobs
from rlhf.algorithms.losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    PolicyLossOutput,
    aggregate,
    loss_denominator,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES", "EstimatorInputs",
    "PolicyLossOutput", "aggregate", "loss_denominator", "masked_mean", "token_logprobs",
]
