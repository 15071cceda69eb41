"""PyBullet scene building and rendering for envs3d (DIRECT mode, ER_TINY_RENDERER, CPU only).

A `Scene` owns one PyBullet client. `build(rng)` lays out a procedural room: a
checker floor, optional walls and 1-6 objects of distinct colours resting on the
floor; `render(world_to_camera)` returns RGB, metric depth and object-indexed
segmentation (0 = floor/walls/sky, 1..N = objects).
"""

from __future__ import annotations

import colorsys
import contextlib
import os
import shutil
import sys
import tempfile
import weakref

import numpy as np
import pybullet_data

from .camera import gl_view_matrix, linearize_depth
from .config import MAX_OBJECTS, SceneConfig


@contextlib.contextmanager
def _c_output_silenced():
    """Send the process's stdout and stderr (fds 1 and 2) to /dev/null while PyBullet's C code runs.

    PyBullet prints "pybullet build time: ..." to stderr on import and "argv[0]=" to stdout on
    connect, from C, so redirecting sys.stdout would not catch them: every command showed both.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        # C stdio is block-buffered on a pipe: flush it into /dev/null before the real fds come back.
        with contextlib.suppress(OSError, AttributeError, TypeError):
            import ctypes

            ctypes.CDLL(None).fflush(None)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


with _c_output_silenced():
    import pybullet
    from pybullet_utils import bullet_client

_PLANE_OBJ = os.path.join(pybullet_data.getDataPath(), "plane.obj")  # 30 m quad, UVs tiled 15x
_MESHES = {"duck": ("duck.obj", 0.8), "teddy": ("teddy2_VHACD_CHs.obj", 0.9)}
_CHECKER_SQUARES = 4  # squares per texture repeat; one repeat spans 2 * mesh_scale metres
_PUSH_DIRECTIONS = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])


def object_palette(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` saturated colours with hues spread around the wheel (so objects are told apart)."""
    offset = rng.random()
    hues = (offset + np.arange(count) / count + rng.uniform(-0.03, 0.03, count)) % 1.0
    order = rng.permutation(count)
    return np.array([colorsys.hsv_to_rgb(hues[i], rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0)) for i in order])


