"""Two CPU processes (gloo) give the same update as one; DeepSpeed ZeRO-2 runs GRPO steps.

Launch lines follow STACK-NOTES.md: `--cpu --num_processes 2` would silently start one
process, so the configs use MULTI_GPU/DEEPSPEED and posttrain sets Accelerator(cpu=True).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_grpo_overrides
from safetensors.torch import load_file

from posttrain.runner import run_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "grpo_tabletop.yaml"


def _launch(config: str, overrides: list[str]) -> None:
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / config),
               "-m", "posttrain", "run", str(RECIPE), *overrides]
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1", "POSTTRAIN_DEBUG": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _last_record(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_two_processes_equal_one_with_the_same_global_batch(tiny_model_dir, data_cache, tmp_path):
    extra = ["train.eval_at_end=false", "rewards=[{name: neg_mse, weight: 1.0}]"]
    run_recipe(RECIPE, tiny_grpo_overrides(tiny_model_dir, data_cache, tmp_path / "one", steps=2, extra=extra))
    _launch("ddp.yaml", tiny_grpo_overrides(tiny_model_dir, data_cache, tmp_path / "two", steps=2, extra=extra))
    assert _last_record(tmp_path / "two")["processes"] == 2
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-6, rtol=1e-4)
    # Each process scored its own share of the prompts: the reward means agree with one process.
    a, b = _last_record(tmp_path / "one"), _last_record(tmp_path / "two")
    assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-4)


def test_deepspeed_zero2_runs_grpo_steps_on_two_cpu_processes(tiny_model_dir, data_cache, tmp_path):
    out = tmp_path / "zero2"
    _launch("zero2.yaml", tiny_grpo_overrides(tiny_model_dir, data_cache, out, steps=2,
                                              extra=["train.eval_at_end=false"]))
    record = _last_record(out)
    assert record["processes"] == 2 and record["step"] == 1
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert (out / "checkpoints" / "latest").is_file()
