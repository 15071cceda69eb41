"""Weighted composition of rewards with loud, per-sample failure isolation.

``compose([RewardSpec("psnr"), RewardSpec("consistency_3d", 0.5)])`` returns a
``CompositeReward``; calling it on ``(rollouts, episodes)`` gives a ``RewardOutput``:

- ``total`` (B,): sum of weight * component over specs; NaN for failed samples
  (never silently zeroed, so a trainer must mask with ``valid``).
- ``components`` {name: (B,)}: each reward's values (NaN where it failed).
- ``valid`` (B,) bool: every component finite for that sample.
- ``failures``: one ``SampleFailure`` per (sample, reward) that raised or gave NaN/inf.
- ``dense`` (B, T, H, W), with ``dense=True``: the weighted sum of the rewards' per-pixel maps, each
  map's mean being its reward (dense credit: the simulator knows which pixels earned it).

A reward that raises on the batch is re-run sample by sample to find the culprit(s).
Every failure is logged (logger ``posttrain.rewards``) with the prompt seed, sample
index and reason; if more than ``max_failure_fraction`` of the batch failed,
``RewardFailureError`` is raised (its ``.output`` holds the partial result).

``workers > 1`` evaluates fixed-size chunks of the batch in a spawned process pool
(tensors travel as numpy). Chunking is the same for any worker count and each chunk
is evaluated single-threaded, so results are byte-identical to ``workers=1``.
Use the composite as a context manager (or call ``close()``) to shut the pool down.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .registry import Reward, get_reward
from .types import EpisodeBatch, RolloutBatch

__all__ = ["RewardSpec", "SampleFailure", "RewardOutput", "RewardFailureError", "CompositeReward", "compose"]

logger = logging.getLogger("posttrain.rewards")


@dataclass
class RewardSpec:
    """One weighted term of a composite reward, as written in a recipe."""

    name: str = "psnr"
    """Registered reward name (see ``list_rewards()``)."""
    weight: float = 1.0
    """Multiplier of this term in the total."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the reward's constructor."""
    key: str | None = None
    """Name of the component in the output; defaults to ``name`` (set it to use one reward twice)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise ValueError(f"reward {self.key or self.name!r}: weight={self.weight!r} must be finite")


@dataclass
class SampleFailure:
    """One reward failing on one sample."""

    sample_index: int
    """Index of the sample in the batch."""
    prompt_id: int | None
    """Prompt (episode seed) of the sample, if known."""
    sample_id: int | None
    """Index of the sample within its prompt group, if known."""
    reward_name: str
    """Component key of the reward that failed."""
    reason: str
    """The exception (type and message) or 'non-finite value nan/inf'."""


@dataclass
class RewardOutput:
    """Result of a composite reward on a batch (see the module docstring)."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    valid: torch.Tensor
    failures: list[SampleFailure]
    dense: torch.Tensor | None = None
    """With ``compose(..., dense=True)``: (B, T, H, W) sum of weight x each reward's per-pixel map (its mean
    over (T, H, W) is ``total``); NaN rows for failed samples."""


class RewardFailureError(RuntimeError):
    """More than ``max_failure_fraction`` of the batch failed; ``.output`` has what was computed."""

    def __init__(self, message: str, output: RewardOutput):
        super().__init__(message)
        self.output = output


@contextmanager
def _single_thread():
    # Pin one intra-op thread so a chunk computes bit-identically in any process.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _ids(batch_ids: np.ndarray | None, i: int) -> int | None:
    return None if batch_ids is None else int(batch_ids[i])


