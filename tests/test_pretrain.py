"""Pre-training's dynamics stage: checkpoints, exact resume after SIGKILL, and a tokenizer taken from a model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import sigkill_resume_and_compare
from test_inputs_are_never_outputs import _code_and_error

from posttrain.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain_tabletop.yaml"


def tiny(cache, out, *extra) -> list[str]:
    """The shipped recipe cut to seconds: 3 episodes of 4 frames at 32x32, a 2-level tokenizer, a 1-layer dynamics."""
    return [f"out={out}", "extra_data=[]", "shifted_eval_data=[]", "threads=1",
            "data.seeds=0:3", "data.frames=4", "data.image_size=32", f"data.cache_dir={cache}", "data.workers=1",
            "eval_data.seeds=900000:900002", "eval_data.frames=4", "eval_data.image_size=32",
            f"eval_data.cache_dir={cache}", "eval_data.workers=1", "tokenizer.steps=2", "tokenizer.batch_size=4",
            "tokenizer.model.image_size=32", "tokenizer.model.channels=[8, 8, 8]", "tokenizer.model.levels=[4, 4]",
            "dynamics.steps=6", "dynamics.batch_size=2", "dynamics.clip_frames=3", "dynamics.model.width=32",
            "dynamics.model.layers=1", "dynamics.model.heads=2", "dynamics.model.patch=1",
            "dynamics.checkpoint_every=2", "weights_dtype=float32", *extra]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_dynamics_stage_resumes_after_sigkill_exactly(tmp_path, monkeypatch):
    import posttrain.pretrain as pretrain

    encoded = []  # frame counts encode_all saw in the resumed (in-process) run

    def counting(tokenizer, frames, batch=256):
        encoded.append(frames.shape[0] * frames.shape[1])
        return original(tokenizer, frames, batch)

    original = pretrain.encode_all
    monkeypatch.setattr(pretrain, "encode_all", counting)
    unbroken, resumed = sigkill_resume_and_compare(RECIPE, lambda out: tiny(tmp_path / "cache", out), tmp_path,
                                                   kill_after=4)
    assert unbroken.keys() == resumed.keys() and any(k.startswith("dynamics.") for k in unbroken)
    for name in unbroken:
        assert torch.equal(unbroken[name], resumed[name]), name
    # The unbroken run encoded the 3 training episodes (12 frames) and the 2 held-out ones (8); the resumed run
    # read the training tokens back from out/train_tokens.safetensors and encoded only the held-out episodes.
    assert encoded == [12, 8, 8], encoded
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("stage") == "dynamics"]
    assert steps == sorted(set(steps)) and steps[-1] == 5, steps  # no step twice, none lost
    assert sum(r.get("stage") == "summary" for r in records) == 1
    summaries = [r for r in records if r.get("stage") == "summary"]
    assert summaries[0]["resumed_dynamics_at_step"] == 4


def test_resume_refuses_a_dynamics_checkpoint_of_another_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_FAULT", "after_checkpoint:2")
    import posttrain.pretrain as pretrain

    def stop(name):  # the fault point, without killing pytest: stop right after checkpoint 2 is written
        if name == "after_checkpoint:2":
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "fault_point", stop)
    cache, out = tmp_path / "cache", tmp_path / "pre"
    with pytest.raises(KeyboardInterrupt):
        main(["run", str(RECIPE), *tiny(cache, out)])
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    for change, word in (("dynamics.lr=0.002", "dynamics.lr"), ("dynamics.model.positions=rotary", "positions"),
                         ("seed=1", "seed")):
        code, err = _code_and_error(["run", str(RECIPE), *tiny(cache, out, change), "--resume"], capsys)
        assert code == 2 and word in err and "--resume" in err, (change, err)
    # How often it checkpoints may change; the run then finishes from step 2.
    code, err = _code_and_error(["run", str(RECIPE), *tiny(cache, out, "dynamics.checkpoint_every=3"), "--resume"],
                                capsys)
    assert code == 0, err
    assert (out / "model" / "model.safetensors").is_file()


def test_tokenizer_from_keeps_the_models_tokenizer_and_trains_a_fresh_dynamics(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from posttrain.models import load_model

    source = load_model(str(tiny_model_dir))
    out = tmp_path / "pre"
    code, err = _code_and_error(["run", str(RECIPE), *tiny(tmp_path / "cache", out, f"tokenizer_from={tiny_model_dir}",
                                                            "dynamics.model.positions=rotary")], capsys)
    assert code == 0, err
    assert not (out / "tokenizer.safetensors").exists(), "no tokenizer stage"
    trained = load_file(str(out / "model" / "model.safetensors"))
    for name, value in source.tokenizer.state_dict().items():
        assert torch.equal(trained[f"tokenizer.{name}"], value), name
    model = load_model(str(out / "model"))
    assert model.dynamics.config.positions == "rotary"
    assert model.dynamics.config.width == 32 and model.dynamics.config.layers == 1  # the recipe's, not the source's


def test_init_and_tokenizer_from_together_are_refused(tiny_model_dir, tmp_path, capsys):
    code, err = _code_and_error(["run", str(RECIPE), *tiny(tmp_path / "cache", tmp_path / "pre",
                                                            f"tokenizer_from={tiny_model_dir}",
                                                            f"init={tiny_model_dir}")], capsys)
    assert code == 2 and "init" in err and "tokenizer_from" in err, err
    assert not (tmp_path / "pre" / "metrics.jsonl").exists()
