"""SFT end to end on a tiny model: LoRA moves only the adapter, full fine-tuning only the dynamics,
overfitting one clip lowers the loss, footage folders (frames + actions only) work."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from conftest import base_state, sigkill_resume_and_compare, split_changes, tiny_overrides
from tolerances import assert_close_reordered

from posttrain.logging_utils import read_metrics
from posttrain.runner import run_recipe

RECIPE = "recipes/sft_tabletop.yaml"
SMALL = ["clip_frames=4", "batch_size=4", "train.micro_batch_size=3", "eval.horizon=4", "eval_every=1"]


def steps_of(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "step" in r and "loss" in r]


def test_lora_changes_only_the_adapter(tiny_model, data_cache, tmp_path, captured_trainer):
    out = tmp_path / "sft-lora"
    run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, out) + SMALL + ["steps=2"])
    records = steps_of(out)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["heldout_loss"]) for r in records)
    base = base_state(tiny_model)
    changed, unchanged, adapter = split_changes(captured_trainer["trainer"].policy, base)
    assert unchanged == set(base) and not changed and adapter
    summary = json.loads((out / "report" / "heldout_loss.json").read_text())
    assert math.isfinite(summary["heldout_loss_base"]) and math.isfinite(summary["heldout_loss_post"])
    assert (out / "report" / "metrics.json").is_file()  # envs3d data: the rollout report (PSNR/SSIM) too


def test_full_finetune_changes_dynamics_not_tokenizer(tiny_model, data_cache, tmp_path, captured_trainer):
    out = tmp_path / "sft-full"
    run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, out) + SMALL + [
        "steps=2", "lora.enabled=false", "train.eval_at_end=false"])
    base = base_state(tiny_model)
    changed, unchanged, _ = split_changes(captured_trainer["trainer"].policy, base)
    assert changed and changed | unchanged == set(base)
    assert all(k.startswith("dynamics.") for k in changed)
    assert {k for k in base if k.startswith("tokenizer.")} <= unchanged
    assert (out / "model" / "model.safetensors").is_file()


def test_sigkill_and_resume_equals_unbroken_run(tiny_model, data_cache, tmp_path):
    """Killed right after checkpoint 1 of 4 and resumed: bit-identical adapter, every step logged."""
    overrides = lambda out: tiny_overrides(tiny_model, data_cache, out) + SMALL + [  # noqa: E731
        "steps=4", "train.checkpoint_every=1", "train.eval_at_end=false"]
    unbroken, resumed = sigkill_resume_and_compare(RECIPE, overrides, tmp_path)
    assert unbroken.keys() == resumed.keys() and any("lora_B" in k and v.abs().max() > 0 for k, v in unbroken.items())
    for key in unbroken:
        assert torch.equal(unbroken[key], resumed[key]), key
    assert [r["step"] for r in steps_of(tmp_path / "killed")][-2:] == [2, 3]
    losses = {r["step"]: r["loss"] for r in steps_of(tmp_path / "unbroken")}
    assert all(losses[r["step"]] == r["loss"] for r in steps_of(tmp_path / "killed"))


def test_micro_batches_sum_to_the_full_batch_gradient(tiny_model, data_cache, tmp_path, monkeypatch):
    """4 clips in micro-batches of 1: the gradient handed to the optimizer equals one backward over
    all 4 (gradients, not weights: see tests/grad_capture.py)."""
    import grad_capture

    records: list = []
    grad_capture.install(records, full_batch=True, patch=monkeypatch.setattr)
    run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, tmp_path / "sft-micro") + SMALL + [
        "steps=1", "train.micro_batch_size=1", "train.eval_at_end=false", "eval_every=0"])
    (record,) = records
    assert any("lora_B" in k and v.abs().max() > 1e-4 for k, v in record["full_batch"].items())
    for key, value in record["full_batch"].items():
        assert_close_reordered(record["step_grads"][key], value, msg=key)


def test_overfitting_one_clip_lowers_the_loss(tiny_model, data_cache, tmp_path):
    out = tmp_path / "sft-overfit"
    run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, out, frames=4, train_seeds="0:1") + [
        "clip_frames=4", "batch_size=2", "steps=30", "lora.enabled=false", "train.lr=0.003", "eval_every=0",
        "train.eval_at_end=false", "train.checkpoint_every=0"])
    losses = [r["loss"] for r in steps_of(out)]
    assert len(losses) == 30
    # One 4-frame clip, 48 target tokens of 16 codes: from ~log(16) = 2.77 nats it must fall well below.
    assert losses[-1] < 0.5 * losses[0], losses


def _footage(folder, episodes: int, frames: int, seed: int):
    """A `datasets` folder with only frames (T, 32, 32, 3) uint8 and actions (T - 1,) int64."""
    from datasets import Array4D, Dataset, Features, Sequence, Value

    rng = np.random.default_rng(seed)
    features = Features({"frames": Array4D((frames, 32, 32, 3), "uint8"), "actions": Sequence(Value("int64"))})
    Dataset.from_dict({"frames": [rng.integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8) for _ in range(episodes)],
                       "actions": [rng.integers(0, 5, frames - 1).tolist() for _ in range(episodes)]},
                      features=features).save_to_disk(str(folder))
    return folder


def test_footage_folder(tiny_model, tmp_path):
    train = _footage(tmp_path / "footage-train", 3, 6, 0)
    held = _footage(tmp_path / "footage-held", 2, 6, 1)
    out = tmp_path / "sft-footage"
    run_recipe(RECIPE, [f"model={tiny_model}", f"out={out}", f"data.path={train}", "data.frames=6",
                        f"eval.data.path={held}", "eval.data.frames=6", *SMALL, "steps=2"])
    assert len(steps_of(out)) == 2
    summary = json.loads((out / "report" / "heldout_loss.json").read_text())
    assert summary["heldout_clips"] == 2 and math.isfinite(summary["heldout_loss_post"])
    # The rollout report on the held-out footage: image metrics beside the baselines, no simulator metrics.
    report = json.loads((out / "report" / "metrics.json").read_text())
    assert report["eval_seeds"] == f"clips 0..1 of {held}" and report["horizon"] == 4
    for pair in report["temperatures"].values():
        for name in ("base", "post"):
            assert len(pair[name]["ssim_per_step"]) == 4 and math.isfinite(pair[name]["psnr_mean"])
            assert "object_presence_mean" not in pair[name] and "consistency_3d_mean" not in pair[name]
        assert pair["base"]["baselines"]["mean_image"]["source"] == f"mean of the training clips 0..2 of {train}"
    assert (out / "report" / "rollout.gif").is_file() and (out / "report" / "index.html").is_file()


def test_time_budget_stops_after_the_step_that_crosses_it(tiny_model, data_cache, tmp_path, monkeypatch):
    """train.max_minutes: a fake clock (no real timing) that advances 40 s per reading crosses a 1-minute
    budget at the end of step 1 of 5: that step is checkpointed and the run finishes with its adapter."""
    from posttrain import training

    ticks = iter(range(0, 10_000, 40))
    monkeypatch.setattr(training.time, "monotonic", lambda: next(ticks))
    out = tmp_path / "budget"
    run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, out) + SMALL + [
        "steps=5", "train.max_minutes=1", "train.checkpoint_every=0", "train.eval_at_end=false"])
    records = steps_of(out)
    assert [r["step"] for r in records] == [0, 1] and records[-1]["stopped_by_time_budget"] is True
    assert "stopped_by_time_budget" not in records[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000001"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


class _ExactWorld:
    """encode() is exact integer arithmetic (a frame's token i is the sum of its pixel row i mod 97): chunking
    cannot change it, so the test checks which frames reach the encoder in which order."""

    def encode(self, frames):
        return frames.long().sum((-1, -2)) % 97  # (..., H)


def test_clips_are_tokenised_from_the_memory_mapped_dataset_in_order(tmp_path):
    from conftest import write_footage

    from posttrain.data import EpisodeDataConfig
    from posttrain.sft import tokenise_clips

    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8) for _ in range(7)]
    actions = [rng.integers(0, 5, 4) for _ in range(7)]
    data = EpisodeDataConfig(path=str(write_footage(tmp_path / "footage", clips, actions)))
    expected = torch.from_numpy(np.stack(clips)).long().sum((-1, -2)) % 97
    for rows in (1, 3, 64):  # chunks that split the clips unevenly, and one chunk for all
        tokens, got_actions = tokenise_clips(_ExactWorld(), data, progress=False, rows=rows)
        assert torch.equal(tokens, expected), rows
        assert torch.equal(got_actions, torch.from_numpy(np.stack(actions)).long()), rows


def test_heldout_losses_are_logged_between_log_every_steps(tiny_model, data_cache, tmp_path):
    """eval_every=3 with log_every=2 over 7 steps: the held-out loss of step 5 is written although step 5 is
    neither a logged step (0, 2, 4, 6) nor the last (it was computed and then dropped before)."""
    from posttrain.logging_utils import read_metrics

    out = tmp_path / "sft-eval"
    run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, out) + [
        "clip_frames=4", "batch_size=2", "steps=7", "eval_every=3", "train.log_every=2", "train.eval_at_end=false",
        "train.checkpoint_every=0"])
    held = {r["step"]: r["heldout_loss"] for r in read_metrics(out / "metrics.jsonl")
            if "heldout_loss" in r and r.get("stage") != "heldout"}
    assert sorted(held) == [2, 5] and all(0 < v < 10 for v in held.values())