class Scene:
    """One PyBullet world: build a procedural room, render it, push its objects."""

    def __init__(self, config: SceneConfig):
        self.config = config
        with _c_output_silenced():
            self.client = bullet_client.BulletClient(connection_mode=pybullet.DIRECT)
        self._texture_dir = tempfile.mkdtemp(prefix="envs3d-tex-")
        # Removed by close(), or when the scene is collected or the interpreter exits without one (an env
        # nobody closed left one folder per process in TMPDIR); only a SIGKILL still leaves it.
        self._remove_textures = weakref.finalize(self, shutil.rmtree, self._texture_dir, True)
        self._textures: dict[tuple, int] = {}
        self.body_ids: list[int] = []
        self.object_types: list[str] = []
        self.object_colors = np.zeros((MAX_OBJECTS, 3), dtype=np.uint8)
        self._seg_lut = np.zeros(1, dtype=np.int32)
        size = config.image_size
        self._projection = self.client.computeProjectionMatrixFOV(config.fov_deg, 1.0, config.near, config.far)
        self._shape = (size, size)

    def close(self) -> None:
        try:
            self.client.disconnect()
        except pybullet.error:
            pass
        # The checker PNGs are read once by loadTexture; the folder would otherwise outlive the process.
        self._remove_textures()

    # --- building ------------------------------------------------------------------------
    def build(self, rng: np.random.Generator) -> None:
        cfg, pb = self.config, self.client
        pb.resetSimulation()
        self._textures.clear()  # resetSimulation drops textures
        pb.setGravity(0, 0, -9.81)
        pb.setPhysicsEngineParameter(deterministicOverlappingPairs=1)
        self._build_floor(rng)
        if cfg.walls:
            self._build_walls(rng)
        count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        colors = object_palette(rng, count)
        self.body_ids, self.object_types = [], []
        self.object_colors[:] = 0
        placed: list[tuple[float, float, float]] = []
        for index in range(count):
            kind = str(rng.choice(cfg.object_types))
            radius = float(rng.uniform(0.09, 0.2))
            x, y = self._free_spot(rng, radius, placed)
            placed.append((x, y, radius))
            body = self._add_object(kind, radius, (x, y), float(rng.uniform(0, 2 * np.pi)), colors[index], rng)
            self.body_ids.append(body)
            self.object_types.append(kind)
            self.object_colors[index] = np.round(colors[index] * 255).astype(np.uint8)
        # Segmentation comes back as body ids (-1 = sky); map them to 0 / 1..N in one lookup.
        top = max(self.body_ids) + 2
        self._seg_lut = np.zeros(top, dtype=np.int32)
        for index, body in enumerate(self.body_ids):
            self._seg_lut[body + 1] = index + 1
        # Let resting contacts settle so the first pushes start from rest.
        if cfg.physics:
            for _ in range(30):
                pb.stepSimulation()

    def _texture(self, dark: tuple, light: tuple) -> int:
        key = (dark, light)
        if key not in self._textures:
            from PIL import Image

            cells = (np.indices((_CHECKER_SQUARES, _CHECKER_SQUARES)).sum(0) % 2).astype(bool)
            image = np.where(cells[..., None], np.array(light, np.uint8), np.array(dark, np.uint8))
            image = np.kron(image, np.ones((16, 16, 1), np.uint8))
            path = os.path.join(self._texture_dir, f"checker_{len(os.listdir(self._texture_dir))}.png")
            Image.fromarray(image).save(path)
            self._textures[key] = self.client.loadTexture(path)
        return self._textures[key]

    def _build_floor(self, rng: np.random.Generator) -> None:
        pb = self.client
        hue = rng.random()
        dark = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.1, 0.35), rng.uniform(0.25, 0.4)))
        light = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.05, 0.25), rng.uniform(0.7, 0.85)))
        scale = self.config.checker_size * _CHECKER_SQUARES / 2
        visual = pb.createVisualShape(pybullet.GEOM_MESH, fileName=_PLANE_OBJ, meshScale=[scale, scale, 1])
        floor = pb.createMultiBody(0, pb.createCollisionShape(pybullet.GEOM_PLANE), visual)
        pb.changeVisualShape(floor, -1, textureUniqueId=self._texture(dark, light))

    def _build_walls(self, rng: np.random.Generator) -> None:
        pb, half = self.client, self.config.room_half_extent
        height, thick = 1.2, 0.05
        for axis, sign in ((0, 1), (0, -1), (1, 1), (1, -1)):
            extents = [thick, half, height / 2] if axis == 0 else [half, thick, height / 2]
            position = [0.0, 0.0, height / 2]
            position[axis] = sign * (half + thick)
            color = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.15, 0.45), rng.uniform(0.45, 0.8))
            visual = pb.createVisualShape(pybullet.GEOM_BOX, halfExtents=extents, rgbaColor=[*color, 1])
            collision = pb.createCollisionShape(pybullet.GEOM_BOX, halfExtents=extents)
            pb.createMultiBody(0, collision, visual, basePosition=position)

    def _free_spot(self, rng, radius, placed) -> tuple[float, float]:
        limit = min(1.0, self.config.room_half_extent - 0.3)
        for _ in range(200):
            x, y = rng.uniform(-limit, limit, size=2)
            if all((x - px) ** 2 + (y - py) ** 2 > (radius + pr + 0.05) ** 2 for px, py, pr in placed):
                return float(x), float(y)
        raise RuntimeError("could not place objects without overlap; lower max_objects or enlarge the room")

    def _add_object(self, kind, radius, xy, yaw, color, rng) -> int:
        pb = self.client
        rgba = [*color, 1.0]
        if kind == "box":
            half = [radius * rng.uniform(0.6, 1.0), radius * rng.uniform(0.6, 1.0), radius * rng.uniform(0.6, 1.2)]
            col = pb.createCollisionShape(pybullet.GEOM_BOX, halfExtents=half)
            vis = pb.createVisualShape(pybullet.GEOM_BOX, halfExtents=half, rgbaColor=rgba)
            z = half[2]
        elif kind == "sphere":
            col = pb.createCollisionShape(pybullet.GEOM_SPHERE, radius=radius)
            vis = pb.createVisualShape(pybullet.GEOM_SPHERE, radius=radius, rgbaColor=rgba)
            z = radius
        elif kind in ("cylinder", "capsule"):
            shape = pybullet.GEOM_CYLINDER if kind == "cylinder" else pybullet.GEOM_CAPSULE
            length = radius * rng.uniform(1.0, 2.5)
            # PyBullet takes `height` for collision shapes but `length` for visual shapes.
            col = pb.createCollisionShape(shape, radius=radius * 0.7, height=length)
            vis = pb.createVisualShape(shape, radius=radius * 0.7, length=length, rgbaColor=rgba)
            z = length / 2 + (radius * 0.7 if kind == "capsule" else 0.0)
        else:
            mesh, base = _MESHES[kind]
            scale = [base * radius] * 3
            path = os.path.join(pybullet_data.getDataPath(), mesh)
            vis = pb.createVisualShape(pybullet.GEOM_MESH, fileName=path, meshScale=scale, rgbaColor=rgba)
            col = pb.createCollisionShape(pybullet.GEOM_SPHERE, radius=radius * 0.8)
            z = radius * 0.8
        orientation = pb.getQuaternionFromEuler([0, 0, yaw])
        body = pb.createMultiBody(0.5, col, vis, basePosition=[xy[0], xy[1], z], baseOrientation=orientation)
        pb.changeDynamics(body, -1, lateralFriction=0.6, rollingFriction=0.01, spinningFriction=0.01)
        return body

    # --- state and physics -----------------------------------------------------------------
    @property
    def num_objects(self) -> int:
        return len(self.body_ids)

    def object_poses(self) -> np.ndarray:
        """(MAX_OBJECTS, 7) world position + xyzw quaternion of each object; NaN rows for empty slots."""
        poses = np.full((MAX_OBJECTS, 7), np.nan, dtype=np.float32)
        for index, body in enumerate(self.body_ids):
            position, orientation = self.client.getBasePositionAndOrientation(body)
            poses[index, :3], poses[index, 3:] = position, orientation
        return poses

    def push(self, object_index: int, direction: int) -> None:
        if not 0 <= object_index < self.num_objects:
            raise ValueError(f"object index {object_index} out of range: this scene has {self.num_objects} objects")
        velocity = _PUSH_DIRECTIONS[direction] * self.config.push_speed
        self.client.resetBaseVelocity(self.body_ids[object_index], linearVelocity=[*velocity, 0.0])

    def moving(self, threshold: float = 1e-3) -> bool:
        for body in self.body_ids:
            linear, angular = self.client.getBaseVelocity(body)
            if max(map(abs, linear)) > threshold or max(map(abs, angular)) > threshold * 10:
                return True
        return False

    def step_physics(self) -> None:
        for _ in range(self.config.physics_substeps):
            self.client.stepSimulation()

    # --- rendering -------------------------------------------------------------------------
    def render(self, world_to_camera: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """RGB uint8 (H, W, 3), metric depth float32 (H, W), segmentation int32 (H, W)."""
        size = self.config.image_size
        _, _, rgba, zbuffer, seg = self.client.getCameraImage(
            size, size, gl_view_matrix(world_to_camera), self._projection,
            renderer=pybullet.ER_TINY_RENDERER, shadow=0,
        )
        rgb = np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[..., :3].copy()
        depth = linearize_depth(np.asarray(zbuffer, dtype=np.float32).reshape(self._shape), self.config.near, self.config.far)
        body = np.asarray(seg, dtype=np.int32).reshape(self._shape)
        segmentation = self._seg_lut[np.clip(body + 1, 0, len(self._seg_lut) - 1)]
        return rgb, depth, segmentation
