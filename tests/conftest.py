"""Shared fixtures: a tiny world model (2 layers, width 32, 32x32 frames) and tiny recipes."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("POSTTRAIN_NO_PROGRESS", "1")


def make_tiny_model(seed: int = 0, context_frames: int = 4):
    import torch

    from posttrain.models import DynamicsConfig, TokenizerConfig, TokenWorldModel

    torch.manual_seed(seed)
    return TokenWorldModel(
        TokenizerConfig(image_size=32, downsample=8, channels=(8, 16, 16, 16), levels=(4, 4)),
        DynamicsConfig(width=32, layers=2, heads=2, context_frames=context_frames),
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One episode cache for the whole session (generation is shared across tests)."""
    return tmp_path_factory.mktemp("episodes")


def tiny_grpo_overrides(model_dir, cache, out, steps=3, extra=()):
    return [
        f"model={model_dir}", f"out={out}", f"steps={steps}",
        "data.seeds=0:8", "data.frames=6", "data.image_size=32", f"data.cache_dir={cache}", "data.workers=1",
        "num_context=2", "horizon=4", "group_size=3", "prompts_per_step=2",
        "eval.data.seeds=500:504", "eval.data.frames=6", "eval.data.image_size=32", f"eval.data.cache_dir={cache}",
        "eval.data.workers=1", "eval.horizon=4", "eval.batch_size=4",
        "train.micro_batch_size=3", "train.checkpoint_every=1", "train.video_every=0", "train.tensorboard=false",
        *extra,
    ]
