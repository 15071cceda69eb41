"""Bad inputs end in one line that names the thing, exit code 2, no traceback, before any work.

Each case runs the real CLI entry point (`posttrain.cli.main`) in-process; a case that raised
instead of returning 2 would fail the test with its traceback. "Before any work" is checked by
what is absent afterwards: no episodes generated in the case's cache folder, no run folder.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import tiny_grpo_overrides, write_footage

from posttrain.cli import main

GRPO = "recipes/grpo_tabletop.yaml"
SFT = "recipes/sft_tabletop.yaml"


def _truncated_model(tiny_model_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _empty_footage(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "empty-footage"
    Dataset.from_dict({"frames": [], "actions": []}).save_to_disk(str(folder))
    return folder


def _recipe_with_a_duplicate_key(tmp_path):
    """A second `train:` section (PyYAML would keep only it, silently dropping lr). The unknown key after it
    makes a loader that accepts the duplicate fail at once instead of training."""
    path = tmp_path / "dup.yaml"
    path.write_text("method: sft\ntrain: {lr: 0.5}\nsteps: 3\ntrain:\n  micro_batch_size: 4\nnot_a_key: 1\n")
    return path


def _latin1_recipe(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("method: grpo\nout: runs/caf\u00e9\n".encode("latin-1"))
    return path


def _eval(model, cache, *extra):
    return ["eval", "--model", str(model), "--seeds", "0:2", "--size", "32", "--cache-dir", str(cache),
            "--json", str(cache.parent / "e.json"), *extra]


def _footage(tmp_path, frames: int = 6, size: int = 32, clips: int = 3):
    import numpy as np

    return write_footage(tmp_path / "footage", [np.zeros((frames, size, size, 3), np.uint8)] * clips)


def _videos_folder(tmp_path):
    """A folder of videos, not yet ingested (a user's likely mistake)."""
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "take1.mp4").write_bytes(b"not decoded")
    return folder


def _envs3d_like(tmp_path):
    """A dataset with envs3d's simulator columns (frames, actions, segmentation, seed): not footage."""
    import numpy as np
    from datasets import Dataset

    folder = tmp_path / "envs3d"
    Dataset.from_dict({"frames": [np.zeros((6, 32, 32, 3), np.uint8)], "actions": [[0] * 5],
                       "segmentation": [np.zeros((6, 32, 32), np.int32)], "seed": [0]}).save_to_disk(str(folder))
    return folder


def _eval_footage(model, tmp_path, data, *extra):
    return ["eval", "--model", str(model), "--data", str(data), "--size", "32", "--horizon", "4",
            "--json", str(tmp_path / "e.json"), *extra]


def _grpo(model, cache, out, *extra):
    return ["run", GRPO, *tiny_grpo_overrides(model, cache, out, extra=list(extra))]


