"""Batch containers that rewards read: the model's rollouts and the simulator's episodes.

Shapes (B = batch, T = generated frames, C = context frames, E = episode length):

``RolloutBatch``
    frames            (B, T, H, W, 3) float32 in [0, 1]; predicted frames for episode
                      steps ``num_context .. num_context + T - 1``
    num_context       int, number of true frames the model was conditioned on
    context           (B, C, H, W, 3) float in [0, 1] or None (what the model saw)
    reference_frames  (B, T, H, W, 3) float in [0, 1] or None (tokenizer reconstruction
                      of the true frames for the same steps)
    tokens            any tensor or None (not read by the built-in rewards)
    prompt_ids        (B,) int64 or None (episode seeds)
    sample_ids        (B,) int64 or None (index of the sample within its prompt group)

``EpisodeBatch`` (the envs3d episode contract, stacked)
    seed              (B,) int64
    frames            (B, E, H, W, 3) uint8 RGB
    depth             (B, E, H, W) float32 metric z-depth (along the optical axis), metres
    segmentation      (B, E, H, W) int32; 0 background, 1..N objects
    intrinsics        (B, 3, 3) float32 pinhole K in pixels
    world_to_camera   (B, E, 4, 4) float32, OpenCV camera (x right, y down, z forward)
    actions           (B, E-1) int64
    object_positions  (B, E, 6, 3) float32 world centres, NaN rows for absent objects
    object_visible    (B, E, 6) bool
    num_objects       (B,) int64
    object_colors     (B, 6, 3) uint8 mean RGB per object, zeros when absent
    is_loop           (B,) bool

Pixel convention (envs3d must match): a camera point (X, Y, Z) projects to
``u = fx * X / Z + cx``, ``v = fy * Y / Z + cy``; pixel column j covers u in
[j, j + 1) and row i covers v in [i, i + 1), so the centre of pixel (i, j) is
(u, v) = (j + 0.5, i + 0.5). A centred camera of width W therefore has cx = W / 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["RolloutBatch", "EpisodeBatch", "N_MAX_OBJECTS"]

N_MAX_OBJECTS = 6


def _index(value: Any, idx: torch.Tensor):
    """Select rows of a per-sample field; leave scalars and None alone."""
    if isinstance(value, torch.Tensor):
        return value[idx.to(value.device)]
    if isinstance(value, np.ndarray):
        return value[idx.cpu().numpy()]
    return value


def _to_numpy(value: Any):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _from_numpy(value: Any):
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


class _BatchMixin:
    """Row selection and numpy round trips shared by both batch types."""

    _scalar_fields: tuple[str, ...] = ()

    def select(self, idx: Sequence[int] | torch.Tensor):
        """Return a batch holding only the samples at ``idx`` (order kept)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        kw = {
            f.name: (getattr(self, f.name) if f.name in self._scalar_fields else _index(getattr(self, f.name), idx))
            for f in fields(self)
        }
        return type(self)(**kw)

    def to_numpy(self) -> dict[str, Any]:
        """Plain dict of numpy arrays (what crosses process boundaries; no torch pickles)."""
        return {f.name: _to_numpy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_numpy(cls, data: dict[str, Any]):
        """Inverse of ``to_numpy``."""
        return cls(**{k: _from_numpy(v) for k, v in data.items()})

    def to(self, device: torch.device | str):
        """Move every tensor field to ``device``."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


@dataclass
class RolloutBatch(_BatchMixin):
    """A batch of generated rollouts (see the module docstring for shapes)."""

    frames: torch.Tensor  # (B, T, H, W, 3) float in [0, 1]
    num_context: int = 0
    context: torch.Tensor | None = None  # (B, C, H, W, 3)
    reference_frames: torch.Tensor | None = None  # (B, T, H, W, 3)
    tokens: torch.Tensor | None = None
    prompt_ids: torch.Tensor | None = None  # (B,)
    sample_ids: torch.Tensor | None = None  # (B,)

    _scalar_fields = ("num_context",)

    def __post_init__(self):
        if self.frames.dim() != 5 or self.frames.shape[-1] != 3:
            raise ValueError(f"RolloutBatch.frames must be (B, T, H, W, 3), got {tuple(self.frames.shape)}")
        if self.frames.dtype == torch.uint8:
            raise TypeError("RolloutBatch.frames must be float in [0, 1], got uint8")

    @property
    def batch_size(self) -> int:
        return self.frames.shape[0]

    @property
    def horizon(self) -> int:
        return self.frames.shape[1]


@dataclass
class EpisodeBatch(_BatchMixin):
    """Simulator episodes stacked along a batch dim (see the module docstring for shapes)."""

    seed: torch.Tensor  # (B,)
    frames: torch.Tensor  # (B, E, H, W, 3) uint8
    depth: torch.Tensor  # (B, E, H, W)
    segmentation: torch.Tensor  # (B, E, H, W)
    intrinsics: torch.Tensor  # (B, 3, 3)
    world_to_camera: torch.Tensor  # (B, E, 4, 4)
    actions: torch.Tensor  # (B, E-1)
    object_positions: torch.Tensor  # (B, E, 6, 3)
    object_visible: torch.Tensor  # (B, E, 6)
    num_objects: torch.Tensor  # (B,)
    object_colors: torch.Tensor  # (B, 6, 3)
    is_loop: torch.Tensor  # (B,)

    @property
    def batch_size(self) -> int:
        return self.frames.shape[0]

    @classmethod
    def from_episodes(cls, episodes: Sequence[dict[str, Any]], device: torch.device | str | None = None):
        """Stack a list of envs3d episode dicts into one batch (all must share E, H, W)."""
        if not episodes:
            raise ValueError("from_episodes needs at least one episode")
        dtypes = {
            "seed": np.int64,
            "frames": np.uint8,
            "depth": np.float32,
            "segmentation": np.int32,
            "intrinsics": np.float32,
            "world_to_camera": np.float32,
            "actions": np.int64,
            "object_positions": np.float32,
            "object_visible": np.bool_,
            "num_objects": np.int64,
            "object_colors": np.uint8,
            "is_loop": np.bool_,
        }
        out = {}
        for name, dt in dtypes.items():
            missing = [i for i, ep in enumerate(episodes) if name not in ep]
            if missing:
                raise KeyError(f"episode(s) {missing[:5]} lack field {name!r}")
            try:
                arr = np.stack([np.asarray(ep[name], dtype=dt) for ep in episodes])
            except ValueError as e:
                raise ValueError(f"cannot stack field {name!r}: {e}") from e
            out[name] = torch.from_numpy(arr).to(device) if device is not None else torch.from_numpy(arr)
        return cls(**out)
