"""A small learned reward model trained on preference pairs (Bradley-Terry).

The model scores (context frame, rollout frames) -> scalar: every rollout frame is
stacked channel-wise with the last context frame, passed through a tiny strided
conv net, and the per-frame features are averaged over time before a linear head.

Pairs come either from the verifiers (``pairs_from_reward``: score two rollouts of
the same prompt with any reward, the higher one is "chosen") or from a person's
JSONL file (``load_pairs_jsonl``). ``train_reward_model`` fits it and reports the
held-out pair accuracy; ``save_reward_model`` / ``load_reward_model`` use
safetensors + config.json (no pickle). The registered reward ``learned`` (param
``path``) scores rollouts with a saved model, so a recipe can name it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Reward, RewardResult, register_reward

__all__ = [
    "RewardModelConfig",
    "PreferencePairs",
    "RewardModel",
    "bradley_terry_loss",
    "train_reward_model",
    "pairs_from_reward",
    "PairLine",
    "read_pair_lines",
    "load_pairs_jsonl",
    "save_reward_model",
    "load_reward_model",
    "LearnedReward",
]


@dataclass
class RewardModelConfig:
    """Architecture and training settings of the learned reward model."""

    channels: int = 16
    """Width of the first conv layer (doubles once)."""
    resolution: int = 32
    """Frames are resized to this square size before the convs."""
    lr: float = 3e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    batch_size: int = 32
    """Pairs per optimisation step."""
    steps: int = 150
    """Optimisation steps."""
    holdout_fraction: float = 0.2
    """Fraction of pairs (split by prompt id when given) kept out for the accuracy report."""
    seed: int = 0
    """Seed for the init, the split and the batch order."""

    def __post_init__(self) -> None:
        for name in ("channels", "resolution", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name}={value} must be finite and {'> 0' if name == 'lr' else '>= 0'}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction={self.holdout_fraction} must be in [0, 1)")


@dataclass
class PreferencePairs:
    """N preference pairs; chosen/rejected are rollouts of the same prompt."""

    chosen: torch.Tensor
    """(N, T, H, W, 3) float in [0, 1]."""
    rejected: torch.Tensor
    """(N, T, H, W, 3) float in [0, 1]."""
    context: torch.Tensor | None = None
    """(N, C, H, W, 3) float in [0, 1], or None (the model then sees a black context)."""
    prompt_ids: torch.Tensor | None = None
    """(N,) int64, used to keep prompts out of both train and held-out sets."""


class RewardModel(nn.Module):
    """Tiny conv scorer of (context, rollout) -> (B,) scalar."""

    def __init__(self, config: RewardModelConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.net = nn.Sequential(
            nn.Conv2d(6, c, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.head = nn.Linear(2 * c, 1)

    def forward(self, frames: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """frames (B, T, H, W, 3), context (B, C, H, W, 3) or None -> scores (B,)."""
        b, t, h, w, _ = frames.shape
        ctx = context[:, -1] if context is not None else torch.zeros_like(frames[:, 0])  # (B, H, W, 3)
        x = torch.cat([frames, ctx[:, None].expand(b, t, h, w, 3)], dim=-1)  # (B, T, H, W, 6)
        x = x.reshape(b * t, h, w, 6).permute(0, 3, 1, 2).float()
        r = self.config.resolution
        if (h, w) != (r, r):
            x = F.interpolate(x, size=(r, r), mode="area")
        feat = self.net(x).mean(dim=(2, 3)).view(b, t, -1).mean(dim=1)  # (B, 2c)
        return self.head(feat).squeeze(-1)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(chosen - rejected): the Bradley-Terry negative log-likelihood.

    Worked example: scores 1 (chosen) and 0 (rejected) give
    -log sigmoid(1) = log(1 + e^-1) = log(1.36788) = 0.31326; equal scores give log 2 = 0.69315.
    """
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def _split(n: int, prompt_ids: torch.Tensor | None, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = np.arange(n) if prompt_ids is None else prompt_ids.cpu().numpy()
    uniq = rng.permutation(np.unique(groups))
    n_hold = max(1, int(round(frac * len(uniq)))) if frac > 0 and len(uniq) > 1 else 0
    held = np.isin(groups, uniq[:n_hold])
    return np.flatnonzero(~held), np.flatnonzero(held)


@torch.no_grad()
def pair_accuracy(model: RewardModel, pairs: PreferencePairs, idx: np.ndarray, batch: int = 64) -> float:
    """Fraction of pairs at ``idx`` where the model scores chosen above rejected."""
    if len(idx) == 0:
        return float("nan")
    hits = 0
    for s in range(0, len(idx), batch):
        i = torch.as_tensor(idx[s : s + batch])
        ctx = pairs.context[i] if pairs.context is not None else None
        hits += int((model(pairs.chosen[i], ctx) > model(pairs.rejected[i], ctx)).sum())
    return hits / len(idx)


def train_reward_model(
    pairs: PreferencePairs, config: RewardModelConfig | None = None
) -> tuple[RewardModel, dict[str, float]]:
    """Fit a ``RewardModel`` with the Bradley-Terry loss. Returns (model, report) where the
    report has train_loss (last 10 steps), train_accuracy, heldout_accuracy, n_train, n_heldout."""
    config = config or RewardModelConfig()
    torch.manual_seed(config.seed)
    model = RewardModel(config)
    n = pairs.chosen.shape[0]
    tr, ho = _split(n, pairs.prompt_ids, config.holdout_fraction, config.seed)
    if len(tr) == 0:
        raise ValueError("no training pairs left after the held-out split")
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    model.train()
    for _ in range(config.steps):
        i = torch.as_tensor(tr)[torch.randint(len(tr), (min(config.batch_size, len(tr)),), generator=gen)]
        ctx = pairs.context[i] if pairs.context is not None else None
        loss = bradley_terry_loss(model(pairs.chosen[i], ctx), model(pairs.rejected[i], ctx))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    report = {
        "train_loss": float(np.mean(losses[-10:])),
        "train_accuracy": pair_accuracy(model, pairs, tr),
        "heldout_accuracy": pair_accuracy(model, pairs, ho),
        "n_train": float(len(tr)),
        "n_heldout": float(len(ho)),
    }
    return model, report


def pairs_from_reward(rollouts_a, rollouts_b, episodes, reward) -> PreferencePairs:
    """Rank two RolloutBatches of the same prompts with ``reward`` (any callable
    ``(rollouts, episodes) -> (B,)``, e.g. ``get_reward('ssim')``). Ties and non-finite
    scores are dropped."""
    ra = torch.as_tensor(reward(rollouts_a, episodes)).float().cpu()
    rb = torch.as_tensor(reward(rollouts_b, episodes)).float().cpu()
    keep = torch.isfinite(ra) & torch.isfinite(rb) & (ra != rb)
    a_wins = (ra > rb)[keep]
    fa, fb = rollouts_a.frames.cpu()[keep], rollouts_b.frames.cpu()[keep]
    w = a_wins.view(-1, 1, 1, 1, 1)
    ctx = rollouts_a.context.cpu()[keep] if rollouts_a.context is not None else None
    pid = rollouts_a.prompt_ids if rollouts_a.prompt_ids is not None else episodes.seed
    return PreferencePairs(
        chosen=torch.where(w, fa, fb).float(),
        rejected=torch.where(w, fb, fa).float(),
        context=ctx.float() if ctx is not None else None,
        prompt_ids=pid.cpu()[keep],
    )


def load_npy(path: str | Path) -> np.ndarray:
    """`np.load` without pickles; a missing, truncated or pickled file is an error naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError) as exc:  # pickled object arrays, bad headers, short files
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from None


def load_rollout_file(path: str | Path, frame_width: int | None = None) -> torch.Tensor:
    """Read one rollout as (T, H, W, 3) float in [0, 1] from ``.npy`` ((T, H, W, 3), uint8 or
    float in [0, 1]) or a ``.png`` strip (frames side by side: H x (T*W) x 3; W = H unless
    ``frame_width`` is given)."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = load_npy(path)
    elif path.suffix == ".png":
        from PIL import Image

        try:
            img = np.asarray(Image.open(path).convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        except OSError as exc:  # not an image, cut short
            raise ValueError(f"{path}: not a readable PNG ({exc})") from None
        h, tw, _ = img.shape
        fw = frame_width or h
        if tw % fw:
            raise ValueError(f"{path}: strip width {tw} is not a multiple of the frame width {fw}")
        arr = img.reshape(h, tw // fw, fw, 3).transpose(1, 0, 2, 3)
    else:
        raise ValueError(f"{path}: rollouts must be .npy or .png strips")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path}: expected (T, H, W, 3), got {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


@dataclass
class PairLine:
    """One line of a preference JSONL: ``{"prompt_id": int, "chosen": path, "rejected": path, "context": path?}``."""

    where: str
    """``FILE:LINE``, for error messages."""
    prompt_id: int
    """The prompt's id (for envs3d prompts: the episode seed)."""
    chosen: Path
    """The preferred rollout's file, resolved against the JSONL's folder."""
    rejected: Path
    """The other rollout's file, resolved likewise."""
    context: Path | None = None
    """Optional context frames' file."""


def read_pair_lines(path: str | Path) -> list[PairLine]:
    """The pairs of a preference JSONL (the one reader of the format: the reward model's and DPO's
    loaders differ only in how they read each rollout file). Blank lines are skipped; a line that
    lacks a key, or a file with no pair, is an error naming the file and line."""
    path = Path(path)
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        missing = {"prompt_id", "chosen", "rejected"} - set(record)
        if missing:
            raise ValueError(f"{path}:{number}: missing keys {sorted(missing)}")
        prompt_id = record["prompt_id"]
        if isinstance(prompt_id, bool) or not isinstance(prompt_id, int):
            raise ValueError(f"{path}:{number}: prompt_id must be an integer, got {prompt_id!r}")
        for key in ("chosen", "rejected", "context"):
            if key in record and not isinstance(record[key], str):
                raise ValueError(f"{path}:{number}: {key} must be a file path (a string), got {record[key]!r}")
        context = path.parent / record["context"] if "context" in record else None
        lines.append(PairLine(f"{path}:{number}", prompt_id, path.parent / record["chosen"],
                              path.parent / record["rejected"], context))
    if not lines:
        raise ValueError(f"{path}: no pairs")
    return lines


def load_pairs_jsonl(path: str | Path, frame_width: int | None = None) -> PreferencePairs:
    """Read ``{"prompt_id": int, "chosen": path, "rejected": path, "context": path?}`` lines.
    Relative paths are resolved against the JSONL's folder. All rollouts must share a shape."""
    lines = read_pair_lines(path)
    has_ctx = all(line.context is not None for line in lines)

    def stack(key: str) -> torch.Tensor:
        tensors = [load_rollout_file(getattr(line, key), frame_width) for line in lines]
        for line, tensor in zip(lines, tensors):
            if tensor.shape != tensors[0].shape:
                raise ValueError(f"{line.where}: {key} has shape {tuple(tensor.shape)}, but {lines[0].where}'s has "
                                 f"{tuple(tensors[0].shape)}; every {key} rollout must share a shape")
        return torch.stack(tensors)

    return PreferencePairs(
        chosen=stack("chosen"),
        rejected=stack("rejected"),
        context=stack("context") if has_ctx else None,
        prompt_ids=torch.tensor([line.prompt_id for line in lines], dtype=torch.int64),
    )


def save_reward_model(model: RewardModel, path: str | Path, report: dict[str, float] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (config plus optional report) into ``path``."""
    from safetensors.torch import save_file

    from posttrain.envs3d.jobs import atomic_write, atomic_write_text

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Each file by a rename, config.json last: a kill mid-save leaves the previous files whole, never half a file.
    atomic_write(path / "model.safetensors", lambda staging: save_file(weights, str(staging)))
    meta: dict[str, Any] = {"config": asdict(model.config)}
    if report is not None:
        meta["report"] = report
    atomic_write_text(path / "config.json", json.dumps(meta, indent=2))
    return path


def load_reward_model(path: str | Path, device: torch.device | str = "cpu") -> RewardModel:
    """Inverse of ``save_reward_model``; the model is returned in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a reward model folder (no {name}); a reward_model run writes "
                                    f"one to OUT/reward_model")
    from posttrain.envs3d.jobs import read_json_object

    meta = read_json_object(path / "config.json")  # not UTF-8, not JSON, not an object: an error naming it
    try:
        known = {f.name for f in fields(RewardModelConfig)}
        config = RewardModelConfig(**{k: v for k, v in meta["config"].items() if k in known})
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # no "config" object, bad values
        raise ValueError(f"{path / 'config.json'}: not a reward model config ({type(exc).__name__}: {exc})") from None
    model = RewardModel(config)
    try:
        model.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
    except Exception as exc:  # a cut-short file (SafetensorError), weights of another shape (RuntimeError)
        problem = str(exc).strip().splitlines()[0]
        raise ValueError(f"{path / 'model.safetensors'}: cannot load the reward model's weights ({problem})") from None
    return model.to(device).eval()


@register_reward("learned")
class LearnedReward(Reward):
    """Score rollouts with a saved ``RewardModel`` (``path``: folder from ``save_reward_model``).
    Context: rollouts.context, else the true episode frame num_context - 1 (frame 0 if none)."""

    def __init__(self, path: str, scale: float = 1.0):
        self.path = str(path)
        self.scale = scale
        self._model: RewardModel | None = None

    @staticmethod
    def check_params(path: str, scale: float = 1.0) -> None:
        """Called by `check_reward_specs` before any work: the model loads (it is tiny)."""
        load_reward_model(path)

    def __getstate__(self):
        # Ship the path, not the weights: each worker process loads the model itself.
        return {"path": self.path, "scale": self.scale, "_model": None}

    @torch.no_grad()
    def evaluate(self, rollouts, episodes) -> RewardResult:
        if self._model is None:
            self._model = load_reward_model(self.path)
        frames = rollouts.frames.float().cpu()
        if rollouts.context is not None:
            ctx = rollouts.context.float().cpu()
        else:
            step = max(rollouts.num_context - 1, 0)
            ctx = episodes.frames[:, step : step + 1].cpu().float() / 255.0
        scores = self._model(frames, ctx) * self.scale
        if not math.isfinite(self.scale):
            raise ValueError("scale must be finite")
        return RewardResult(reward=scores.to(rollouts.frames.device))
