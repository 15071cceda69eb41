"""Pinhole camera maths for envs3d. Convention: OpenCV (x right, y down, z forward).

`world_to_camera` maps homogeneous world points to camera coordinates; a point
(X, Y, Z) in camera coordinates projects to pixel coordinates u = fx*X/Z + cx,
v = fy*Y/Z + cy, where column j of the image covers u in [j, j+1) (the centre of
pixel (i, j) is (u, v) = (j + 0.5, i + 0.5)) and cx = W/2, cy = H/2.
PyBullet's view matrix is OpenGL-style (camera looks down -z, y up):
view_gl = diag(1, -1, -1, 1) @ world_to_camera.
"""

from __future__ import annotations

import math

import numpy as np

GL_FROM_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def camera_to_world(position: np.ndarray, yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """4x4 pose of a camera at `position` looking along heading `yaw` (radians, about world +z,
    0 = world +x) tilted by `pitch` (radians, negative looks down) and rolled by `roll`."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    forward = np.array([cp * cy, cp * sy, sp])
    right = np.array([sy, -cy, 0.0])
    down = np.cross(forward, right)
    if roll:
        cr, sr = math.cos(roll), math.sin(roll)
        right, down = cr * right + sr * down, -sr * right + cr * down
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, position
    return pose


def invert_pose(pose: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform."""
    inv = np.eye(4)
    inv[:3, :3] = pose[:3, :3].T
    inv[:3, 3] = -pose[:3, :3].T @ pose[:3, 3]
    return inv


def intrinsics(image_size: int, focal_length: float) -> np.ndarray:
    """3x3 K for a square image with the principal point at the image centre."""
    half = image_size / 2
    return np.array([[focal_length, 0, half], [0, focal_length, half], [0, 0, 1]], dtype=np.float32)


def gl_view_matrix(world_to_camera: np.ndarray) -> list[float]:
    """PyBullet's column-major 16-list view matrix for an OpenCV world_to_camera."""
    return (GL_FROM_CV @ world_to_camera).T.reshape(-1).tolist()


def linearize_depth(zbuffer: np.ndarray, near: float, far: float) -> np.ndarray:
    """Metric depth along the optical axis from PyBullet's [0, 1] z-buffer."""
    return (far * near / (far - (far - near) * zbuffer)).astype(np.float32)


def project(points_world: np.ndarray, world_to_camera: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(N, 3) world points -> (N, 3) array of (u, v, z) with z the camera-frame depth."""
    homog = np.concatenate([points_world, np.ones((len(points_world), 1))], axis=1)
    cam = (world_to_camera @ homog.T).T[:, :3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = K[0, 0] * cam[:, 0] / z + K[0, 2]
        v = K[1, 1] * cam[:, 1] / z + K[1, 2]
    return np.stack([u, v, z], axis=1)