# (case id, argv builder (model, cache, out, tmp_path) -> argv, words the one-line message must name)
CASES = [
    ("truncated-weights", lambda m, c, o, t: _eval(_truncated_model(m, t), c), ["model.safetensors"]),
    ("eval-horizon-0", lambda m, c, o, t: _eval(m, c, "--horizon", "0"), ["--horizon"]),
    ("eval-context-0", lambda m, c, o, t: _eval(m, c, "--context", "0"), ["--context"]),
    ("eval-batch-size-0", lambda m, c, o, t: _eval(m, c, "--batch-size", "0"), ["--batch-size"]),
    ("eval-size-mismatch", lambda m, c, o, t: _eval(m, c)[:-2] + ["--size", "64", "--json", str(t / "e.json")],
     ["--size 64", "32x32"]),
    ("eval-json-is-a-folder", lambda m, c, o, t: _eval(m, c)[:-1] + [str(t)], ["--json", "folder"]),
    ("eval-huge-seed", lambda m, c, o, t: ["eval", "--model", str(m), "--seeds", "99999999999999999999",
                                           "--json", str(t / "e.json")], ["99999999999999999999"]),
    ("eval-scene-inf", lambda m, c, o, t: _eval(m, c, "--scene", "move_step=inf"), ["move_step"]),
    ("eval-data-missing", lambda m, c, o, t: _eval_footage(m, t, t / "nope"), ["--data", "nope", "no such folder"]),
    ("eval-data-not-a-dataset", lambda m, c, o, t: _eval_footage(m, t, _videos_folder(t)),
     ["--data", "videos", "dataset_info.json", "footage ingest"]),
    ("eval-data-is-envs3d", lambda m, c, o, t: _eval_footage(m, t, _envs3d_like(t)), ["envs3d", "--seeds"]),
    ("eval-data-clips-too-short", lambda m, c, o, t: _eval_footage(m, t, _footage(t, frames=5)),
     ["5 frames", "6 needed", "--horizon"]),
    ("eval-data-size-mismatch", lambda m, c, o, t: _eval_footage(m, t, _footage(t, size=16)), ["16x16", "--size 32"]),
    ("eval-data-and-seeds", lambda m, c, o, t: _eval_footage(m, t, _footage(t), "--seeds", "0:2"),
     ["--seeds", "--data"]),
    ("eval-clips-without-data", lambda m, c, o, t: _eval(m, c, "--clips", "0:2"), ["--clips", "--data"]),
    ("eval-clips-out-of-range", lambda m, c, o, t: _eval_footage(m, t, _footage(t), "--clips", "2:5"),
     ["2:5", "0..2", "not 3"]),
    ("eval-heldout-fraction-1", lambda m, c, o, t: _eval_footage(m, t, _footage(t), "--heldout-fraction", "1"),
     ["fraction 1.0", "(0, 1)"]),
    ("empty-footage-sft", lambda m, c, o, t: ["run", SFT, f"model={m}", f"out={o}", f"data.path={_empty_footage(t)}",
                                              "heldout_fraction=0.25", "data.image_size=32"], ["no episodes"]),
    ("steps-negative", lambda m, c, o, t: _grpo(m, c, o, "steps=-1"), ["steps=-1"]),
    ("log-every-0", lambda m, c, o, t: _grpo(m, c, o, "train.log_every=0"), ["log_every=0"]),
    ("prompts-per-step-0", lambda m, c, o, t: _grpo(m, c, o, "prompts_per_step=0"), ["prompts_per_step=0"]),
    ("lr-inf", lambda m, c, o, t: _grpo(m, c, o, "train.lr=.inf"), ["train.lr", "finite"]),
    ("reward-weight-nan", lambda m, c, o, t: _grpo(m, c, o, "rewards=[{name: psnr, weight: .nan}]"),
     ["weight", "finite"]),
    ("yaml-error-in-override", lambda m, c, o, t: _grpo(m, c, o, "train.lr=[0.1"), ["train.lr", "YAML"]),
    ("huge-seed-range", lambda m, c, o, t: _grpo(m, c, o, "data.seeds=0:4000000000"),
     ["0:4000000000", "10,000,000"]),
    ("recipe-not-utf8", lambda m, c, o, t: ["run", str(_latin1_recipe(t)), f"out={o}"], ["latin1.yaml", "UTF-8"]),
    ("duplicate-yaml-key", lambda m, c, o, t: ["run", str(_recipe_with_a_duplicate_key(t)), f"out={o}"],
     ["dup.yaml", "duplicate key 'train'", "first given on line 2", "at line 4"]),
    ("held-out-overlaps-training", lambda m, c, o, t: _grpo(m, c, o, "eval.data.seeds=6:10"),
     ["eval.data.seeds", "overlaps"]),
    ("unknown-key", lambda m, c, o, t: _grpo(m, c, o, "train.lrr=0.1"), ["train.lrr", "'lr'"]),
    ("scene-inf-in-recipe", lambda m, c, o, t: _grpo(m, c, o, "data.scene={move_step: .inf}"), ["data", "move_step"]),
    ("scene-float-count", lambda m, c, o, t: _grpo(m, c, o, "data.scene={min_objects: 2.5}"),
     ["min_objects", "must be int", "2.5"]),
    ("scene-number-as-flag", lambda m, c, o, t: _grpo(m, c, o, "eval.data.scene={walls: 3}"), ["walls", "bool"]),
    ("scene-image-size", lambda m, c, o, t: _grpo(m, c, o, "data.scene={image_size: 16}"),
     ["scene.image_size=16", "data.image_size"]),
]


@pytest.mark.parametrize("build, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(build, words, tiny_model_dir, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    argv = build(tiny_model_dir, cache, out, tmp_path)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (code, err)
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in err.splitlines() if line.startswith("posttrain: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    # No work was done first: nothing generated, no run folder written (an empty lock is allowed for runs
    # refused after the folder was claimed, but no metrics or checkpoints).
    assert not (cache.exists() and any(cache.iterdir())), "episodes were generated before the error"
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_run_overrides_may_follow_flags(monkeypatch, capsys):
    import posttrain.runner

    calls = []
    monkeypatch.setattr(posttrain.runner, "run_recipe", lambda recipe, overrides, **kw: calls.append((overrides, kw)))
    assert main(["run", GRPO, "train.lr=0.1", "--resume", "steps=5", "--overwrite", "seed=2"]) == 0
    assert calls == [(["train.lr=0.1", "steps=5", "seed=2"], {"resume": True, "overwrite": True})]
    with pytest.raises(SystemExit) as exited:  # an unknown flag is still refused
        main(["run", GRPO, "--resume", "steps=5", "--bogus"])
    assert exited.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
