"""Two CPU processes (gloo) give the same update as one; DeepSpeed ZeRO-2 runs GRPO steps.

Launch lines follow STACK-NOTES.md: `--cpu --num_processes 2` would silently start one
process, so the configs use MULTI_GPU/DEEPSPEED and posttrain sets Accelerator(cpu=True).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_grpo_overrides
from launch import launch_env, posttrain_entry, run_launch, run_nodes
from safetensors.torch import load_file
from tolerances import assert_close_reordered

from posttrain.runner import run_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "grpo_tabletop.yaml"


def _launch(config: str, overrides: list[str], log_dir: Path, grad_dump: Path | None = None) -> None:
    """`accelerate launch` the recipe (each rank's log under `log_dir`); with `grad_dump`, through
    tests/grad_dump_main.py, which saves each rank's first-step gradients there."""
    run_launch(config, posttrain_entry(RECIPE, overrides, grad_dump=grad_dump is not None), log_dir,
               env=launch_env(grad_dump))


def _last_record(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("layout, credit", [("ddp", "frame"), ("two_nodes", "dense")])
def test_two_processes_equal_one_with_the_same_global_batch(layout, credit, tiny_model_dir, data_cache, tmp_path,
                                                            monkeypatch):
    """Step 0's gradients (after DDP's all-reduce, before clipping) on each of 2 processes equal
    one process's over the same global batch. Gradients, not weights: the first AdamW step from
    LoRA B = 0 is lr * sign(grad), so a dropped `* num_processes` or a local instead of global
    normaliser would leave the weights equal (see tests/grad_capture.py).

    layout "ddp": one launch of recipes/accelerate/ddp.yaml, 2 processes. "two_nodes": two launches of
    recipes/accelerate/multinode.yaml on this machine acting as 2 nodes (127.0.0.1, one process each,
    gloo, static rendezvous), the launch line docs/methods.md gives for real nodes, with dense credit (whose
    patch-advantage scale is reduced over processes; a per-rank scale would break the equality)."""
    import grad_capture

    records: list = []
    grad_capture.install(records, full_batch=True, patch=monkeypatch.setattr)
    extra = ["train.eval_at_end=false", "rewards=[{name: neg_mse, weight: 1.0}]"]
    if credit == "dense":
        extra += ["credit=dense", "dense.patch_return=same_cell"]  # neg_mse has a per-pixel map
    run_recipe(RECIPE, tiny_grpo_overrides(tiny_model_dir, data_cache, tmp_path / "one", steps=2, extra=extra))
    overrides = tiny_grpo_overrides(tiny_model_dir, data_cache, tmp_path / "two", steps=2, extra=extra)
    if layout == "ddp":
        # Also the checkpoint-ordering fault: rank 1 writes its checkpoint files only after rank 0 has reached
        # the barrier before the commit (or, without that barrier, after rank 0 renamed the folder away: the
        # ZeRO-2/3 crash on loaded machines). Events, not timing: deterministic on any machine.
        env = {**launch_env(tmp_path / "grads"), "POSTTRAIN_FAULT": "slow_rank_checkpoint"}
        run_launch("ddp.yaml", posttrain_entry(RECIPE, overrides, grad_dump=True), tmp_path / "logs", env=env)
        final = tmp_path / "two" / "checkpoints" / "step-000001"
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in final.iterdir()}
        assert not list((tmp_path / "two" / "checkpoints").glob(".tmp-*")), "a staging folder or marker was left"
    else:
        run_nodes("multinode.yaml", posttrain_entry(RECIPE, overrides, grad_dump=True), tmp_path / "logs", nodes=2,
                  env=launch_env(tmp_path / "grads"))
    assert _last_record(tmp_path / "two")["processes"] == 2
    single = records[0]["step_grads"]
    # The single process's accumulated gradient is one backward over the whole batch...
    for key, value in records[0]["full_batch"].items():
        assert_close_reordered(single[key], value, msg=key)
    assert any("lora_B" in k and v.abs().max() > 1e-4 for k, v in single.items()), "no gradient reached LoRA B"
    # ... and so is each rank's after DDP's all-reduce.
    for rank in (0, 1):
        dumped = load_file(str(tmp_path / "grads" / f"rank{rank}.safetensors"))  # no pickle
        assert dumped.keys() == single.keys()
        for key in single:
            assert_close_reordered(dumped[key], single[key], msg=f"rank {rank}: {key}")
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
                                              extra=["train.eval_at_end=false"]), tmp_path / "logs")
    record = _last_record(out)
    assert record["processes"] == 2 and record["step"] == 1
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert (out / "checkpoints" / "latest").is_file()
