"""One play session: the simulator and two world models stepped together, one action at a time.

    session = PlaySession([base, post], SceneConfig(image_size=64), seed=0)
    shot = session.step(action_id("forward"))   # shot.truth, shot.predictions, shot.psnr, ...
    session.resync()                             # re-encode the last true frames as the models' context
    session.close()

The truth is `envs3d.TabletopEnv`. A scene starts from `reset(seed)` followed by `num_context - 1`
noops, which give the models their true context frames. Each model panel then rolls out
autoregressively from its own samples through `start_rollout` / `rollout_step`: one incremental KV-cache
step per action, never a recompute of the rollout so far, so a session's model frames are exactly
`model.rollout(context, actions, horizon, seeds=...)`'s. The panels run in parallel threads while
the simulator steps (torch with one intra-op thread per panel: see `posttrain.play.server`).

A camera move the room blocks leaves the truth where it is; the models get a noop instead, as in the
generated training episodes (`envs3d.generate.legalize`), so they are not told the camera moved.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from posttrain.envs3d import ACTION_NAMES, NUM_ACTIONS, SceneConfig
from posttrain.envs3d.actions import NUM_CAMERA_ACTIONS, decode_push, push_action
from posttrain.rewards.metrics import psnr, ssim

PSNR_CAP = 60.0
"""dB shown (and averaged) for a model frame identical to the truth, where PSNR is infinite."""
RECORD_LIMIT = 3000
"""Frames a session keeps for "record" (the latest ones): 3 panels x 64 x 64 x 3 bytes each, ~110 MB at 64 px.

