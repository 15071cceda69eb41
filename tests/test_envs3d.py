"""envs3d checked against geometry worked out independently of its own arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium
import numpy as np
import pytest

from posttrain.envs3d import ENV_ID, SceneConfig, TabletopEnv, action_id, generate_episode, push_action
from posttrain.envs3d.actions import INVERSE, loop
from posttrain.envs3d.camera import camera_to_world, invert_pose
from posttrain.envs3d.scene import Scene

SMALL = SceneConfig(image_size=32)


def test_analytic_depth_camera_looking_straight_down():
    """A camera at height h looking straight down at the floor reads depth h at the image centre."""
    config = SceneConfig(image_size=64, walls=False, min_objects=1, max_objects=1)
    scene = Scene(config)
    scene.build(np.random.default_rng(0))
    for height in (0.4, 1.0, 2.5):
        # Objects stay within 1.3 m of the origin: look down at (2, -2), which is bare floor.
        pose = camera_to_world(np.array([2.0, -2.0, height]), yaw=0.3, pitch=-math.pi / 2)
        _, depth, segmentation = scene.render(invert_pose(pose))
        centre = depth[31:33, 31:33].mean()
        assert abs(centre - height) / height < 0.01, (height, centre)
        assert (segmentation == 0).all()
    scene.close()


def _warp(ep: dict, t: int, world_to_camera_next: np.ndarray) -> tuple[float, float]:
    """Warp frame t into the view `world_to_camera_next` using depth t, K and pose t.

    Returns (mean abs colour error vs frame t+1 over in-view pixels, fraction of those
    pixels whose predicted depth matches frame t+1's depth within 3%).
    """
    size = ep["frames"].shape[1]
    K = ep["intrinsics"].astype(np.float64)
    j, i = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    z = ep["depth"][t].astype(np.float64)
    cam = np.stack([(j - K[0, 2]) * z / K[0, 0], (i - K[1, 2]) * z / K[1, 1], z, np.ones_like(z)], -1).reshape(-1, 4)
    world = cam @ np.linalg.inv(ep["world_to_camera"][t].astype(np.float64)).T
    cam_next = world @ world_to_camera_next.astype(np.float64).T
    zn = cam_next[:, 2]
    u = K[0, 0] * cam_next[:, 0] / zn + K[0, 2]
    v = K[1, 1] * cam_next[:, 1] / zn + K[1, 2]
    cols, rows = np.floor(u).astype(int), np.floor(v).astype(int)
    inside = (zn > 0) & (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size) & (z.reshape(-1) < 15)
    assert inside.sum() > 0.3 * size * size, "too few pixels stay in view to judge"
    rows, cols, zn = rows[inside], cols[inside], zn[inside]
    depth_agrees = np.abs(ep["depth"][t + 1][rows, cols] - zn) < 0.03 * zn
    src = ep["frames"][t].reshape(-1, 3)[inside].astype(np.float64)
    dst = ep["frames"][t + 1][rows, cols].astype(np.float64)
    return float(np.abs(src - dst).mean()), float(depth_agrees.mean())


@pytest.mark.parametrize("move", ["forward", "left", "yaw_left", "pitch_down"])
def test_reprojection_with_true_pose_matches_and_wrong_pose_does_not(move):
    config = SceneConfig(image_size=64)
    ep = generate_episode(seed=3, frames=4, config=config, actions=[action_id(move)] * 3)
    right, right_depth = _warp(ep, 1, ep["world_to_camera"][2])
    wrong, wrong_depth = _warp(ep, 1, ep["world_to_camera"][3])  # one move more than happened
    assert right < 8.0, right  # of 255: only occlusion edges and texture sampling differ
    assert right_depth > 0.85, right_depth
    assert wrong > 2 * right and wrong_depth < right_depth, (right, wrong, right_depth, wrong_depth)


def test_camera_only_loop_returns_byte_identical_frame():
    rng = np.random.default_rng(7)
    actions = loop(rng, 14)
    assert all(INVERSE[int(a)] == int(b) for a, b in zip(actions[:7], actions[::-1][:7]))
    ep = generate_episode(seed=11, frames=15, config=SMALL, actions=actions)
    assert not np.array_equal(ep["frames"][0], ep["frames"][7]), "the loop should move the camera"
    assert np.array_equal(ep["frames"][0], ep["frames"][-1])
    assert np.array_equal(ep["world_to_camera"][0], ep["world_to_camera"][-1])
    assert ep["is_loop"]


def test_scripted_loop_policy_is_an_exact_loop():
    for seed in range(6):
        ep = generate_episode(seed=seed, frames=9, config=SceneConfig(image_size=32, policy="loop"))
        assert ep["is_loop"] and np.array_equal(ep["frames"][0], ep["frames"][-1]), seed


def test_observation_ground_truth_shapes_and_conventions():
    ep = generate_episode(seed=0, frames=5, config=SMALL)
    assert ep["frames"].shape == (5, 32, 32, 3) and ep["frames"].dtype == np.uint8
    assert ep["depth"].shape == (5, 32, 32) and ep["depth"].dtype == np.float32
    assert ep["segmentation"].dtype == np.int32 and ep["segmentation"].max() <= ep["num_objects"]
    assert ep["actions"].shape == (4,)
    K = ep["intrinsics"]
    assert K[0, 2] == 16 and K[1, 2] == 16 and K[0, 0] == pytest.approx(16 / math.tan(math.radians(35)), rel=1e-5)
    for t in range(5):
        for index in range(ep["num_objects"]):
            assert bool((ep["segmentation"][t] == index + 1).any()) == bool(ep["object_visible"][t, index])
    assert np.isnan(ep["object_positions"][:, ep["num_objects"]:]).all()


def test_object_centres_project_onto_their_segmentation():
    """Object centres, projected with the episode's own K and world_to_camera (u = fx X/Z + cx,
    pixel (i, j) covering u in [j, j+1), v in [i, i+1)), land on that object's segmentation pixels,
    unless something nearer covers that pixel (its depth is smaller than the centre's z).
    Convex shapes only: a mesh's origin need not lie inside its surface."""
    config = SceneConfig(image_size=64, object_types=("box", "sphere", "cylinder", "capsule"), policy="random_walk")
    checked = hits = 0
    for seed in range(4):
        ep = generate_episode(seed=seed, frames=5, config=config)
        K = ep["intrinsics"].astype(np.float64)
        for t in range(5):
            for index in range(ep["num_objects"]):
                centre = np.append(ep["object_positions"][t, index].astype(np.float64), 1.0)
                x, y, z = (ep["world_to_camera"][t].astype(np.float64) @ centre)[:3]
                u, v = K[0, 0] * x / z + K[0, 2], K[1, 1] * y / z + K[1, 2]
                if z <= 0 or not (0 <= u < 64 and 0 <= v < 64):
                    continue
                row, col = int(v), int(u)
                checked += 1
                if ep["segmentation"][t, row, col] == index + 1:
                    hits += 1
                    assert ep["object_visible"][t, index]
                else:  # occluded: the pixel shows something in front of the centre
                    assert ep["depth"][t, row, col] < z - 0.05, (seed, t, index, ep["depth"][t, row, col], z)
    assert checked >= 40 and hits >= 0.8 * checked, (checked, hits)  # measured: 53 checked, 48 hits


def test_push_moves_the_object_and_camera_stays():
    env = TabletopEnv(SMALL)
    obs, info = env.reset(seed=4)
    before = obs["object_poses"][0, :3].copy()
    obs, reward, terminated, truncated, _ = env.step(push_action(0, 0))
    for _ in range(3):
        obs, *_ = env.step(0)
    assert obs["object_poses"][0, 0] > before[0] + 0.05  # pushed along +x
    assert (reward, terminated, truncated) == (0.0, False, False)
    env.close()


def test_gymnasium_registration_and_continuous_actions():
    env = gymnasium.make(ENV_ID, image_size=32, action_mode="continuous")
    obs, _ = env.reset(seed=1)
    pose0 = obs["world_to_camera"].copy()
    obs, *_ = env.step(np.array([0.2, 0.0, 0.0, 0.1, 0.0, 0.0], np.float32))
    assert not np.allclose(pose0, obs["world_to_camera"])
    assert env.observation_space.contains(obs)
    env.close()


def test_same_seed_same_episode_and_different_seeds_differ():
    a = generate_episode(seed=5, frames=6, config=SMALL)
    b = generate_episode(seed=5, frames=6, config=SMALL)
    c = generate_episode(seed=6, frames=6, config=SMALL)
    for key in ("frames", "depth", "segmentation", "world_to_camera", "actions"):
        assert np.array_equal(a[key], b[key]), key
    assert not np.array_equal(a["frames"], c["frames"])


def test_dataset_identical_across_worker_counts(tmp_path):
    from datasets import load_from_disk

    from posttrain.envs3d import generate_dataset

    one = generate_dataset([0, 1, 2, 3], 4, tmp_path / "one", SMALL, workers=1, progress=False)
    two = generate_dataset([0, 1, 2, 3], 4, tmp_path / "two", SMALL, workers=2, progress=False)
    for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    ds = load_from_disk(str(one)).with_format("numpy")
    row = ds[2]
    assert row["frames"].shape == (4, 32, 32, 3) and row["seed"] == 2
    assert np.array_equal(row["frames"], generate_episode(2, 4, SMALL)["frames"])
    assert not list(tmp_path.glob(".*partial*")), "staging folders must be cleaned up"


# --- the episode cache (data.cache_dir) ------------------------------------------------------

def _cache_config(cache):
    from posttrain.data import EpisodeDataConfig

    return EpisodeDataConfig(seeds="0:2", frames=3, image_size=32, workers=1, scene={"max_objects": 2},
                             cache_dir=str(cache))


def test_episode_cache_regenerates_a_cut_short_or_outdated_entry(tmp_path, capsys):
    import shutil

    from datasets import load_from_disk

    from posttrain.data import dataset_path, load_episodes
    from posttrain.envs3d.jobs import OUTPUT_MARKER

    config = _cache_config(tmp_path / "cache")
    path = dataset_path(config, progress=False)
    good = load_episodes(config, progress=False)["frames"]
    arrow = next(path.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])  # a copy cut short: was an OSError traceback
    assert np.array_equal(load_episodes(config, progress=False)["frames"], good)
    # An entry of an older version (a column less) was a dead end: "lacks columns" on every run.
    load_from_disk(str(path)).remove_columns("object_colors").save_to_disk(str(tmp_path / "old"))
    shutil.rmtree(path)
    (tmp_path / "old").rename(path)
    (path / OUTPUT_MARKER).write_text("{}")
    assert np.array_equal(load_episodes(config, progress=False)["object_colors"],
                          np.stack([generate_episode(s, 3, config.scene_config())["object_colors"] for s in (0, 1)]))
    assert "generating it again" in capsys.readouterr().out
    assert not list(path.parent.glob(".*partial*")), "the discarded entry is gone"
    # A broken folder posttrain did not write is never deleted: an error naming it.
    (path / OUTPUT_MARKER).unlink()
    next(path.glob("*.arrow")).write_bytes(b"")
    with pytest.raises(FileExistsError, match=f"{path}.*{OUTPUT_MARKER}"):
        load_episodes(config, progress=False)
    assert (path / "dataset_info.json").is_file()


