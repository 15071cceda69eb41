"""Rewards for post-training world models: image metrics, verifiable rewards scored
against simulator truth, a composable reward API and a small learned reward model.

Dependency direction: trainers/models -> rewards -> envs3d. Nothing here imports
posttrain's models or trainers; rewards read plain tensors (``RolloutBatch``,
``EpisodeBatch``). See rewards/README.md for the list of rewards.
"""

# metrics first; importing reward_model, stability and verifiers registers the built-ins.
from . import metrics, patch, reward_model, stability, verifiers
from .compose import (
    CompositeReward,
    RewardFailureError,
    RewardOutput,
    RewardSpec,
    SampleFailure,
    compose,
)
from .registry import (
    FunctionReward,
    Reward,
    RewardResult,
    UnknownRewardError,
    check_reward_specs,
    get_reward,
    list_rewards,
    register_reward,
)
from .types import EpisodeBatch, RolloutBatch

__all__ = [
    "metrics",
    "CompositeReward",
    "RewardFailureError",
    "RewardOutput",
    "RewardSpec",
    "SampleFailure",
    "compose",
    "FunctionReward",
    "Reward",
    "RewardResult",
    "UnknownRewardError",
    "check_reward_specs",
    "get_reward",
    "list_rewards",
    "register_reward",
    "EpisodeBatch",
    "RolloutBatch",
    "reward_model",
    "stability",
    "verifiers",
    "patch",
]
