"""Episode generation speed vs the raw PyBullet render rate, measured in one run; writes JSON.

    python benchmarks/bench_envs3d.py --out benchmarks/results/envs3d_cpu.json

Raw limit: `getCameraImage` (RGB + depth + segmentation, ER_TINY_RENDERER) on a built
scene with a moving camera, nothing else. Generation: `iter_episodes` end to end (scene
building, physics, depth linearisation, segmentation mapping, action scripting), with
1 and 2 worker processes; writing to Arrow is measured separately on the same episodes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time

import numpy as np

from posttrain.envs3d import SceneConfig, generate_dataset, iter_episodes
from posttrain.envs3d.camera import camera_to_world, gl_view_matrix, invert_pose
from posttrain.envs3d.scene import Scene


def raw_render_rate(size: int, frames: int) -> float:
    import pybullet

    scene = Scene(SceneConfig(image_size=size))
    scene.build(np.random.default_rng(0))
    views = [gl_view_matrix(invert_pose(camera_to_world(np.array([1.6 * math.cos(a), 1.6 * math.sin(a), 0.55]),
                                                        a + math.pi, -0.38))) for a in np.linspace(0, 6.28, frames)]
    start = time.perf_counter()
    for view in views:
        scene.client.getCameraImage(size, size, view, scene._projection, renderer=pybullet.ER_TINY_RENDERER, shadow=0)
    rate = frames / (time.perf_counter() - start)
    scene.close()
    return rate


def generation_rate(size: int, episodes: int, frames: int, workers: int) -> float:
    config = SceneConfig(image_size=size)
    list(iter_episodes([10_000], 2, config, 1))  # warm caches (mesh files) outside the timing
    start = time.perf_counter()
    count = sum(len(ep["frames"]) for ep in iter_episodes(range(episodes), frames, config, workers))
    return count / (time.perf_counter() - start)


def write_rate(size: int, episodes: int, frames: int) -> float:
    config = SceneConfig(image_size=size)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_dataset(list(range(episodes)), frames, os.path.join(tmp, "ds"), config, workers=1, progress=False)
        return episodes * frames / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/envs3d_cpu.json")
    parser.add_argument("--episodes", type=int, default=48)
    parser.add_argument("--frames", type=int, default=16)
    args = parser.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "frames_per_episode": args.frames,
               "episodes": args.episodes, "sizes": {}}
    for size in (64, 128):
        raw = raw_render_rate(size, 400)
        one = generation_rate(size, args.episodes, args.frames, 1)
        two = generation_rate(size, args.episodes, args.frames, 2)
        written = write_rate(size, args.episodes, args.frames)
        results["sizes"][str(size)] = {
            "raw_render_fps_1proc": round(raw, 1),
            "generate_fps_1worker": round(one, 1),
            "generate_fps_2workers": round(two, 1),
            "generate_and_write_fps_1worker": round(written, 1),
            "generate_vs_raw_1worker": round(one / raw, 3),
            "scaling_1_to_2_workers": round(two / one, 3),
        }
        print(size, results["sizes"][str(size)], flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