def _evaluate_chunk(
    rewards: list[tuple[str, Reward]], roll_np: dict, ep_np: dict, offset: int, dense: bool = False
) -> tuple[dict[str, np.ndarray], list[SampleFailure], dict[str, np.ndarray]]:
    """Evaluate every reward on one chunk (numpy in, numpy out); isolates failures. With `dense`, also each
    reward's (b, T, H, W) per-pixel map (NaN rows where the sample failed)."""
    rollouts = RolloutBatch.from_numpy(roll_np)
    episodes = EpisodeBatch.from_numpy(ep_np)
    b = rollouts.batch_size
    map_shape = (b, *rollouts.frames.shape[1:4])  # (b, T, H, W)
    prompt_ids = roll_np["prompt_ids"] if roll_np["prompt_ids"] is not None else ep_np["seed"]
    sample_ids = roll_np["sample_ids"]
    comps: dict[str, np.ndarray] = {}
    maps: dict[str, np.ndarray] = {}
    failures: list[SampleFailure] = []

    def run(reward, rows_roll, rows_ep, n):
        if not dense:
            return _checked(reward(rows_roll, rows_ep), n), None
        result = reward.evaluate(rows_roll, rows_ep)
        return _checked(result.reward, n), _checked_map(result.dense, (n, *map_shape[1:]))

    with _single_thread():
        for key, reward in rewards:
            values = np.full(b, np.nan, dtype=np.float64)
            per_pixel = np.full(map_shape, np.nan, dtype=np.float32) if dense else None
            reasons: dict[int, str] = {}
            try:
                values[:], chunk_map = run(reward, rollouts, episodes, b)
                if dense:
                    per_pixel[:] = chunk_map
            except Exception as batch_exc:  # noqa: BLE001 - any reward bug must be isolated, not crash
                logger.debug("reward %s raised on a chunk (%r); re-running per sample", key, batch_exc)
                for i in range(b):
                    try:
                        one, one_map = run(reward, rollouts.select([i]), episodes.select([i]), 1)
                        values[i] = one[0]
                        if dense:
                            per_pixel[i] = one_map[0]
                    except Exception as e:  # noqa: BLE001
                        reasons[i] = f"{type(e).__name__}: {e}"
            for i in range(b):
                if i not in reasons and not math.isfinite(values[i]):
                    reasons[i] = f"non-finite value {values[i]}"
                if i not in reasons and dense and not np.isfinite(per_pixel[i]).all():
                    reasons[i] = "non-finite value in its dense map"
                if i in reasons:
                    values[i] = np.nan
                    if dense:
                        per_pixel[i] = np.nan
            for i, why in sorted(reasons.items()):
                failures.append(SampleFailure(offset + i, _ids(prompt_ids, i), _ids(sample_ids, i), key, why))
            comps[key] = values
            if dense:
                maps[key] = per_pixel
    return comps, failures, maps


def _checked(out: Any, b: int) -> np.ndarray:
    t = torch.as_tensor(out).detach().to("cpu", torch.float64)
    if t.shape != (b,):
        raise ValueError(f"reward returned shape {tuple(t.shape)}, expected ({b},)")
    return t.numpy()


