"""Generate envs3d episodes and write them as a Hugging Face `datasets` dataset.

    posttrain scenes generate --seeds 0:64 --frames 16 --size 64 --workers 2 --out data/tabletop

Each worker process owns one PyBullet client. Episodes are produced in seed order
whatever the worker count, so the written dataset is byte-identical for 1 or N
workers and for repeated runs. Output is written to a temporary folder next to
`--out` and renamed into place only when complete; `--overwrite` replaces only a
folder this command wrote (see `jobs`), and workers die with a killed parent.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import hashlib
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .actions import INVERSE, NUM_CAMERA_ACTIONS, scripted_actions
from .config import MAX_OBJECTS, SceneConfig
from .jobs import (
    check_output_folder,
    die_with_parent,
    fault_point,
    progress_bar,
    replace_folder,
    save_dataset_quietly,
    staging_folder,
    write_output_marker,
)

MAX_FRAMES = 4096


class EpisodeError(RuntimeError):
    """An episode failed to generate; the message names its seed."""


MAX_SEED = 2**32 - 1
"""Largest episode seed (numpy's RandomState accepts 0 .. 2**32 - 1)."""
MAX_SEED_COUNT = 10_000_000
"""Most seeds one START:STOP range may hold: the list is built in memory, and a typo such as 0:4000000000
would otherwise exhaust it (ten million 64-px, 16-frame episodes is already about 2 TB of frames)."""


def parse_seeds(spec: str) -> list[int]:
    """'0:64' -> 0..63, '3,5,9' -> [3, 5, 9], '7' -> [7]. Errors name the bad value."""
    spec = spec.strip()
    try:
        if ":" in spec:
            start_text, stop_text = spec.split(":", 1)
            start, stop = int(start_text), int(stop_text)
            if stop <= start or start < 0:
                raise ValueError
            if stop - 1 > MAX_SEED:
                raise ValueError(f"bad seed range {spec!r}: a seed may be at most {MAX_SEED} (numpy's seed range)")
            if stop - start > MAX_SEED_COUNT:
                raise ValueError(f"bad seed range {spec!r}: {stop - start:,} seeds, but a range may hold at most "
                                 f"{MAX_SEED_COUNT:,}")
            return list(range(start, stop))
        seeds = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError as exc:
        if "at most" in str(exc):
            raise
        raise ValueError(f"bad seed range {spec!r}: use START:STOP with 0 <= START < STOP, or a,b,c") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"bad seed list {spec!r}: seeds must be non-negative integers")
    if max(seeds) > MAX_SEED:
        raise ValueError(f"bad seeds {spec!r}: a seed may be at most {MAX_SEED} (numpy's seed range)")
    return seeds


def legalize(actions: np.ndarray, rig) -> np.ndarray:
    """Replace camera moves the rig would block (leaving the room etc.) by their inverse, else noop."""
    rig = copy.deepcopy(rig)
    legal = actions.copy()
    for t, action in enumerate(actions):
        action = int(action)
        if 0 < action < NUM_CAMERA_ACTIONS and rig.blocked(action):
            action = INVERSE[action] if not rig.blocked(INVERSE[action]) else 0
        legal[t] = action
        if action < NUM_CAMERA_ACTIONS:
            rig.apply(action)
    return legal


def episode_actions(policy: str, rng: np.random.Generator, length: int, rig, num_objects: int) -> tuple[np.ndarray, str]:
    """A legal scripted action sequence for one episode; loops stay exact loops after legalising."""
    actions, used = scripted_actions(policy, rng, length, num_objects)
    if used != "loop":
        return legalize(actions, rig), used
    half = length // 2
    pad = length - 2 * half
    out = legalize(actions[pad : pad + half], rig)
    back = np.array([INVERSE[int(a)] for a in out[::-1]], dtype=np.int64)
    return np.concatenate([actions[:pad], out, back]), used


_WORKER_ENV = None


