"""Rewards: the Python reward-function API (and, later, the reward-model scorer)."""

from reward.api import RewardError, RewardScorer, WeightedReward, load_reward_fn

__all__ = ["RewardError", "RewardScorer", "WeightedReward", "load_reward_fn"]
