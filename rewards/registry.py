"""Reward base class, result type and the name registry.

A reward is any callable ``(rollouts: RolloutBatch, episodes: EpisodeBatch) -> Tensor (B,)``
with a ``name``; higher is better. Built-in rewards subclass ``Reward`` and
implement ``evaluate`` returning a ``RewardResult`` (shaped reward plus optional
success flags and applicability mask); ``__call__`` returns just the reward.

Register a class or a plain function under a name::

    @register_reward("brightness")
    def brightness(rollouts, episodes, target: float = 0.5):
        return -(rollouts.frames.mean(dim=(1, 2, 3, 4)) - target).abs()

    get_reward("brightness", target=0.4)(rollouts, episodes)  # tensor (B,)

Functions must live at module level (the process pool pickles them by name).

This module imports no other module of the package: the built-in rewards import it to register
themselves, and the package's ``__init__`` imports them, so importing any part of
``posttrain.rewards`` registers every built-in.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "Reward",
    "RewardResult",
    "FunctionReward",
    "UnknownRewardError",
    "register_reward",
    "get_reward",
    "list_rewards",
]


@dataclass
class RewardResult:
    """What a reward computes for a batch."""

    reward: torch.Tensor
    """(B,) float shaped reward, higher is better."""
    success: torch.Tensor | None = None
    """(B,) bool pass/fail verdict where the reward has one, else None."""
    mask: torch.Tensor | None = None
    """(B,) bool, False where the reward does not apply (its value there is 0 by contract)."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named (B,) diagnostics (e.g. the parts of a sum), for logging."""
    dense: torch.Tensor | None = None
    """(B, T, H, W) float per-pixel map over the rollout's T frames whose mean over (T, H, W) equals
    `reward`: which pixels earned it (dense credit). Filled by rewards whose `has_dense_map` is True."""


class Reward:
    """Base class: subclasses set ``name`` (done by ``register_reward``) and implement ``evaluate``."""

    name: str = "reward"
    has_dense_map: bool = False
    """True where `evaluate` fills `RewardResult.dense` (with this instance's params)."""

    def evaluate(self, rollouts, episodes) -> RewardResult:
        raise NotImplementedError

    def __call__(self, rollouts, episodes) -> torch.Tensor:
        return self.evaluate(rollouts, episodes).reward

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class FunctionReward(Reward):
    """Wraps a registered function ``fn(rollouts, episodes, **params)`` that returns a tensor
    (B,) or a ``RewardResult``."""

    def __init__(self, name: str, fn: Callable[..., Any], params: dict[str, Any]):
        self.name = name
        self.fn = fn
        self.params = dict(params)

    def evaluate(self, rollouts, episodes) -> RewardResult:
        out = self.fn(rollouts, episodes, **self.params)
        if isinstance(out, RewardResult):
            return out
        return RewardResult(reward=torch.as_tensor(out))


_REGISTRY: dict[str, Callable[..., Reward]] = {}
_SIGNATURES: dict[str, tuple[Callable, int]] = {}
"""name -> (the callable whose signature takes the params, positional arguments before them)."""


class UnknownRewardError(KeyError):
    """Raised by ``get_reward`` for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def register_reward(name: str):
    """Decorator registering a ``Reward`` subclass (constructed with the params) or a
    function ``fn(rollouts, episodes, **params)`` under ``name``. Returns the object unchanged."""

    def deco(obj):
        if isinstance(obj, type) and issubclass(obj, Reward):
            obj.name = name
            factory, signature = obj, (obj, 0)
        elif callable(obj):
            factory = lambda **params: FunctionReward(name, obj, params)  # noqa: E731
            signature = (obj, 2)  # fn(rollouts, episodes, **params)
        else:
            raise TypeError(f"register_reward({name!r}) needs a Reward subclass or a function")
        _REGISTRY[name] = factory
        _SIGNATURES[name] = signature
        return obj

    return deco


def list_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def _unknown(name: str, where: str = "") -> UnknownRewardError:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UnknownRewardError(f"{where}unknown reward {name!r}{hint} (registered: {', '.join(sorted(_REGISTRY))})")


def check_reward_specs(specs: list, key: str = "rewards") -> None:
    """Refuse, before any work starts, the specs that `get_reward` would refuse after it: an empty list, an
    unknown name, parameters the reward does not take, a `*path` parameter that does not exist, or params the
    reward's own `check_params` (a static method, where it has one) refuses.
    `key` is the recipe key, named in the message. Rewards are not built here: their signatures are checked,
    and `check_params` does what more is cheap (the learned reward loads its small model, so that a folder that
    is not one fails now, not after the first rollouts)."""
    if not specs:
        raise ValueError(f"{key}: no reward listed; give at least one, e.g. {key}=[{{name: psnr}}]")
    for index, spec in enumerate(specs):
        where = f"{key}[{index}]: "
        if spec.name not in _REGISTRY:
            raise _unknown(spec.name, where)
        target, positional = _SIGNATURES[spec.name]
        try:
            inspect.signature(target).bind(*([None] * positional), **spec.params)
        except TypeError as exc:
            raise ValueError(f"{where}reward {spec.name!r} does not take params {sorted(spec.params)}: {exc}") from None
        for name, value in spec.params.items():
            if name.endswith("path") and isinstance(value, (str, Path)) and value and not Path(value).exists():
                raise FileNotFoundError(f"{where}reward {spec.name!r}: params.{name}={value} does not exist")
        check = getattr(target, "check_params", None)  # a reward's own check, e.g. that its model file loads
        if check is not None:
            try:
                check(**spec.params)
            except (ValueError, FileNotFoundError) as exc:
                raise ValueError(f"{where}reward {spec.name!r}: {exc}") from None


def get_reward(name: str, **params) -> Reward:
    """Instantiate the reward registered under ``name`` with ``params``."""
    if name not in _REGISTRY:
        raise _unknown(name)
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise TypeError(f"reward {name!r}: bad parameters {sorted(params)}: {e}") from e