def _checked_map(out: Any, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        raise ValueError("reward returned no dense map (RewardResult.dense is None)")
    t = torch.as_tensor(out).detach().to("cpu", torch.float32)
    if tuple(t.shape) != shape:
        raise ValueError(f"reward returned a dense map of shape {tuple(t.shape)}, expected {shape}")
    return t.numpy()


def _worker_init() -> None:
    torch.set_num_threads(1)


class CompositeReward:
    """Weighted sum of rewards with failure isolation; see the module docstring."""

    def __init__(
        self,
        specs: list[RewardSpec],
        max_failure_fraction: float = 0.25,
        workers: int = 1,
        chunk_size: int = 16,
        dense: bool = False,
    ):
        if not specs:
            raise ValueError("compose needs at least one RewardSpec")
        self.specs = [s if isinstance(s, RewardSpec) else RewardSpec(**s) for s in specs]
        keys = [s.key or s.name for s in self.specs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate component keys {keys}; set RewardSpec.key to tell them apart")
        self.rewards = [(k, get_reward(s.name, **s.params)) for k, s in zip(keys, self.specs)]
        self.dense = dense
        if dense:
            without = [k for k, r in self.rewards if not getattr(r, "has_dense_map", False)]
            if without:
                raise ValueError(f"dense credit needs a per-pixel map from every reward; {', '.join(without)} "
                                 f"give(s) none with these params (maps: {', '.join(dense_map_rewards())}; "
                                 f"fidelity/neg_mse/neg_mae/ssim and object_presence only with aggregate: mean)")
        self.weights = {k: float(s.weight) for k, s in zip(keys, self.specs)}
        self.max_failure_fraction = max_failure_fraction
        self.workers = workers
        self.chunk_size = chunk_size
        self._pool: ProcessPoolExecutor | None = None

    @property
    def names(self) -> list[str]:
        return [k for k, _ in self.rewards]

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: forking a process whose OpenMP pool is live can deadlock.
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init
            )
        return self._pool

    def close(self) -> None:
        """Shut the worker pool down (no-op with workers=1)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __call__(self, rollouts: RolloutBatch, episodes: EpisodeBatch) -> RewardOutput:
        b = rollouts.batch_size
        if episodes.batch_size != b:
            raise ValueError(f"batch sizes differ: rollouts {b}, episodes {episodes.batch_size}")
        device = rollouts.frames.device
        starts = list(range(0, b, self.chunk_size))
        jobs = []
        for s in starts:
            idx = list(range(s, min(s + self.chunk_size, b)))
            jobs.append((rollouts.select(idx).to_numpy(), episodes.select(idx).to_numpy(), s))
        if self.workers > 1 and len(jobs) > 1:
            pool = self._get_pool()
            futures = [pool.submit(_evaluate_chunk, self.rewards, r, e, s, self.dense) for r, e, s in jobs]
            results = [f.result() for f in futures]
        else:
            results = [_evaluate_chunk(self.rewards, r, e, s, self.dense) for r, e, s in jobs]
        comps_np = {k: np.concatenate([res[0][k] for res in results]) for k in self.names}
        failures = [f for res in results for f in res[1]]
        valid_np = np.ones(b, dtype=bool)
        total_np = np.zeros(b, dtype=np.float64)
        for k in self.names:
            valid_np &= np.isfinite(comps_np[k])
            total_np += self.weights[k] * comps_np[k]
        total_np[~valid_np] = np.nan
        dense = None
        if self.dense:
            dense_np = sum(self.weights[k] * np.concatenate([res[2][k] for res in results]) for k in self.names)
            dense_np[~valid_np] = np.nan
            dense = torch.from_numpy(np.asarray(dense_np, dtype=np.float32)).to(device)
        out = RewardOutput(
            total=torch.from_numpy(total_np).float().to(device),
            components={k: torch.from_numpy(v).float().to(device) for k, v in comps_np.items()},
            valid=torch.from_numpy(valid_np).to(device),
            failures=failures,
            dense=dense,
        )
        for f in failures:
            logger.warning(
                "reward %s failed on sample %d (prompt seed %s, sample id %s): %s",
                f.reward_name,
                f.sample_index,
                f.prompt_id,
                f.sample_id,
                f.reason,
            )
        n_bad = int((~valid_np).sum())
        if n_bad > self.max_failure_fraction * b:
            raise RewardFailureError(
                f"{n_bad}/{b} samples failed reward evaluation (> max_failure_fraction="
                f"{self.max_failure_fraction}); first: {failures[0] if failures else None}",
                out,
            )
        return out


def compose(
    specs: list[RewardSpec], max_failure_fraction: float = 0.25, workers: int = 1, chunk_size: int = 16,
    dense: bool = False,
) -> CompositeReward:
    """Build a ``CompositeReward`` from specs (``RewardSpec`` or dicts with its fields). ``dense``: also sum
    the rewards' per-pixel maps (every reward must have one: ``has_dense_map``)."""
    return CompositeReward(specs, max_failure_fraction=max_failure_fraction, workers=workers, chunk_size=chunk_size,
                           dense=dense)


def dense_map_rewards() -> list[str]:
    """Registered rewards that give a per-pixel map with their default params."""
    from .registry import list_rewards

    found = []
    for name in list_rewards():
        try:
            if getattr(get_reward(name), "has_dense_map", False):
                found.append(name)
        except Exception:  # noqa: BLE001 - a reward that needs params (e.g. a model path) has no default
            continue
    return found
