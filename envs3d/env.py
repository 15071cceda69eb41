"""Gymnasium environment over a procedural PyBullet tabletop: `gymnasium.make("envs3d/Tabletop-v0")`.

Observations carry the ground truth rewards need. Camera convention: OpenCV
(x right, y down, z forward); `world_to_camera` maps world to camera coordinates;
depth is metric, along the optical axis. See `posttrain.envs3d.camera`.

Camera actions do not advance physics: the scene is static until something is
pushed, after which physics runs (`physics_substeps` steps per env step) for as
long as any object still moves. So camera-only loops render byte-identical frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .actions import NUM_ACTIONS, NUM_CAMERA_ACTIONS, decode_push
from .camera import camera_to_world, intrinsics, invert_pose
from .config import MAX_OBJECTS, SceneConfig
from .scene import Scene

PITCH_LIMIT_STEPS = 4
"""Discrete pitch stays within +-4 turn steps of the start pitch (blocked beyond)."""
HEIGHT_RANGE = (0.12, 1.6)
"""Camera height limits in metres (moves beyond are blocked)."""


@dataclass
class CameraRig:
    """Camera pose on an integer lattice of discrete moves, plus free continuous offsets.

    Translations are kept as integer counts per (heading index, axis) and summed in a
    fixed order, so undoing a move restores the bit-identical pose (float sums of
    +d then -d would not).
    """

    origin: np.ndarray
    yaw0: float
    pitch0: float
    move_step: float
    turn_step: float
    bound: float
    counts: dict = field(default_factory=dict)
    height_steps: int = 0
    yaw_steps: int = 0
    pitch_steps: int = 0
    roll: float = 0.0

    @property
    def yaw(self) -> float:
        return self.yaw0 + self.yaw_steps * self.turn_step

    @property
    def pitch(self) -> float:
        return self.pitch0 + self.pitch_steps * self.turn_step

    def position(self, counts: dict | None = None, height_steps: int | None = None) -> np.ndarray:
        counts = self.counts if counts is None else counts
        height_steps = self.height_steps if height_steps is None else height_steps
        position = self.origin.astype(np.float64).copy()
        for (heading, axis), count in sorted(counts.items()):
            if count:
                angle = self.yaw0 + heading * self.turn_step + (math.pi / 2 if axis else 0.0)
                position[:2] += count * self.move_step * np.array([math.cos(angle), math.sin(angle)])
        position[2] += height_steps * self.move_step
        return position

    def _moved(self, action: int) -> tuple[dict, int, int, int]:
        counts, height, yaw, pitch = dict(self.counts), self.height_steps, self.yaw_steps, self.pitch_steps
        if action in (1, 2, 3, 4):
            key = (yaw, 0 if action in (1, 2) else 1)
            counts[key] = counts.get(key, 0) + (1 if action in (1, 3) else -1)
            if counts[key] == 0:
                del counts[key]
        elif action in (5, 6):
            height += 1 if action == 5 else -1
        elif action in (7, 8):
            yaw += 1 if action == 7 else -1
        elif action in (9, 10):
            pitch += 1 if action == 9 else -1
        return counts, height, yaw, pitch

    def blocked(self, action: int) -> bool:
        """True if a camera action would leave the room, the height range or the pitch range."""
        if not 0 < action < NUM_CAMERA_ACTIONS:
            return False
        counts, height, _, pitch = self._moved(action)
        position = self.position(counts, height)
        return (
            abs(pitch) > PITCH_LIMIT_STEPS
            or not HEIGHT_RANGE[0] <= position[2] <= HEIGHT_RANGE[1]
            or max(abs(position[0]), abs(position[1])) > self.bound
        )

    def apply(self, action: int) -> bool:
        """Apply a discrete camera action; returns False (and does nothing) if it is blocked."""
        if self.blocked(action):
            return False
        self.counts, self.height_steps, self.yaw_steps, self.pitch_steps = self._moved(action)
        return True

    def apply_continuous(self, delta: np.ndarray) -> None:
        """6-DoF delta (forward, left, up in metres along the heading; yaw, pitch, roll in radians)."""
        forward, left, up, dyaw, dpitch, droll = (float(v) for v in delta)
        position = self.position()
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        position += np.array([forward * c - left * s, forward * s + left * c, up])
        position[:2] = np.clip(position[:2], -self.bound, self.bound)
        position[2] = float(np.clip(position[2], *HEIGHT_RANGE))
        # Continuous motion leaves the lattice: fold the current pose into a new origin.
        self.origin, self.counts, self.height_steps = position, {}, 0
        self.yaw0, self.yaw_steps = self.yaw + dyaw, 0
        limit = PITCH_LIMIT_STEPS * self.turn_step
        self.pitch0 = float(np.clip(self.pitch + dpitch, -limit - abs(self.pitch0), limit))
        self.pitch_steps = 0
        self.roll += droll

    def world_to_camera(self) -> np.ndarray:
        return invert_pose(camera_to_world(self.position(), self.yaw, self.pitch, self.roll)).astype(np.float32)


class TabletopEnv(gym.Env):
    """Procedural tabletop scene with a movable camera and pushable objects.

    `action_mode="discrete"`: `Discrete(35)`, the vocabulary in `posttrain.envs3d.actions`.
    `action_mode="continuous"`: `Box(6)` camera deltas (forward, left, up [m]; yaw,
    pitch, roll [rad]) per step; pushes are discrete-only.
    `reset(seed=..., options={"scene": {key: value}})` builds the scene for that seed.
    The reward is always 0: rewards for world models live in `posttrain.rewards`.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(self, config: SceneConfig | None = None, action_mode: str = "discrete", render_mode: str | None = None, **overrides):
        self.config = (config or SceneConfig()).override(overrides) if overrides else (config or SceneConfig())
        if action_mode not in ("discrete", "continuous"):
            raise ValueError(f"action_mode={action_mode!r}; choose 'discrete' or 'continuous'")
        self.action_mode, self.render_mode = action_mode, render_mode
        self._make_spaces()
        self.scene: Scene | None = None
        self.rig: CameraRig | None = None
        self._last_obs: dict | None = None

    def _make_spaces(self) -> None:
        size = self.config.image_size
        self.action_space = (
            spaces.Discrete(NUM_ACTIONS) if self.action_mode == "discrete"
            else spaces.Box(-1.0, 1.0, shape=(6,), dtype=np.float32)
        )
        self.observation_space = spaces.Dict({
            "rgb": spaces.Box(0, 255, (size, size, 3), np.uint8),
            "depth": spaces.Box(0.0, np.inf, (size, size), np.float32),
            "segmentation": spaces.Box(0, MAX_OBJECTS, (size, size), np.int32),
            "intrinsics": spaces.Box(-np.inf, np.inf, (3, 3), np.float32),
            "world_to_camera": spaces.Box(-np.inf, np.inf, (4, 4), np.float32),
            "object_poses": spaces.Box(-np.inf, np.inf, (MAX_OBJECTS, 7), np.float32),
            "object_visible": spaces.MultiBinary(MAX_OBJECTS),
            "object_present": spaces.MultiBinary(MAX_OBJECTS),
        })

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "scene" in options:
            self.config = self.config.override(dict(options["scene"]))
            self._make_spaces()
            if self.scene is not None:
                self.scene.close()
                self.scene = None
        if self.scene is None:
            self.scene = Scene(self.config)
        rng = self.np_random
        self.scene.build(rng)
        cfg = self.config
        azimuth = float(rng.uniform(0, 2 * math.pi))
        origin = np.array([cfg.camera_distance * math.cos(azimuth), cfg.camera_distance * math.sin(azimuth), cfg.camera_height])
        yaw0 = azimuth + math.pi + float(rng.uniform(-0.15, 0.15))
        self.rig = CameraRig(
            origin=origin, yaw0=yaw0, pitch0=math.radians(cfg.camera_pitch_deg), move_step=cfg.move_step,
            turn_step=math.radians(cfg.turn_step_deg), bound=cfg.room_half_extent - 0.2,
        )
        self._last_obs = self._observe()
        return self._last_obs, {"num_objects": self.scene.num_objects, "object_types": list(self.scene.object_types),
                                "object_colors": self.scene.object_colors.copy()}

    def step(self, action):
        if self.scene is None or self.rig is None:
            raise RuntimeError("call reset() before step()")
        blocked = pushed = False
        if self.action_mode == "continuous" and not np.isscalar(action) and np.ndim(action) == 1:
            delta = np.asarray(action, dtype=np.float64)
            if delta.shape != (6,) or not np.all(np.isfinite(delta)):
                raise ValueError(f"continuous action must be 6 finite numbers, got {action!r}")
            self.rig.apply_continuous(delta)
        else:
            action = _as_action_id(action)
            push = decode_push(action)
            pushed = push is not None
            if pushed:
                if self.config.physics:
                    self.scene.push(*push)
                elif not 0 <= push[0] < self.scene.num_objects:
                    raise ValueError(f"object index {push[0]} out of range: this scene has {self.scene.num_objects} objects")
            else:
                blocked = not self.rig.apply(action)
        if self.config.physics and (pushed or self.scene.moving()):
            self.scene.step_physics()
        self._last_obs = self._observe()
        return self._last_obs, 0.0, False, False, {"blocked": blocked}

    def render(self):
        return None if self._last_obs is None else self._last_obs["rgb"]

    def close(self) -> None:
        if self.scene is not None:
            self.scene.close()
            self.scene = None

    def _observe(self) -> dict:
        world_to_camera = self.rig.world_to_camera()
        rgb, depth, segmentation = self.scene.render(world_to_camera)
        visible = np.zeros(MAX_OBJECTS, dtype=np.int8)
        present = np.unique(segmentation)
        visible[present[present > 0] - 1] = 1
        return {
            "rgb": rgb,
            "depth": depth,
            "segmentation": segmentation,
            "intrinsics": intrinsics(self.config.image_size, self.config.focal_length),
            "world_to_camera": world_to_camera,
            # Empty slots read as zeros here (a Box cannot hold NaN); `object_present` says which.
            "object_poses": np.nan_to_num(self.scene.object_poses()),
            "object_visible": visible,
            "object_present": (np.arange(MAX_OBJECTS) < self.scene.num_objects).astype(np.int8),
        }


def _as_action_id(action) -> int:
    try:
        value = int(action)
    except (TypeError, ValueError):
        raise ValueError(f"unknown action {action!r}: expected an integer id in [0, {NUM_ACTIONS})") from None
    if value != action or not 0 <= value < NUM_ACTIONS:
        raise ValueError(f"unknown action {action!r}: expected an integer id in [0, {NUM_ACTIONS})")
    return value
