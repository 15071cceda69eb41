"""Who owns a run folder: no clobbering, one run at a time, honest resume, no NaN adapters.

Faults are injected deterministically (POSTTRAIN_FAULT kills the process from inside at a
named point), never by racing a timer.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import tiny_grpo_overrides
from safetensors.torch import load_file

from posttrain.runfolder import MARKER, RunLock
from posttrain.runner import run_recipe
from posttrain.training import TrainingDiverged

RECIPE = "recipes/grpo_tabletop.yaml"


def _overrides(model, cache, out, steps=3, extra=()):
    return tiny_grpo_overrides(model, cache, out, steps=steps, extra=["train.eval_at_end=false", *extra])


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "step" in json.loads(line)]


def test_non_empty_out_needs_resume_or_overwrite(tiny_model_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, out, steps=2))
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not empty.*--resume.*--overwrite"):
        run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, out, steps=2))
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert _steps(out) == [0, 1]
    run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, out, steps=2), overwrite=True)
    assert _steps(out) == [0, 1], "--overwrite starts a fresh log, it does not append"


def test_overwrite_refuses_a_folder_it_did_not_write(tiny_model_dir, data_cache, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=MARKER):
        run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, out), overwrite=True)
    assert (out / "thesis.txt").read_text() == "precious"


def test_out_may_not_overlap_the_model_folder(tiny_model_dir, data_cache, tmp_path):
    with pytest.raises(ValueError, match="lies inside the model folder"):
        run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, tiny_model_dir / "run"))
    assert not (tiny_model_dir / "run").exists()


def test_a_second_run_on_a_live_folder_is_refused_naming_the_first(tiny_model_dir, data_cache, tmp_path):
    out = tmp_path / "busy"
    first = RunLock(out, "grpo")  # a live first run holds the folder (same flock a real run takes)
    try:
        with pytest.raises(FileExistsError, match=f"in use by another run \\(pid {os.getpid()} on"):
            run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, out), overwrite=True)
    finally:
        first.release()
    assert not (out / "metrics.jsonl").exists()


def _killed_run(model, cache, out, steps, fault):
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1", "POSTTRAIN_FAULT": fault}
    command = [sys.executable, "-m", "posttrain", "run", RECIPE, *_overrides(model, cache, out, steps,
                                                                             ["train.checkpoint_every=2"])]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def test_resume_cuts_the_log_back_and_refuses_changed_fields(tiny_model_dir, data_cache, tmp_path):
    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, unbroken, 4, ["train.checkpoint_every=2"]))
    # Dies right after step 2 is logged; the newest checkpoint is step 1, so step 2 will be replayed.
    _killed_run(tiny_model_dir, data_cache, killed, 4, "after_log:2")
    assert _steps(killed) == [0, 1, 2]
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-000001"
    with pytest.raises(ValueError, match=r"train\.lr \(0\.0003 -> 0\.1\)"):
        run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, killed, 4,
                                      ["train.checkpoint_every=2", "train.lr=0.1"]), resume=True)
    run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, killed, 4, ["train.checkpoint_every=2"]), resume=True)
    assert _steps(killed) == [0, 1, 2, 3], "no step logged twice"
    logs = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in
            (unbroken, killed)]
    assert [r["reward_mean"] for r in logs[0]] == [r["reward_mean"] for r in logs[1]]
    a = load_file(str(unbroken / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Fewer steps than the checkpoint holds is refused before anything is rewritten (the model card would
    # otherwise claim 2 steps for weights trained 4); the same folder spelled another way resumes.
    config = (killed / "config.json").read_text()
    with pytest.raises(ValueError, match="checkpoint after 4 steps; steps=2 is fewer"):
        run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, killed, 2, ["train.checkpoint_every=2"]), resume=True)
    assert (killed / "config.json").read_text() == config
    respelled = tmp_path / "." / "killed"
    run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, respelled, 4, ["train.checkpoint_every=2",
                                                                            "data.workers=2"]), resume=True)


def test_non_finite_steps_are_skipped_then_the_run_stops(tiny_model_dir, data_cache, tmp_path, monkeypatch):
    import posttrain.grpo as grpo

    original = grpo.policy_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # every micro-batch loss of the first step is NaN, then always NaN again
        loss, stats = original(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] <= 2 or calls["n"] > 4 else (loss, stats)

    monkeypatch.setattr(grpo, "policy_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        # micro_batch_size 3 and 6 rollouts: 2 micro-batches per step. Step 0 NaN (skipped), step 1 fine,
        # steps 2, 3, 4 NaN -> stopped after the third in a row.
        run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, out, steps=8, extra=["train.checkpoint_every=0"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in records] == [1, 0, 1, 1, 1]
    assert records[0]["grad_norm"] is None, "a non-finite norm is logged as null (JSON has no NaN)"
    assert math.isfinite(records[1]["grad_norm"])


def test_bf16_first_update_ratio_is_one(tiny_model_dir, data_cache, tmp_path, monkeypatch):
    """Under bf16 the update must see old log-probs computed in its own precision (ratio 1 at the start)."""
    import posttrain.grpo as grpo

    original, seen = grpo.policy_loss, []

    def recording(new_logp, old_logp, *args, **kwargs):
        seen.append(float((new_logp.detach().float() - old_logp.float()).abs().max()))
        return original(new_logp, old_logp, *args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss", recording)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the in-process singleton holds "no" from other tests
    run_recipe(RECIPE, _overrides(tiny_model_dir, data_cache, tmp_path / "bf16", steps=1,
                                  extra=["train.mixed_precision=bf16", "train.checkpoint_every=0"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert seen and max(seen) < 1e-6, seen