def _worker_env(config: SceneConfig):
    global _WORKER_ENV
    if _WORKER_ENV is None or _WORKER_ENV.config != config:
        from .env import TabletopEnv

        if _WORKER_ENV is not None:
            _WORKER_ENV.close()
        _WORKER_ENV = TabletopEnv(config)
    return _WORKER_ENV


def generate_episode(seed: int, frames: int, config: SceneConfig, actions: Sequence[int] | None = None) -> dict:
    """Roll the scripted policy (or the given `actions`) for one seed; returns the episode dict."""
    if not 2 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames={frames} is outside [2, {MAX_FRAMES}]")
    env = _worker_env(config)
    obs, info = env.reset(seed=seed)
    if actions is None:
        rng = np.random.default_rng([seed, 0x5CE7E])
        actions, policy = episode_actions(config.policy, rng, frames - 1, env.rig, info["num_objects"])
    else:
        actions, policy = np.asarray(actions, dtype=np.int64), "given"
        if actions.shape != (frames - 1,):
            raise ValueError(f"seed {seed}: expected {frames - 1} actions, got shape {actions.shape}")
    observations = [obs]
    for action in actions:
        obs, *_ = env.step(int(action))
        observations.append(obs)
    frames = np.stack([o["rgb"] for o in observations])
    segmentation = np.stack([o["segmentation"] for o in observations])
    poses = np.stack([o["object_poses"] for o in observations])
    poses[:, info["num_objects"]:] = np.nan  # the episode marks empty object slots with NaN
    is_loop = policy == "loop" or bool(
        np.array_equal(observations[0]["world_to_camera"], observations[-1]["world_to_camera"])
        and np.allclose(np.nan_to_num(poses[0]), np.nan_to_num(poses[-1]))
    )
    return {
        "seed": int(seed),
        "policy": policy,
        "frames": frames,
        "depth": np.stack([o["depth"] for o in observations]),
        "segmentation": segmentation,
        "intrinsics": observations[0]["intrinsics"],
        "world_to_camera": np.stack([o["world_to_camera"] for o in observations]),
        "actions": np.asarray(actions, dtype=np.int64),
        "object_positions": poses[..., :3].copy(),
        "object_orientations": poses[..., 3:].copy(),
        "object_visible": np.stack([o["object_visible"] for o in observations]).astype(bool),
        "object_colors": _rendered_colors(frames, segmentation, info["object_colors"]),
        "num_objects": int(info["num_objects"]),
        "is_loop": is_loop,
        "scene_config": config.to_json(),
    }


def _rendered_colors(frames: np.ndarray, segmentation: np.ndarray, nominal: np.ndarray) -> np.ndarray:
    """Mean rendered RGB of each object over the episode (lighting darkens the nominal colour);
    the nominal colour where an object never shows."""
    colors = nominal.copy()
    for index in range(len(colors)):
        mask = segmentation == index + 1
        if mask.any():
            colors[index] = np.round(frames[mask].mean(0)).astype(np.uint8)
    return colors


def features(frames: int, size: int):
    """The `datasets.Features` of an episode dataset."""
    from datasets import Array2D, Array3D, Array4D, Features, Sequence, Value

    return Features({
        "seed": Value("int64"),
        "policy": Value("string"),
        "frames": Array4D((frames, size, size, 3), "uint8"),
        "depth": Array3D((frames, size, size), "float32"),
        "segmentation": Array3D((frames, size, size), "int32"),
        "intrinsics": Array2D((3, 3), "float32"),
        "world_to_camera": Array3D((frames, 4, 4), "float32"),
        "actions": Sequence(Value("int64"), length=frames - 1),
        "object_positions": Array3D((frames, MAX_OBJECTS, 3), "float32"),
        "object_orientations": Array3D((frames, MAX_OBJECTS, 4), "float32"),
        "object_visible": Array2D((frames, MAX_OBJECTS), "bool"),
        "object_colors": Array2D((MAX_OBJECTS, 3), "uint8"),
        "num_objects": Value("int32"),
        "is_loop": Value("bool"),
        "scene_config": Value("string"),
    })