Saving upscales and encodes them one at a time: measured, under 70 MB more for MP4 (the encoder's buffers)
and ~20 MB for GIF, for any count (stacking them first had cost ~1 GB per 1000 frames). The file is then sent
whole: for 600 frames of noise 37 MB as GIF, 31 MB as MP4; real scenes compress far better."""
RECORD_SCALE = 3
"""Nearest-neighbour upscaling of each panel in recordings (64 px -> 192 px)."""
RECORD_FPS = 10
"""Playback rate of recordings, frames per second."""
MAX_SEED = 2**32
"""Scene seeds are in [0, MAX_SEED) (numpy's seed range)."""


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Decoded frames in [0, 1] -> uint8 (what the page shows and the metrics compare)."""
    return (frames.float() * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def panel_seed(scene_seed: int, syncs: int, panel: int) -> int:
    """The sampling seed of model panel `panel` after `syncs` re-syncs of the scene `scene_seed`:
    every rollout of a session can be replayed with `model.rollout(..., seeds=[panel_seed(...)])`."""
    return int(np.random.SeedSequence([scene_seed, syncs, panel]).generate_state(1)[0])


class RecordingError(Exception):
    """Writing a recording failed (the encoder or the disk); the session itself is unaffected."""


class ModelPanel:
    """One world model's live rollout: true context in, one sampled frame per action out."""

    def __init__(self, model, name: str):
        if not (hasattr(model, "start_rollout") and hasattr(model, "rollout_step")):
            raise ValueError(f"model {name!r} ({type(model).__name__}) has no incremental rollout "
                             "(start_rollout / rollout_step), which posttrain play steps one frame per key")
        self.model, self.name = model, name
        self.state = None
        self.seed = 0
        # A decoder that draws beside the last true frame (`decodes_with_reference`) gets it here, with its age in
        # frames, as `posttrain eval` decodes a rollout; other models never see it.
        self.reference: torch.Tensor | None = None
        self.age = 0

    @torch.inference_mode()
    def sync(self, frames: np.ndarray, actions: np.ndarray, seed: int) -> np.ndarray:
        """Start from true frames (C, H, W, 3) uint8 and the C - 1 actions between them; returns the
        tokenizer's reconstruction of the last frame (what the model now sees) as uint8 (H, W, 3)."""
        tokens = self.model.encode(torch.from_numpy(frames)[None])  # (1, C, N)
        self.seed = seed
        self.state = self.model.start_rollout(tokens, torch.from_numpy(actions)[None].long(), seeds=[seed])
        if getattr(self.model, "decodes_with_reference", False):
            self.reference, self.age = torch.from_numpy(frames[-1])[None], 0  # (1, H, W, 3) uint8
        return to_uint8(self.model.decode(tokens[:, -1:]))[0, 0]

    @torch.inference_mode()
    def step(self, action: int, temperature: float) -> tuple[np.ndarray, dict]:
        """The next frame after `action`, as uint8 (H, W, 3), and how long sampling and decoding took
        (wall, and this thread's CPU time: on a loaded machine the difference is time spent waiting)."""
        start, cpu = time.perf_counter(), time.thread_time()
        tokens, _ = self.model.rollout_step(self.state, torch.tensor([action]), temperature=temperature)
        sampled = time.perf_counter()
        if self.reference is None:
            frame = to_uint8(self.model.decode(tokens[:, None]))[0, 0]
        else:
            self.age += 1
            frame = to_uint8(self.model.decode(tokens[:, None], reference=self.reference, gap=self.age))[0, 0]
        return frame, {"step_ms": 1000 * (sampled - start), "decode_ms": 1000 * (time.perf_counter() - sampled),
                       "cpu_ms": 1000 * (time.thread_time() - cpu)}


@dataclass
class Shot:
    """What one step (or a sync) shows: three frames and the live numbers."""

    kind: str
    """"step", "sync" (re-sync) or "scene" (a new scene)."""
    step: int
    """Actions taken since the scene started."""
    truth: np.ndarray
    """(H, W, 3) uint8 simulator frame."""
    predictions: list[np.ndarray]
    """One (H, W, 3) uint8 frame per model panel (after a sync: the tokenizer's reconstruction)."""
    psnr: list[float]
    """Per model panel, dB against the truth (capped at PSNR_CAP)."""
    ssim: list[float]
    mean_psnr: list[float | None]
    """Running means since the last sync (None before the first step)."""
    mean_ssim: list[float | None]
    steps_since_sync: int
    action: int | None = None
    """The action the user took (None for syncs)."""
    model_action: int | None = None
    """The action the models got: the user's, or a noop where the room blocked a camera move."""
    blocked: bool = False
    seeds: list[int] = field(default_factory=list)
    """The panels' sampling seeds since the last sync."""
    timings_ms: dict = field(default_factory=dict)


class PlaySession:
    """The simulator plus model panels, stepped by one action at a time; not thread-safe (one driver)."""

    def __init__(self, models: list, names: list[str], scene: SceneConfig, seed: int = 0, num_context: int = 2,
                 temperature: float = 0.0, record_limit: int = RECORD_LIMIT):
        from posttrain.envs3d import TabletopEnv

        if num_context < 1:
            raise ValueError(f"num_context={num_context} must be at least 1")
        self.panels = [ModelPanel(model, name) for model, name in zip(models, names)]
        self.scene, self.num_context = scene, num_context
        self.temperature = temperature
        self.env = TabletopEnv(scene)
        self.pool = ThreadPoolExecutor(max_workers=len(self.panels), thread_name_prefix="play-panel")
        self.record: deque = deque(maxlen=record_limit)
        self._lock = threading.Lock()  # close() waits for a step still running in another thread
        self._closed = False
        self.seed = seed
        self.num_objects = 0
        self.shot: Shot = self.new_scene(seed)

    # --- controls -----------------------------------------------------------------------------
    def new_scene(self, seed: int | None = None) -> Shot:
        """Reset the simulator with `seed` (default: the next one), take num_context - 1 noops for the
        context, and sync the models to it."""
        seed = (self.seed + 1) % MAX_SEED if seed is None else int(seed)
        if not 0 <= seed < MAX_SEED:
            raise ValueError(f"scene seed {seed} is outside [0, {MAX_SEED})")
        with self._lock:
            self.seed = seed
            obs, info = self.env.reset(seed=self.seed)
            self.num_objects = info["num_objects"]
            self.frames = deque([obs["rgb"]], maxlen=self.num_context)
            self.actions: deque = deque(maxlen=max(self.num_context - 1, 0))
            for _ in range(self.num_context - 1):
                obs, *_ = self.env.step(0)
                self.frames.append(obs["rgb"])
                self.actions.append(0)
            self.step_count, self.syncs = 0, -1
            self.record.clear()
            return self._sync("scene")

    def resync(self) -> Shot:
        """Re-encode the last num_context true frames as every model's context."""
        with self._lock:
            return self._sync("sync")

    def set_temperature(self, value: float) -> None:
        if not (math.isfinite(value) and 0.0 <= value <= 5.0):
            raise ValueError(f"temperature {value!r} must be in [0, 5] (0 = greedy)")
        self.temperature = float(value)

    def push(self, object_index: int, toward_camera: bool = False) -> int:
        """The action pushing object `object_index` away from the camera (or toward it): of the four
        world directions, the one closest to the camera's horizontal heading."""
        if not 0 <= object_index < self.num_objects:
            raise ValueError(f"this scene has {self.num_objects} objects: no object {object_index + 1} to push")
        yaw = self.env.rig.yaw + (math.pi if toward_camera else 0.0)
        heading = np.array([math.cos(yaw), math.sin(yaw)])
        directions = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]])  # envs3d.actions.PUSH_DIRECTIONS
        return push_action(object_index, int(np.argmax(directions @ heading)))

    def step(self, action: int) -> Shot:
        """Take one action in the simulator and in every model panel; returns the new shot."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the session is closed")
            action = self._check_action(action)
            blocked = bool(0 < action < NUM_CAMERA_ACTIONS and self.env.rig.blocked(action))
            model_action = 0 if blocked else action
            start, cpu = time.perf_counter(), time.thread_time()
            futures = [self.pool.submit(panel.step, model_action, self.temperature) for panel in self.panels]
            obs, *_ = self.env.step(action)  # meanwhile, on this thread
            env_done = time.perf_counter()
            results = [future.result() for future in futures]
            models_done = time.perf_counter()
            self.frames.append(obs["rgb"])
            self.actions.append(model_action)
            self.step_count += 1
            self.steps_since_sync += 1
            predictions = [frame for frame, _ in results]
            shot = self._shot("step", obs["rgb"], predictions, count=True)
            shot.action, shot.model_action, shot.blocked = action, model_action, blocked
            shot.timings_ms = {"env_ms": 1000 * (env_done - start), "models_ms": 1000 * (models_done - start),
                               "metrics_ms": 1000 * (time.perf_counter() - models_done),
                               "driver_cpu_ms": 1000 * (time.thread_time() - cpu),
                               **{f"{name}_{i}": value for i, (_, timing) in enumerate(results)
                                  for name, value in timing.items()}}
            self.record.append((shot.truth, *predictions))
            self.shot = shot
            return shot

    # --- recording ----------------------------------------------------------------------------
    def save_recording(self, path: str | Path, labels: list[str] | None = None) -> Path:
        """Write the kept frames (truth | panels, side by side, upscaled) as a GIF or MP4 (by suffix).

        Frames are upscaled and written one at a time: memory beyond the kept frames does not grow with them.
        A writer failure (the codec, the disk) removes the file and raises RecordingError.
        """
        path = Path(path)
        if path.suffix not in (".gif", ".mp4"):
            raise ValueError(f"recording {path.name}: choose a .gif or .mp4 file")
        with self._lock:
            shots = list(self.record)
        if not shots:
            raise ValueError("nothing to record yet: take a step first")
        strip = _label_strip(labels or ["simulator", *[p.name for p in self.panels]], shots[0][0].shape[1])
        frames = (np.concatenate([strip, _side_by_side(images)], 0) for images in shots)
        try:
            (_write_gif if path.suffix == ".gif" else _write_mp4)(path, frames)
        except Exception as exc:  # whatever imageio, PyAV or Pillow raise fails this recording only
            path.unlink(missing_ok=True)
            cause = exc
            while cause.__cause__ is not None:  # imageio wraps PyAV's error in a vaguer one
                cause = cause.__cause__
            raise RecordingError(f"recording {path.name} failed: {type(cause).__name__}: {cause}") from exc
        return path

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.pool.shutdown(wait=True)
            self.env.close()

    # --- internals ----------------------------------------------------------------------------
    def _check_action(self, action) -> int:
        try:
            value = int(action)
        except (TypeError, ValueError, OverflowError):  # OverflowError: JSON reads 1e999 as inf
            raise ValueError(f"unknown action {action!r}: expected an id in [0, {NUM_ACTIONS})") from None
        if value != action or not 0 <= value < NUM_ACTIONS:
            raise ValueError(f"unknown action {action!r}: expected an id in [0, {NUM_ACTIONS})")
        push = decode_push(value)
        if push is not None and push[0] >= self.num_objects:
            raise ValueError(f"{ACTION_NAMES[value]}: this scene has {self.num_objects} objects")
        return value

    def _sync(self, kind: str) -> Shot:
        self.syncs += 1
        self.steps_since_sync = 0
        self.sums = np.zeros((2, len(self.panels)))
        frames = np.stack(self.frames)
        actions = np.array(self.actions, dtype=np.int64)
        seeds = [panel_seed(self.seed, self.syncs, i) for i in range(len(self.panels))]
        futures = [self.pool.submit(panel.sync, frames, actions, seed) for panel, seed in zip(self.panels, seeds)]
        shot = self._shot(kind, frames[-1], [future.result() for future in futures], count=False)
        self.record.append((shot.truth, *shot.predictions))
        self.shot = shot
        return shot

    def _shot(self, kind: str, truth: np.ndarray, predictions: list[np.ndarray], count: bool) -> Shot:
        stacked = np.stack(predictions)  # (P, H, W, 3)
        truths = np.broadcast_to(truth, stacked.shape)
        psnrs = np.minimum(np.nan_to_num(psnr(stacked, truths), posinf=PSNR_CAP), PSNR_CAP)
        ssims = ssim(stacked, truths)
        if count:
            self.sums += np.stack([psnrs, ssims])
        n = self.steps_since_sync
        means = self.sums / n if n else None
        return Shot(kind=kind, step=self.step_count, truth=truth, predictions=predictions,
                    psnr=[float(v) for v in psnrs], ssim=[float(v) for v in ssims],
                    mean_psnr=[float(v) for v in means[0]] if n else [None] * len(predictions),
                    mean_ssim=[float(v) for v in means[1]] if n else [None] * len(predictions),
                    steps_since_sync=n, seeds=[panel.seed for panel in self.panels])


def _write_mp4(path: Path, frames) -> None:
    import imageio.v3 as iio

    with iio.imopen(path, "w", plugin="pyav") as video:
        video.init_video_stream("libx264", fps=RECORD_FPS)
        for frame in frames:
            # H.264 in yuv420p needs even sides: pad with white.
            video.write_frame(np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)),
                                     constant_values=255))


def _write_gif(path: Path, frames) -> None:
    """An endlessly looping GIF at RECORD_FPS, each frame with its own adaptive palette.

    Pillow's own multi-frame writer keeps every frame until the end; its legacy helpers (as imageio's
    streaming GIF writer uses them) encode one frame at a time.
    """
    from PIL import GifImagePlugin, Image

    duration = round(1000 / RECORD_FPS)
    with open(path, "wb") as handle:
        for i, frame in enumerate(frames):
            image = Image.fromarray(frame).convert("P", palette=Image.Palette.ADAPTIVE)
            if i == 0:
                header, _ = GifImagePlugin.getheader(image, info={"loop": 0, "duration": duration})
                handle.write(b"".join(header))
            handle.write(b"".join(GifImagePlugin.getdata(image, duration=duration, include_color_table=True)))
        handle.write(b";")  # the GIF trailer


def _side_by_side(images, gap: int = 4) -> np.ndarray:
    """Panels (H, W, 3) upscaled by RECORD_SCALE, left to right with white gaps."""
    scaled = [np.repeat(np.repeat(image, RECORD_SCALE, 0), RECORD_SCALE, 1) for image in images]
    spacer = np.full((scaled[0].shape[0], gap, 3), 255, np.uint8)
    parts = [scaled[0]]
    for image in scaled[1:]:
        parts += [spacer, image]
    return np.concatenate(parts, 1)


def _label_strip(labels: list[str], width: int, gap: int = 4, height: int = 16) -> np.ndarray:
    """A white strip with each panel's label above it (Pillow's built-in font)."""
    from PIL import Image, ImageDraw

    panel = width * RECORD_SCALE
    image = Image.new("RGB", (len(labels) * panel + (len(labels) - 1) * gap, height), "white")
    draw = ImageDraw.Draw(image)
    for i, label in enumerate(labels):
        draw.text((i * (panel + gap) + 2, 2), label[: panel // 6], fill="black")
    return np.asarray(image)
