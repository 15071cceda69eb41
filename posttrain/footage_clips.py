"""Clips of an ingested footage dataset (`posttrain footage ingest`) for held-out evaluation.

    clips = FootageClips.open("data/footage", needed_frames=10)        # checks before any work
    held, rest = clips.split(heldout_fraction=0.1)                      # or clips.split(selection="90:100")
    episodes = clips.load(held, needed_frames=10)                       # {"frames", "actions", "seed"}
    mean = clips.mean_frame(rest)                                       # the mean-image baseline

A held-out selection is either a clip range (`START:STOP` or `a,b,c`, row numbers of the dataset) or the
last `heldout_fraction` of its rows, the same rows SFT's `heldout_fraction` keeps out of training (ingest
writes sources in sorted path order, so these are the last videos, one possibly straddling the split).
Footage has no simulator truth: only frames and actions are read. A clip's rollout seed is its row number,
so a base and an adapter evaluated on the same clips see the same sampling noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.envs3d import parse_seeds

_CHUNK = 64  # rows read at a time: memory stays bounded by the selection, not the dataset


def heldout_rows(total: int, fraction: float) -> int:
    """How many of `total` rows `heldout_fraction` holds out: at least one (SFT's rule)."""
    return max(1, round(total * fraction))


@dataclass
class FootageClips:
    """An opened footage dataset: its path, row count and clip length."""

    path: Path
    dataset: object
    frames: int
    image_size: int

    @classmethod
    def open(cls, path: str | Path, needed_frames: int | None = None, where: str = "--data",
             horizon_key: str = "--horizon") -> FootageClips:
        """Open and check `path`: a `datasets` folder of footage clips (frames + actions, no simulator
        columns) whose clips hold at least `needed_frames` frames. Every error names the folder (as `where`)
        and, for too-short clips, the setting to lower (`horizon_key`)."""
        from datasets import load_from_disk

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{where} {path}: no such folder")
        if not (path / "dataset_info.json").is_file():
            raise FileNotFoundError(f"{where} {path} is not a `datasets` folder (no dataset_info.json); make one with "
                                    f"`posttrain footage ingest VIDEOS --out {path}`")
        try:
            dataset = load_from_disk(str(path))  # memory-mapped: cheap
        except Exception as exc:  # datasets raises IndexError on an empty folder, OSError on a bad one
            raise ValueError(f"{where} {path} cannot be read as a dataset ({type(exc).__name__})") from None
        columns = set(dataset.column_names)
        if "segmentation" in columns or "seed" in columns:
            raise ValueError(f"{where} {path} holds envs3d episodes, not footage; evaluate simulator episodes with "
                             f"--seeds (and --scene) instead")
        missing = sorted({"frames", "actions"} - columns)
        if missing:
            raise ValueError(f"{where} {path} lacks the footage columns {missing} (has {sorted(columns)})")
        if len(dataset) == 0:
            raise ValueError(f"{where} {path} holds no clips")
        shape = getattr(dataset.features["frames"], "shape", None)
        if not shape or len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2]:
            raise ValueError(f"{where} {path}: column 'frames' is not (T, H, H, 3) square RGB clips (got {shape})")
        clips = cls(path, dataset, int(shape[0]), int(shape[1]))
        if needed_frames is not None and clips.frames < needed_frames:
            raise ValueError(f"{where} {path}: clips hold {clips.frames} frames, fewer than the {needed_frames} "
                             f"needed (context + horizon); lower {horizon_key} or ingest longer clips "
                             f"(posttrain footage ingest --clip-frames)")
        return clips

    def __len__(self) -> int:
        return len(self.dataset)

    def split(self, selection: str | None = None, heldout_fraction: float | None = None) -> tuple[list, list]:
        """(held-out rows, the other rows). Neither argument: every row is held out and none is left over."""
        total = len(self)
        if selection is not None and heldout_fraction is not None:
            raise ValueError("give a clip range or a held-out fraction, not both")
        if heldout_fraction is not None:
            if not 0 < heldout_fraction < 1:
                raise ValueError(f"held-out fraction {heldout_fraction} is outside (0, 1)")
            held = heldout_rows(total, heldout_fraction)
            if held >= total:
                raise ValueError(f"{self.path}: {total} clips are too few to hold out a fraction of "
                                 f"{heldout_fraction} and keep the rest as training clips")
            return list(range(total - held, total)), list(range(total - held))
        if selection is None:
            return list(range(total)), []
        try:
            rows = parse_seeds(selection)
        except ValueError as exc:
            raise ValueError(f"clip selection {selection!r}: {exc}") from None
        outside = [r for r in rows if not 0 <= r < total]
        if outside:
            raise ValueError(f"clip selection {selection!r}: {self.path} has clips 0..{total - 1}, not {outside[0]}")
        chosen = set(rows)
        return sorted(chosen), [r for r in range(total) if r not in chosen]

    def load(self, rows: list[int], needed_frames: int | None = None) -> dict:
        """{"frames": (E, T, H, W, 3) uint8, "actions": (E, T - 1) int64, "seed": (E,) row numbers} of `rows`,
        cut to their first `needed_frames` frames."""
        length = needed_frames or self.frames
        frames, actions = [], []
        for start in range(0, len(rows), _CHUNK):
            part = self.dataset.select(rows[start: start + _CHUNK])
            frames.append(part.with_format("torch", columns=["frames"], dtype=torch.uint8)[:]["frames"][:, :length])
            actions.append(part.with_format("torch", columns=["actions"])[:]["actions"][:, : length - 1].long())
        return {"frames": torch.cat(frames), "actions": torch.cat(actions), "seed": torch.tensor(rows)}

    def mean_frame(self, rows: list[int]) -> torch.Tensor:
        """(H, W, 3) float in [0, 1]: the mean of every frame of `rows`, read a chunk at a time."""
        total = torch.zeros(self.image_size, self.image_size, 3, dtype=torch.float64)
        count = 0
        for start in range(0, len(rows), _CHUNK):
            part = self.dataset.select(rows[start: start + _CHUNK])
            frames = part.with_format("torch", columns=["frames"], dtype=torch.uint8)[:]["frames"]
            total += frames.double().sum((0, 1))
            count += frames.shape[0] * frames.shape[1]
        return (total / max(count, 1) / 255).float()

    def describe(self, rows: list[int], name: str | None = None) -> str:
        """'clips 90..99 of data/footage' (or the list when not contiguous); `name` in place of the path."""
        where = self.path if name is None else name
        if rows and rows == list(range(rows[0], rows[-1] + 1)):
            return f"clips {rows[0]}..{rows[-1]} of {where}"
        return f"clips {','.join(map(str, rows))} of {where}"