def _generate_one(args) -> dict:
    seed, frames, config = args
    try:
        return generate_episode(seed, frames, config)
    except Exception as exc:  # re-raised in the parent with the seed attached
        raise EpisodeError(f"episode seed {seed} failed: {type(exc).__name__}: {exc}") from exc


def iter_episodes(seeds: Iterable[int], frames: int, config: SceneConfig, workers: int = 1) -> Iterator[dict]:
    """Episodes in seed order; with workers > 1, a spawn process pool with one PyBullet client each."""
    seeds = list(seeds)
    if workers <= 1:
        for seed in seeds:
            yield _generate_one((seed, frames, config))
        return
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=die_with_parent,
                                initargs=(os.getpid(),)) as pool:
        window = 4 * workers
        pending: list[tuple[int, cf.Future]] = []
        queue = iter(seeds)
        for seed in queue:
            pending.append((seed, pool.submit(_generate_one, (seed, frames, config))))
            if len(pending) >= window:
                break
        while pending:
            seed, future = pending.pop(0)
            try:
                episode = future.result()
            except cf.process.BrokenProcessPool as exc:
                raise EpisodeError(f"a worker process died while generating episode seed {seed}") from exc
            # Test hook (POSTTRAIN_FAULT): the pool's private pid table is the only list of its workers.
            fault_point("generate_after_first_episode", pool._processes or {})
            yield episode
            next_seed = next(queue, None)
            if next_seed is not None:
                pending.append((next_seed, pool.submit(_generate_one, (next_seed, frames, config))))


def generate_dataset(
    seeds: Sequence[int], frames: int, out: str | os.PathLike, config: SceneConfig | None = None,
    workers: int = 1, overwrite: bool = False, progress: bool = True, shared: bool = False,
) -> Path:
    """Write episodes for `seeds` to `out` (a `datasets.load_from_disk` folder); returns the path.

    `shared`: `out` is an episode-cache folder that other processes (a run's other ranks, a second run on
    the same cache) may be writing at the same time. The episodes are deterministic, so whichever copy lands
    first is kept: ours is discarded, and a folder another process may be reading is never deleted."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    config = config or SceneConfig()
    if not 2 <= frames <= MAX_FRAMES:
        raise ValueError(f"--frames {frames} is outside [2, {MAX_FRAMES}]")
    if workers < 1:
        raise ValueError(f"--workers {workers} must be at least 1")
    if not seeds:
        raise ValueError("no seeds to generate")
    out = Path(out)
    if shared and (out / "dataset_info.json").is_file():
        return out
    check_output_folder(out, overwrite)
    staging = staging_folder(out)
    try:
        arrow_path = staging / "episodes.arrow"
        feats = features(frames, config.image_size)
        with ArrowWriter(features=feats, path=str(arrow_path)) as writer, \
                progress_bar(len(seeds), "episodes", enabled=progress, unit="ep") as advance:
            for episode in iter_episodes(seeds, frames, config, workers):
                writer.write(episode)
                advance()
            writer.finalize()
        dataset = Dataset.from_file(str(arrow_path))
        # A content fingerprint (not the random default) keeps the saved folder identical across runs.
        dataset._fingerprint = hashlib.sha256(f"{list(seeds)}|{frames}|{config.to_json()}".encode()).hexdigest()[:16]
        final_tmp = staging / "dataset"
        save_dataset_quietly(dataset, final_tmp)
        del dataset
        write_output_marker(final_tmp, "posttrain scenes generate")
        if shared:
            try:
                os.rename(final_tmp, out)  # fails, changing nothing, where another process's folder landed first
            except OSError:
                if not (out / "dataset_info.json").is_file():
                    raise
        else:
            replace_folder(final_tmp, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
