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


def _launch(config: str, overrides: list[str], grad_dump: Path | None = None) -> None:
    """`accelerate launch` the recipe; with `grad_dump`, through tests/grad_dump_main.py, which saves
    each rank's first-step gradients there."""
    accelerate = Path(sys.executable).parent / "accelerate"
    entry = ["-m", "posttrain"] if grad_dump is None else [str(ROOT / "tests" / "grad_dump_main.py")]
    command = [str(accelerate), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / config),
               *entry, "run", str(RECIPE), *overrides]
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1", "POSTTRAIN_DEBUG": "1"}
    if grad_dump is not None:
        env["POSTTRAIN_GRAD_DUMP"] = str(grad_dump)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _last_record(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_two_processes_equal_one_with_the_same_global_batch(tiny_model_dir, data_cache, tmp_path, monkeypatch):
    """Step 0's gradients (after DDP's all-reduce, before clipping) on each of 2 processes equal
    one process's over the same global batch. Gradients, not weights: the first AdamW step from
    LoRA B = 0 is lr * sign(grad), so a dropped `* num_processes` or a local instead of global
    normaliser would leave the weights equal (see tests/grad_capture.py)."""
    import grad_capture

    records: list = []
    grad_capture.install(records, full_batch=True, patch=monkeypatch.setattr)
    extra = ["train.eval_at_end=false", "rewards=[{name: neg_mse, weight: 1.0}]"]
    run_recipe(RECIPE, tiny_grpo_overrides(tiny_model_dir, data_cache, tmp_path / "one", steps=2, extra=extra))
    _launch("ddp.yaml", tiny_grpo_overrides(tiny_model_dir, data_cache, tmp_path / "two", steps=2, extra=extra),
            grad_dump=tmp_path / "grads")
    assert _last_record(tmp_path / "two")["processes"] == 2
    single = records[0]["step_grads"]
    # The single process's accumulated gradient is one backward over the whole batch...
    for key, value in records[0]["full_batch"].items():
        torch.testing.assert_close(single[key], value, atol=1e-6, rtol=1e-4, msg=key)
    assert any("lora_B" in k and v.abs().max() > 1e-4 for k, v in single.items()), "no gradient reached LoRA B"
    # ... and so is each rank's after DDP's all-reduce.
    for rank in (0, 1):
        dumped = load_file(str(tmp_path / "grads" / f"rank{rank}.safetensors"))  # no pickle
        assert dumped.keys() == single.keys()
        for key in single:
            torch.testing.assert_close(dumped[key], single[key], atol=1e-6, rtol=1e-4, msg=f"rank {rank}: {key}")
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
