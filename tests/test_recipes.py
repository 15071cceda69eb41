"""Every recipe in recipes/ loads into its config dataclass, and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.runner import build_config

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))  # not recipes/accelerate/


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads(path):
    _, config = build_config(path)
    assert config.method == path.read_text().split("method:", 1)[1].split()[0]
    first_lines = path.read_text().splitlines()[:4]
    assert first_lines[0].startswith("#")
    assert any(f"posttrain run recipes/{path.name}" in line for line in first_lines)


def test_recipes_found():
    names = {p.name for p in RECIPES}
    assert {"dpo_tabletop.yaml", "sft_tabletop.yaml", "reward_model.yaml"} <= names


def test_overrides_keep_seed_ranges_as_strings_and_read_exponents_as_floats():
    """PyYAML reads `6:10` as the base-60 integer 370 and `1e-4` as a string; recipes must not."""
    from posttrain.runner import build_config

    _, config = build_config("recipes/grpo_tabletop.yaml", ["data.seeds=6:10", "eval.data.seeds=1:3",
                                                            "train.lr=1e-4"])
    assert (config.data.seeds, config.eval.data.seeds, config.train.lr) == ("6:10", "1:3", 1e-4)


def test_duplicate_keys_are_refused_but_merge_keys_may_be_overridden():
    import yaml

    from posttrain.config import safe_load

    with pytest.raises(yaml.YAMLError, match=r"duplicate key 'lr' \(first given on line 1\)"):
        safe_load("train: {lr: 0.5, lr: 0.1}")
    merged = safe_load("base: &b {lr: 1, micro_batch_size: 2}\ntrain:\n  <<: *b\n  lr: 0.5\n")
    assert merged["train"] == {"lr": 0.5, "micro_batch_size": 2}


ACCELERATE_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_parse_and_show_their_launch_line(path):
    """Each Accelerate config is YAML with the fields `accelerate launch` needs, and its opening comment holds
    the command that uses it (with its own file name), as every recipe does."""
    import yaml

    text = path.read_text()
    config = yaml.safe_load(text)
    assert config["distributed_type"] in ("MULTI_GPU", "DEEPSPEED"), path.name
    assert config["num_processes"] >= config["num_machines"] >= 1
    head = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert f"accelerate launch --config_file recipes/accelerate/{path.name}" in head, path.name
    if config["num_machines"] > 1:
        assert "--machine_rank" in head and "--main_process_ip" in head, path.name


def test_pretrain_bf16_auto_follows_the_cpus_native_bf16():
    """bf16 autocast is a speed-up only where the CPU has bf16 dot products; on an AVX2-only CPU oneDNN emulates
    it (18.6x slower than fp32 for the dynamics step, bench_bf16.py), so "auto" (the default) turns it on only with avx512_bf16/amx."""
    from posttrain.pretrain import DynamicsTraining, TokenizerTraining, native_bf16, use_bf16

    avx2 = "processor : 0\nflags : fpu sse2 avx avx2 fma f16c\n"
    assert not native_bf16(avx2)
    assert native_bf16("flags : fpu avx2 avx512f avx512_bf16\n")
    assert native_bf16("flags : fpu avx2 amx_tile amx_bf16\n")
    assert not native_bf16("")
    assert TokenizerTraining().bf16 == "auto" and DynamicsTraining().bf16 == "auto"
    assert use_bf16(True) and not use_bf16(False) and use_bf16("auto") == native_bf16()
