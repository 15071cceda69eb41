"""Typed scene configuration for envs3d; every field can be overridden (`--scene key=value`)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

MAX_OBJECTS = 6
"""Object slots per scene; per-object arrays are padded to this length so episodes batch."""


@dataclass(frozen=True)
class SceneConfig:
    """What a procedurally generated tabletop scene looks like and how the camera moves."""

    image_size: int = 64
    """Width and height of rendered frames in pixels (square images)."""
    fov_deg: float = 70.0
    """Vertical (= horizontal) field of view of the pinhole camera, degrees."""
    near: float = 0.05
    """Near clipping plane, metres."""
    far: float = 20.0
    """Far clipping plane, metres."""
    min_objects: int = 1
    """Fewest objects in a scene."""
    max_objects: int = 6
    """Most objects in a scene (at most MAX_OBJECTS)."""
    object_types: tuple[str, ...] = ("box", "sphere", "cylinder", "capsule", "duck", "teddy")
    """Shapes to draw objects from; duck and teddy are pybullet_data meshes."""
    walls: bool = True
    """Put coloured walls around the floor (gives far structure for parallax)."""
    room_half_extent: float = 2.5
    """Half the side of the square room, metres."""
    checker_size: float = 0.25
    """Side of a floor checker square, metres."""
    physics: bool = True
    """Step PyBullet physics on push actions (False: pushes teleport nothing and are no-ops)."""
    physics_substeps: int = 24
    """Physics steps (at 240 Hz) per environment step while objects move."""
    move_step: float = 0.15
    """Camera translation per discrete move action, metres."""
    turn_step_deg: float = 10.0
    """Camera rotation per discrete yaw/pitch action, degrees."""
    push_speed: float = 1.2
    """Initial speed given to a pushed object, metres per second."""
    camera_height: float = 0.55
    """Initial camera height above the floor, metres."""
    camera_distance: float = 1.6
    """Initial horizontal distance of the camera from the scene centre, metres."""
    camera_pitch_deg: float = -22.0
    """Initial camera pitch, degrees (negative looks down)."""
    policy: str = "mixed"
    """Scripted action sequence for generated episodes: random_walk, orbit, loop, push or mixed."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            _check_type(self, item.name, item.default)
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"scene key {item.name!r} must be finite, got {value!r}")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size={self.image_size} is outside [8, 1024]")
        if not 1.0 <= self.fov_deg <= 170.0:
            raise ValueError(f"fov_deg={self.fov_deg} is outside [1, 170]")
        if not 0 < self.near < self.far:
            raise ValueError(f"need 0 < near < far, got near={self.near}, far={self.far}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        unknown = set(self.object_types) - {"box", "sphere", "cylinder", "capsule", "duck", "teddy"}
        if unknown or not self.object_types:
            raise ValueError(f"object_types has unknown or no shapes: {sorted(unknown) or '()'}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}; choose one of {POLICIES}")
        if self.physics_substeps < 1 or self.move_step <= 0 or self.turn_step_deg <= 0:
            raise ValueError("physics_substeps, move_step and turn_step_deg must be positive")
        if self.room_half_extent <= 0 or self.checker_size <= 0 or self.push_speed < 0 or self.camera_height <= 0:
            raise ValueError("room_half_extent, checker_size and camera_height must be positive, push_speed >= 0")

    @property
    def focal_length(self) -> float:
        """Focal length in pixels for the square image."""
        return 0.5 * self.image_size / math.tan(math.radians(self.fov_deg) / 2)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SceneConfig:
        data = json.loads(text)
        data["object_types"] = tuple(data["object_types"])
        return cls(**data)

    def override(self, pairs: list[str] | dict[str, object]) -> SceneConfig:
        """Return a copy with `key=value` strings (or a dict) applied, values parsed by field type."""
        items = dict(p.split("=", 1) if "=" in p else (p, None) for p in pairs) if isinstance(pairs, list) else pairs
        names = {f.name: f for f in dataclasses.fields(self)}
        updates: dict[str, object] = {}
        for key, raw in items.items():
            if key not in names:
                import difflib

                near = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown scene key {key!r}{hint}")
            if raw is None:
                raise ValueError(f"scene override {key!r} needs a value: {key}=VALUE")
            updates[key] = _parse(raw, getattr(self, key), key)
        return dataclasses.replace(self, **updates)


POLICIES = ("random_walk", "orbit", "loop", "push", "mixed")


def _check_type(config: SceneConfig, key: str, default: object) -> None:
    """Refuse a value of the wrong type (`min_objects: 2.5` or `walls: 3` in a recipe would otherwise pass);
    an int where a float is expected and a list of names where a tuple is are stored as float and tuple."""
    value = getattr(config, key)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            object.__setattr__(config, key, float(value))
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        if ok:
            object.__setattr__(config, key, tuple(value))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kind = "a list of names" if isinstance(default, tuple) else type(default).__name__
        raise ValueError(f"scene key {key!r} must be {kind}, got {value!r}")


def _parse(raw: object, current: object, key: str) -> object:
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(current, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, tuple):
            return tuple(s.strip() for s in raw.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"scene key {key!r}: cannot parse {raw!r} as {type(current).__name__}") from None
    return raw