def test_episode_cache_keeps_the_copy_another_process_landed_first(tmp_path, monkeypatch):
    import shutil

    from posttrain.data import dataset_path, load_episodes
    from posttrain.envs3d import generate as generate_module

    config = _cache_config(tmp_path / "cache")
    path = dataset_path(config, progress=False)
    expected = load_episodes(config, progress=False)["frames"]
    shutil.copytree(path, tmp_path / "theirs")
    shutil.rmtree(path)
    (tmp_path / "theirs" / "sentinel").write_text("another process's copy")
    mark = generate_module.write_output_marker

    def land_theirs_first(folder, command):  # a run's other rank (or a second run) finishes a moment before us
        mark(folder, command)
        (tmp_path / "theirs").rename(path)

    monkeypatch.setattr(generate_module, "write_output_marker", land_theirs_first)
    assert dataset_path(config, progress=False) == path
    assert (path / "sentinel").is_file(), "a folder another process may be reading was deleted and replaced"
    assert np.array_equal(load_episodes(config, progress=False)["frames"], expected)
    assert not list(path.parent.glob(".*partial*"))


# --- bad inputs -----------------------------------------------------------------------------

def test_unknown_action_and_object_index_errors():
    env = TabletopEnv(SceneConfig(image_size=32, min_objects=1, max_objects=1))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="unknown action 99"):
        env.step(99)
    with pytest.raises(ValueError, match="unknown action 'jump'"):
        env.step("jump")
    with pytest.raises(ValueError, match="object index 4 out of range"):
        env.step(push_action(4, 0))
    with pytest.raises(ValueError, match="object index 7 out of range"):
        push_action(7, 0)
    with pytest.raises(ValueError, match="unknown action 'fly'"):
        action_id("fly")
    env.close()


