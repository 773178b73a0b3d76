"""Rewards: the Python reward-function API (and, later, the reward-model scorer)."""

from reward.api import RewardError, RewardScorer, WeightedReward, load_reward_fn, per_sample

__all__ = ["RewardError", "RewardScorer", "WeightedReward", "load_reward_fn", "per_sample"]
