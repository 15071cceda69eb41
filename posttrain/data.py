"""Episode data for trainers: generate envs3d episodes once, cache them as a `datasets` folder, load tensors.

Datasets are keyed by (seeds, frames, scene config) under `cache_dir`, so recipes that
name the same seeds share one folder and a second run skips generation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.envs3d import SceneConfig, generate_dataset, parse_seeds

TENSOR_COLUMNS = ("frames", "actions", "depth", "segmentation", "intrinsics", "world_to_camera",
                  "object_positions", "object_visible", "object_colors", "num_objects", "is_loop", "seed")


@dataclass
class EpisodeDataConfig:
    """Which envs3d episodes to use."""

    seeds: str = "0:64"
    """Seeds as START:STOP (STOP excluded) or a,b,c; each seed is one scene and action script."""
    frames: int = 16
    """Frames per episode."""
    image_size: int = 64
    """Frame side in pixels (must match the model's tokenizer)."""
    workers: int = 2
    """PyBullet worker processes for generation."""
    scene: dict = field(default_factory=dict)
    """SceneConfig overrides, e.g. {policy: loop, walls: false}."""
    cache_dir: str = "data"
    """Where generated datasets are cached (one folder per seeds/frames/scene combination)."""
    path: str = ""
    """Use this existing dataset folder instead of generating (a `datasets.load_from_disk` folder)."""

    def __post_init__(self) -> None:
        from posttrain.config import require

        require(self, positive=("frames", "image_size", "workers"))
        if not self.path:
            parse_seeds(self.seeds)  # a bad range fails when the recipe loads, not after other work
        if "image_size" in self.scene:  # one place for the size, the one the model-size checks read
            raise ValueError(f"scene.image_size={self.scene['image_size']!r}: set the data section's image_size "
                             f"instead (data.image_size, eval.data.image_size)")
        self.scene_config()  # likewise a bad scene override

    def scene_config(self) -> SceneConfig:
        return SceneConfig(image_size=self.image_size).override(dict(self.scene))


def check_held_out(train: EpisodeDataConfig, held_out: EpisodeDataConfig, where: str = "eval.data") -> None:
    """Refuse held-out envs3d seeds that overlap the training seeds (a held-out number would be a lie)."""
    if train.path or held_out.path:
        return
    common = sorted(set(parse_seeds(train.seeds)) & set(parse_seeds(held_out.seeds)))
    if common:
        raise ValueError(f"{where}.seeds={held_out.seeds!r} overlaps data.seeds={train.seeds!r} in {len(common)} "
                         f"seeds (first {common[0]}): held-out episodes must never be trained on")


def dataset_path(config: EpisodeDataConfig, progress: bool = True) -> Path:
    """The dataset folder for `config`, generating it first if it is not cached."""
    if config.path:
        path = Path(config.path)
        if not (path / "dataset_info.json").is_file():
            raise FileNotFoundError(f"dataset path {path} is not a `datasets` folder (no dataset_info.json)")
        from datasets import load_from_disk

        try:
            rows = len(load_from_disk(str(path)))  # memory-mapped: cheap
        except Exception as exc:  # datasets raises IndexError on an empty folder, OSError on a bad one
            raise ValueError(f"dataset {path} holds no episodes or cannot be read ({type(exc).__name__})") from None
        if rows == 0:
            raise ValueError(f"dataset {path} holds no episodes")
        return path
    scene = config.scene_config()
    key = hashlib.sha256(f"{config.seeds}|{config.frames}|{scene.to_json()}".encode()).hexdigest()[:12]
    path = Path(config.cache_dir) / f"envs3d-{key}"
    seeds = parse_seeds(config.seeds)
    if (path / "dataset_info.json").is_file() and _cache_entry_ok(path, len(seeds), config.frames, config.image_size):
        return path
    if path.exists() or path.is_symlink():
        _discard_cache_entry(path)
    generate_dataset(seeds, config.frames, path, scene, workers=config.workers, progress=progress, shared=True)
    return path


def _cache_entry_ok(path: Path, rows: int, frames: int, image_size: int) -> bool:
    """Whether cache folder `path` is whole and of the current format: readable, the columns and shapes
    `generate_dataset` writes today, one row per seed."""
    from datasets import load_from_disk

    from posttrain.envs3d.generate import features

    try:
        dataset = load_from_disk(str(path))  # memory-mapped: cheap
        return len(dataset) == rows and dataset.features == features(frames, image_size)
    except Exception:  # a cut-short arrow file (OSError), a bad state.json (ValueError), ...: regenerate
        return False


def _discard_cache_entry(path: Path) -> None:
    """Remove a broken or outdated cache folder that posttrain wrote (it holds the output marker), so that it
    is generated again; anything else at that path is the user's, and an error naming it."""
    import os
    import shutil

    from posttrain.envs3d.jobs import OUTPUT_MARKER, staging_folder

    if not path.is_dir() or path.is_symlink() or not (path / OUTPUT_MARKER).is_file():
        raise FileExistsError(f"episode cache {path} is not a readable episode dataset of this version and holds no "
                              f"{OUTPUT_MARKER}, so posttrain did not write it; move it away or set data.cache_dir")
    print(f"note: episode cache {path} is incomplete or from another version; generating it again")
    aside = staging_folder(path)  # a rename first: a process that reads it or discards it too sees it whole or gone
    try:
        os.replace(path, aside / "stale")
    except FileNotFoundError:
        pass  # another process discarded it first
    shutil.rmtree(aside, ignore_errors=True)


def load_episodes(config: EpisodeDataConfig, columns: tuple[str, ...] = TENSOR_COLUMNS, progress: bool = True) -> dict:
    """All episodes as a dict of stacked torch tensors (uint8 frames stay uint8)."""
    from datasets import load_from_disk

    path = dataset_path(config, progress)
    dataset = load_from_disk(str(path))
    if len(dataset) == 0:
        raise ValueError(f"dataset {path} holds no episodes")
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise KeyError(f"dataset {path} lacks columns {missing}")
    out: dict = {}
    # Read in slices with explicit dtypes: `datasets` returns int64 for uint8 arrays otherwise (8x memory).
    for column in columns:
        dtype = {"frames": torch.uint8, "object_colors": torch.uint8, "segmentation": torch.int32,
                 "object_visible": torch.bool, "is_loop": torch.bool}.get(column)
        view = dataset.with_format("torch", columns=[column], **({"dtype": dtype} if dtype else {}))
        parts = [view[i: i + 64][column] for i in range(0, len(dataset), 64)]
        out[column] = torch.cat(parts) if isinstance(parts[0], torch.Tensor) else sum(parts, [])
    return out
