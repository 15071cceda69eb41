"""Distributed coverage beyond GRPO under DDP: ZeRO-3 GRPO (adapter saved and reloaded), and DPO and SFT
on 2 processes equal to 1 process with the same global batch.

DPO/SFT are compared on the first step's update (one step: AdamW's first update is lr * sign-like
for every parameter that moved, so this also checks that both processes saw the same global batch
and the same reductions). GRPO's gradient-level check lives in test_distributed.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import tiny_grpo_overrides, tiny_overrides
from launch import posttrain_entry, run_launch
from safetensors.torch import load_file

from posttrain.runner import run_recipe

ROOT = Path(__file__).resolve().parent.parent


def _launch(config: str, recipe: str, overrides: list[str], log_dir: Path) -> None:
    run_launch(config, posttrain_entry(ROOT / "recipes" / recipe, overrides), log_dir)


def test_deepspeed_zero3_grpo_saves_an_adapter_that_reloads(tiny_model_dir, data_cache, tmp_path):
    from posttrain.adapters import load_adapter
    from posttrain.models import load_model

    out = tmp_path / "zero3"
    _launch("zero3.yaml", "grpo_tabletop.yaml",
            tiny_grpo_overrides(tiny_model_dir, data_cache, out, steps=2, extra=["train.eval_at_end=false"]),
            tmp_path / "logs")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and records[-1]["processes"] == 2
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k), "ZeRO-3 saved an untrained adapter"
    model = load_adapter(load_model(tiny_model_dir), out / "adapter", base_name=str(tiny_model_dir), merge=False)
    reloaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for key, value in saved.items():
        match = [v for k, v in reloaded.items() if k.replace(".default", "").endswith(key.split("base_model.model.")[-1])]
        assert match and torch.equal(match[0], value), key


def _dpo(model, cache, out):
    return [*tiny_overrides(model, cache, out), "num_context=2", "horizon=4", "data.frames=6", "eval.data.frames=6",
            "group_size=2", "prompts_per_step=4", "steps=1", "pairs.source=offline", "train.micro_batch_size=2",
            "train.eval_at_end=false", "train.checkpoint_every=0", "train.video_every=0", "train.tensorboard=false",
            "eval.horizon=4", "rewards=[{name: neg_mse, weight: 1.0}]"]


def _sft(model, cache, out):
    return [*tiny_overrides(model, cache, out), "clip_frames=4", "batch_size=4", "steps=1",
            "train.micro_batch_size=2", "train.eval_at_end=false", "train.checkpoint_every=0",
            "train.video_every=0", "train.tensorboard=false"]


def _compare(one: Path, two: Path) -> None:
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-4)
    first = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    second = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert second[-1]["processes"] == 2
    assert abs(first[-1]["loss"] - second[-1]["loss"]) < 1e-5 * max(1.0, abs(first[-1]["loss"]))


def test_dpo_two_processes_equal_one(tiny_model_dir, data_cache, tmp_path):
    run_recipe(ROOT / "recipes" / "dpo_tabletop.yaml", _dpo(tiny_model_dir, data_cache, tmp_path / "one"))
    _launch("ddp.yaml", "dpo_tabletop.yaml", _dpo(tiny_model_dir, data_cache, tmp_path / "two"), tmp_path / "logs")
    _compare(tmp_path / "one", tmp_path / "two")


def test_sft_two_processes_equal_one(tiny_model_dir, data_cache, tmp_path):
    run_recipe(ROOT / "recipes" / "sft_tabletop.yaml", _sft(tiny_model_dir, data_cache, tmp_path / "one"))
    _launch("ddp.yaml", "sft_tabletop.yaml", _sft(tiny_model_dir, data_cache, tmp_path / "two"), tmp_path / "logs")
    _compare(tmp_path / "one", tmp_path / "two")