@pytest.mark.parametrize("size", [0, 4, 100000])
def test_bad_sizes(size):
    with pytest.raises(ValueError, match=f"image_size={size}"):
        SceneConfig(image_size=size)


def test_scene_override_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown scene key 'wals'; did you mean 'walls'"):
        SceneConfig().override(["wals=false"])
    with pytest.raises(ValueError, match="cannot parse 'many'"):
        SceneConfig().override(["max_objects=many"])
    assert SceneConfig().override(["walls=false", "fov_deg=60"]).walls is False
    # Values from a recipe (YAML) arrive typed: a wrong type is refused, an int where a float goes is a float.
    with pytest.raises(ValueError, match="scene key 'min_objects' must be int, got 2.5"):
        SceneConfig().override({"min_objects": 2.5})
    with pytest.raises(ValueError, match="scene key 'object_types' must be a list of names"):
        SceneConfig().override({"object_types": [1, 2]})
    config = SceneConfig().override({"checker_size": 1, "object_types": ["duck"]})
    assert config.checker_size == 1.0 and isinstance(config.checker_size, float) and config.object_types == ("duck",)


def test_cli_bad_inputs(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["scenes", "generate", "--seeds", "5:2", "--out", str(tmp_path / "x")]) == 2
    assert "bad seed range '5:2'" in capsys.readouterr().err
    assert main(["scenes", "generate", "--seeds", "7:4000000007", "--out", str(tmp_path / "x")]) == 2
    assert "bad seed range '7:4000000007'" in capsys.readouterr().err
    assert main(["scenes", "generate", "--seeds", "0:2", "--size", "0", "--out", str(tmp_path / "x")]) == 2
    assert "image_size=0" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["scenes", "generate", "--seeds", "0:2", "--out", str(blocker / "out"), "--quiet"]) == 2
    assert str(blocker / "out") in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert main(["scenes", "generate", "--seeds", "0:2", "--out", str(tmp_path / "exists"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_failing_episode_names_its_seed_and_leaves_no_dataset(tmp_path):
    from posttrain.envs3d import generate_dataset
    from posttrain.envs3d.generate import EpisodeError

    # Six objects cannot fit in a 0.9 m room: every episode fails while placing objects.
    crowded = SceneConfig(image_size=32, min_objects=6, max_objects=6, room_half_extent=0.45)
    with pytest.raises(EpisodeError, match="episode seed 3 failed"):
        generate_dataset([3, 4], 3, tmp_path / "out", crowded, workers=2, progress=False)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_import_kernels_is_not_ours(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import posttrain.kernels

    ours = Path(posttrain.kernels.__file__).resolve().parent
    probe = "import kernels, sys; print(kernels.__file__)"
    # Run outside the checkout: there, the current folder's `kernels/` would be on sys.path.
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    if result.returncode == 0:  # Hugging Face's `kernels` is installed: it must be theirs
        assert Path(result.stdout.strip()).resolve().parent != ours
    else:
        assert "No module named 'kernels'" in result.stderr


def test_close_removes_the_texture_folder():
    """Scene writes its checker textures to a temporary folder; closing the env removes it."""
    import os

    env = TabletopEnv(SMALL)
    env.reset(seed=0)
    folder = env.scene._texture_dir
    assert os.listdir(folder)
    env.close()
    assert not os.path.exists(folder)


def test_a_scene_nobody_closed_leaves_no_texture_folder():
    import gc

    from posttrain.envs3d.config import SceneConfig
    from posttrain.envs3d.scene import Scene

    scene = Scene(SceneConfig(image_size=32))
    folder = Path(scene._texture_dir)
    assert folder.is_dir()
    del scene
    gc.collect()
    assert not folder.exists()
    closed = Scene(SceneConfig(image_size=32))
    folder = Path(closed._texture_dir)
    closed.close()
    closed.close()  # twice is fine
    assert not folder.exists()
