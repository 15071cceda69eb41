"""Outputs never land on or inside inputs, and starts that fail on bad input cost nothing.

Cases found by an audit of the CLI: `eval --json` written over a model's files, the reward-model
method's run folder without the clobber rules, `--overwrite` deleting a held-out set named only under
`eval.data.path`, reward specs checked only after minutes of work, a failed start blocking its own rerun,
and DPO crashing on a step where every group tied.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_grpo_overrides

from posttrain.cli import main
from posttrain.runfolder import LOCK, MARKER, input_paths, prepare_run_folder

GRPO = "recipes/grpo_tabletop.yaml"


def _code_and_error(argv, capsys):
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def test_eval_json_may_not_overwrite_the_models_files(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    base = ["eval", "--model", str(model), "--seeds", "0:2", "--size", "32", "--horizon", "2",
            "--cache-dir", str(tmp_path / "cache")]
    for target, words in ((model / "config.json", "lies inside the model"),
                          (model / "mean_frame.json", "lies inside the model"),  # its .png is the mean frame
                          (tmp_path / "report.png", "ends in .png")):
        code, err = _code_and_error([*base, "--json", str(target)], capsys)
        assert code == 2 and words in err, err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert not (tmp_path / "cache").exists(), "refused before any episode was generated"


def test_reward_model_runs_follow_the_run_folder_rules(tiny_model_dir, tmp_path, capsys):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "report.json").write_text("precious")
    recipe = ["run", "recipes/reward_model.yaml", f"model={tiny_model_dir}", "data.seeds=0:2", "data.image_size=32",
              f"data.cache_dir={tmp_path / 'cache'}", "reward_model.steps=1"]
    code, err = _code_and_error([*recipe, f"out={precious}"], capsys)
    assert code == 2 and "not empty" in err, err
    code, err = _code_and_error([*recipe, f"out={precious}", "--overwrite"], capsys)
    assert code == 2 and MARKER in err, err
    assert (precious / "report.json").read_text() == "precious"
    code, err = _code_and_error([*recipe, f"out={tiny_model_dir / 'rm'}"], capsys)
    assert code == 2 and "lies inside the world model" in err, err
    assert not (tiny_model_dir / "rm").exists()


def test_every_recipe_path_is_an_input(tiny_model_dir, data_cache, tmp_path, capsys):
    recipe = {"data": {"path": "a"}, "eval": {"data": {"path": "b", "seeds": "0:2"}}, "pairs": {"path": ""},
              "pairs_path": "c", "rewards": [{"name": "learned", "params": {"path": "d"}}]}
    assert input_paths(recipe) == {"data.path": "a", "eval.data.path": "b", "pairs_path": "c",
                                   "rewards[0].params.path": "d"}
    # --overwrite of an earlier run must not delete a held-out set the recipe names inside it.
    out = tmp_path / "run"
    held_out = out / "heldout"
    held_out.mkdir(parents=True)
    (out / MARKER).write_text("{}")
    (held_out / "dataset_info.json").write_text("{}")
    argv = ["run", GRPO, *tiny_grpo_overrides(tiny_model_dir, data_cache, out, extra=[f"eval.data.path={held_out}"]),
            "--overwrite"]
    code, err = _code_and_error(argv, capsys)
    assert code == 2 and "eval.data.path" in err, err
    assert (held_out / "dataset_info.json").is_file()


@pytest.mark.parametrize("rewards, words", [
    ("[{name: psnr, params: {foo: 1}}]", ["rewards[0]", "psnr", "foo"]),
    ("[{name: psnr}, {name: learned, params: {path: /no/such/model}}]", ["rewards[1]", "/no/such/model"]),
    ("[{name: psnrr}]", ["rewards[0]", "did you mean 'psnr'"]),
    ("[]", ["rewards", "no reward"]),
])
def test_bad_reward_specs_fail_before_any_work(rewards, words, tiny_model_dir, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    code, err = _code_and_error(["run", GRPO, *tiny_grpo_overrides(tiny_model_dir, cache, out,
                                                                   extra=[f"rewards={rewards}"])], capsys)
    assert code == 2, err
    for word in words:
        assert word in err, (word, err)
    assert not cache.exists() and not out.exists(), "no episodes generated, no run folder claimed"


def test_a_failed_start_does_not_block_the_corrected_rerun(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in (MARKER, LOCK, "config.json"):
        (out / name).write_text("{}")
    (out / "metrics.jsonl").write_text("")
    prepare_run_folder(out, resume=False, overwrite=False)  # nothing a step wrote: reused as if empty
    assert not (out / "config.json").exists()
    # Once a step has logged, the folder holds work: the usual rules apply.
    for name in (MARKER, "config.json"):
        (out / name).write_text("{}")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_run_folder(out, resume=False, overwrite=False)
    # And a folder we did not mark is never taken for a failed start.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_run_folder(other, resume=False, overwrite=False)


def test_dpo_reference_cache_with_no_pairs(tmp_path):
    from posttrain.dpo import ReferenceCache

    cache = ReferenceCache(tmp_path / "ref.safetensors", "hash")

    def compute(_):
        raise AssertionError("nothing to compute")

    values, hits, misses = cache.lookup([], compute)
    assert values.shape == (0, 2) and values.dtype == torch.float64 and (hits, misses) == (0, 0)


def _tiny_pretrain(cache, out, *extra):
    return ["run", "recipes/pretrain_tabletop.yaml", f"out={out}", "extra_data=[]", "shifted_eval_data=[]",
            "data.seeds=0:3", "data.frames=4", "data.image_size=32", f"data.cache_dir={cache}", "data.workers=1",
            "eval_data.seeds=900000:900002", "eval_data.frames=4", "eval_data.image_size=32",
            f"eval_data.cache_dir={cache}", "eval_data.workers=1", "tokenizer.steps=2", "tokenizer.batch_size=4",
            "tokenizer.model.image_size=32", "tokenizer.model.channels=[8, 8, 8]", "tokenizer.model.levels=[4, 4]",
            "dynamics.steps=2", "dynamics.batch_size=2", "dynamics.clip_frames=3", "dynamics.model.width=32",
            "dynamics.model.layers=1", "dynamics.model.heads=2", "dynamics.model.patch=1", *extra]


def test_pretrain_resume_reuses_only_a_tokenizer_this_recipe_trained(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "pre"
    code, err = _code_and_error(_tiny_pretrain(cache, out), capsys)
    assert code == 0, err
    stage = (out / "tokenizer.safetensors").read_bytes()
    for change, word in (("tokenizer.steps=3", "tokenizer.steps"), ("tokenizer.model.levels=[5, 4]", "levels"),
                         ("data.seeds=0:2", "data.seeds")):
        code, err = _code_and_error([*_tiny_pretrain(cache, out, change), "--resume"], capsys)
        assert code == 2 and word in err and "--resume" in err, (change, err)
    code, err = _code_and_error([*_tiny_pretrain(cache, out, "data.workers=2"), "--resume"], capsys)
    assert code == 0, err
    assert (out / "tokenizer.safetensors").read_bytes() == stage, "the finished stage was reused, not retrained"


@pytest.mark.parametrize("extra, words", [
    (["eval.horizon=20"], ["eval.horizon=20", "eval.data.frames=6"]),
    (["temperature=0"], ["temperature=0", "prefix_temperature"]),
    (["top_p=0"], ["top_p=0"]),
    (["data.image_size=64", "eval.data.image_size=64"], ["data.image_size=64", "32x32"]),
])
def test_recipe_values_that_would_fail_late_fail_first(extra, words, tiny_model_dir, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    code, err = _code_and_error(["run", GRPO, *tiny_grpo_overrides(tiny_model_dir, cache, out, extra=extra)], capsys)
    assert code == 2, err
    for word in words:
        assert word in err, (word, err)
    assert not cache.exists(), "no episodes generated first"


@pytest.mark.parametrize("extra, words", [
    (["reward_model.steps=0"], ["reward_model", "steps=0"]),
    (["reward_model.lr=-1"], ["reward_model", "lr=-1"]),
    (["rollout_batch_size=0"], ["rollout_batch_size=0"]),
])
def test_reward_model_recipe_ranges(extra, words, tiny_model_dir, tmp_path, capsys):
    argv = ["run", "recipes/reward_model.yaml", f"model={tiny_model_dir}", f"out={tmp_path / 'rm'}",
            f"data.cache_dir={tmp_path / 'cache'}", *extra]
    code, err = _code_and_error(argv, capsys)
    assert code == 2, err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "rm").exists()


def test_pretrain_clip_longer_than_the_episodes_fails_first(tmp_path, capsys):
    code, err = _code_and_error(_tiny_pretrain(tmp_path / "cache", tmp_path / "pre", "dynamics.clip_frames=5"), capsys)
    assert code == 2 and "dynamics.clip_frames=5" in err, err
    assert not (tmp_path / "cache").exists()


def test_pretrain_overwrite_keeps_a_dataset_named_inside_out(tmp_path, capsys):
    out = tmp_path / "pre"
    dataset = out / "mydata"
    dataset.mkdir(parents=True)
    (out / MARKER).write_text("{}")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")  # an earlier run's work
    (dataset / "dataset_info.json").write_text("{}")
    for key in ("data.path", "eval_data.path"):
        code, err = _code_and_error([*_tiny_pretrain(tmp_path / "cache", out, f"{key}={dataset}"), "--overwrite"],
                                    capsys)
        assert code == 2 and key in err, err
        assert (dataset / "dataset_info.json").is_file()


@pytest.mark.parametrize("extra, words", [
    (["eval_data.image_size=64"], ["eval_data.image_size=64", "32x32"]),  # failed after both stages
    (["data.image_size=64"], ["data.image_size=64", "32x32"]),  # failed after the tokenizer stage
    (["extra_data=[{seeds: '5:7', frames: 5, image_size: 32}]"], ["extra_data[0].frames=5", "data.frames=4"]),
    (["tokenizer.model.image_size=48", "data.image_size=48", "eval_data.image_size=48", "dynamics.model.patch=8"],
     ["dynamics.model", "patch=8", "12x12"]),
    (["dynamics.bf16=fast"], ["dynamics", "bf16='fast'", "true, false or auto"]),
])
def test_pretrain_shapes_that_would_fail_late_fail_first(extra, words, tmp_path, capsys):
    code, err = _code_and_error(_tiny_pretrain(tmp_path / "cache", tmp_path / "pre", *extra), capsys)
    assert code == 2, err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "pre").exists()


def test_preference_files_errors_name_the_file_and_line(tmp_path):
    import numpy as np

    from posttrain.rewards.reward_model import load_npy, read_pair_lines

    good = '{"prompt_id": 1, "chosen": "a.npy", "rejected": "b.npy"}'
    for bad, words in (('{"prompt_id": 1, "chosen": "a.npy" "rejected": "b.npy"}', ["pairs.jsonl:2", "JSON"]),
                       ('{"prompt_id": "x", "chosen": "a.npy", "rejected": "b.npy"}', ["pairs.jsonl:2", "prompt_id"]),
                       ('{"prompt_id": 2, "chosen": 3, "rejected": "b.npy"}', ["pairs.jsonl:2", "chosen"]),
                       ('[1, 2]', ["pairs.jsonl:2", "JSON object"])):
        (tmp_path / "pairs.jsonl").write_text(good + "\n" + bad + "\n")
        with pytest.raises(ValueError) as info:
            read_pair_lines(tmp_path / "pairs.jsonl")
        assert all(word in str(info.value) for word in words), (bad, str(info.value))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects.npy: not a readable .npy"):
        load_npy(tmp_path / "objects.npy")
    (tmp_path / "short.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(ValueError, match="short.npy"):
        load_npy(tmp_path / "short.npy")


def test_dpo_greedy_sampling_is_refused_at_load(tiny_model_dir, tmp_path, capsys):
    argv = ["run", "recipes/dpo_tabletop.yaml", f"model={tiny_model_dir}", f"out={tmp_path / 'dpo'}",
            f"data.cache_dir={tmp_path / 'cache'}", "sample_temperature=0"]
    code, err = _code_and_error(argv, capsys)
    assert code == 2 and "sample_temperature=0" in err, err
    assert not (tmp_path / "cache").exists()
