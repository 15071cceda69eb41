"""Episode generation speed vs the raw PyBullet render rate, measured in one run; writes JSON.

    python benchmarks/bench_envs3d.py --out benchmarks/results/envs3d_cpu.json

Raw limit: `getCameraImage` (RGB + depth + segmentation, ER_TINY_RENDERER) alone, timed on
the very scenes and camera poses that generation renders, nothing else. Generation: `iter_episodes` end to end (scene
building, physics, depth linearisation, segmentation mapping, action scripting), with
1 and 2 worker processes; writing to Arrow is measured separately on the same episodes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from posttrain.envs3d import SceneConfig, generate_dataset, generate_episode, iter_episodes


def raw_render_rate(size: int, episodes: int, frames: int) -> float:
    """`getCameraImage` alone on the same scenes and camera poses the generation run renders
    (scene content sets the render cost: meshes and more objects are slower)."""
    import pybullet

    from posttrain.envs3d import TabletopEnv
    from posttrain.envs3d.camera import gl_view_matrix

    config = SceneConfig(image_size=size)
    env = TabletopEnv(config)
    elapsed, count = 0.0, 0
    for seed in range(episodes):
        episode = generate_episode(seed, frames, config)
        env.reset(seed=seed)
        scene = env.scene
        views = [gl_view_matrix(w2c) for w2c in episode["world_to_camera"]]
        start = time.perf_counter()
        for view in views:
            scene.client.getCameraImage(size, size, view, scene._projection, renderer=pybullet.ER_TINY_RENDERER,
                                        shadow=0)
        elapsed += time.perf_counter() - start
        count += len(views)
    env.close()
    return count / elapsed


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
        raw = raw_render_rate(size, args.episodes, args.frames)
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
