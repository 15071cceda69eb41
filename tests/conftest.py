"""Shared fixtures: a tiny world model (2 layers, width 32, 32x32 frames), tiny data and recipes."""

from __future__ import annotations

import os
import sys

# `python -m pytest` (what `make test` runs) puts the working directory first on sys.path. From the clone's root
# its top-level `kernels/` folder (installed as `posttrain.kernels`) would then shadow Hugging Face's `kernels`,
# which diffusers and transformers import: whichever test module first built a flow model failed with "cannot
# import name 'CUDAProperties' from 'kernels'". The project is installed, so the root is not needed on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("POSTTRAIN_NO_PROGRESS", "1")

# Text of `_triton_interp.needs_triton`'s skip reason: the kernel tests that need a runnable Triton.
TRITON_SKIP_REASON = "Triton kernels cannot run here"


def pytest_addoption(parser):
    parser.addoption(
        "--require-kernels", action="store_true",
        help="fail (instead of skip) the Triton kernel tests when triton is installed but cannot run them "
             "(e.g. a test module imported peft/trl, hence triton.language in compiled mode, before the "
             "kernel tests set up the interpreter). `make test` passes it.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With --require-kernels, a `needs_triton` skip on a machine where triton is installed is a failure."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and item.config.getoption("--require-kernels")):
        return
    if TRITON_SKIP_REASON not in str(report.longrepr):
        return
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return  # triton not installed: the skip is honest
    report.outcome = "failed"
    report.longrepr = (f"--require-kernels: {item.nodeid} was skipped ({TRITON_SKIP_REASON}) although triton "
                       "is installed. Something imported triton.language in compiled mode before "
                       "tests/_triton_interp.py (a module collected earlier that imports peft or trl at its "
                       "top?): import those inside the tests instead.")


def make_tiny_model(seed: int = 0, context_frames: int = 4):
    from posttrain.models import DynamicsConfig, TokenizerConfig, TokenWorldModel

    torch.manual_seed(seed)
    return TokenWorldModel(
        TokenizerConfig(image_size=32, downsample=8, channels=(8, 16, 16, 16), levels=(4, 4)),
        DynamicsConfig(width=32, layers=2, heads=2, context_frames=context_frames),
    )


def make_tiny_reference_model(seed: int, generator: torch.Generator):
    """A tiny token model whose decoder also sees a reference frame, with that fresh path opened (random weights
    from `generator`) so that the reference visibly changes what is drawn."""
    from posttrain.adapt_tokenizer import with_reference_path

    model = with_reference_path(make_tiny_model(seed=seed), "tiny").eval()
    with torch.no_grad():
        for name, parameter in model.tokenizer.named_parameters():
            if name.startswith("reference_"):
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


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


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """Alias used by the DPO/SFT tests: the tiny model's folder."""
    return tiny_model_dir


def tiny_overrides(model, cache, out, frames: int = 6, train_seeds: str = "0:8", eval_seeds: str = "500:504",
                   eval_section: str = "eval.data") -> list[str]:
    """Overrides that shrink any recipe to the tiny model and a few tiny episodes."""
    data = [f"data.seeds={train_seeds}", f"data.frames={frames}", "data.image_size=32", f"data.cache_dir={cache}",
            "data.workers=1"]
    held = [f"{eval_section}.seeds={eval_seeds}", f"{eval_section}.frames={frames}", f"{eval_section}.image_size=32",
            f"{eval_section}.cache_dir={cache}", f"{eval_section}.workers=1"] if eval_section else []
    return [f"model={model}", f"out={out}", *data, *held]


@pytest.fixture
def captured_trainer(monkeypatch):
    """Records the training Session a run used (its in-memory policy) when the run finishes."""
    from posttrain import training

    seen = {}
    original = training.finish

    def finish(session, *args, **kwargs):
        seen["trainer"] = session
        return original(session, *args, **kwargs)

    monkeypatch.setattr(training, "finish", finish)
    return seen


def base_state(model_folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_folder / "model.safetensors"))


def split_changes(policy, base: dict) -> tuple[set, set, set]:
    """(changed base params, unchanged base params, changed adapter params) of a (PEFT-wrapped) policy."""
    changed, unchanged, adapter_changed = set(), set(), set()
    for name, value in policy.state_dict().items():
        if "lora_" in name:
            if "lora_B" in name and value.abs().max() > 0:  # lora_B starts at zero
                adapter_changed.add(name)
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if key not in base:
            continue
        (unchanged if torch.equal(value, base[key]) else changed).add(key)
    return changed, unchanged, adapter_changed


def sigkill_resume_and_compare(recipe, overrides, tmp_path, kill_after: int = 1) -> tuple[dict, dict]:
    """Run `recipe` unbroken; run it again in a subprocess SIGKILLed right after checkpoint
    `kill_after` commits (POSTTRAIN_FAULT, no timers), resume it in-process; return the two runs'
    final trained weights (adapter, or the full model) as {name: tensor}. `overrides(out)` -> list."""
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from posttrain.runner import run_recipe

    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    run_recipe(recipe, overrides(unbroken))
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1", "POSTTRAIN_FAULT": f"after_checkpoint:{kill_after}"}
    command = [sys.executable, "-m", "posttrain", "run", str(recipe), *overrides(killed)]
    process = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             timeout=600)
    assert process.returncode == -signal.SIGKILL, (process.returncode, process.stderr[-2000:])
    assert (killed / "checkpoints" / "latest").read_text().strip() == f"step-{kill_after:06d}"
    assert not (killed / "adapter").exists() and not (killed / "model").exists(), "the run died before finishing"
    run_recipe(recipe, overrides(killed), resume=True)

    def weights(out):
        path = out / "adapter" / "adapter_model.safetensors"
        return load_file(str(path if path.is_file() else out / "model" / "model.safetensors"))

    return weights(unbroken), weights(killed)


def write_footage(folder, clips, actions=None):
    """A footage dataset with `posttrain footage ingest`'s schema: one row per clip of `clips`
    (each (T, H, H, 3) uint8), actions NULL_ACTION unless given ((T - 1,) ints per clip)."""
    import numpy as np
    from datasets import Dataset

    from posttrain.footage import NULL_ACTION, FootageConfig, features

    clips = [np.asarray(c, np.uint8) for c in clips]
    t, size = clips[0].shape[0], clips[0].shape[1]
    schema = features(FootageConfig(size=size, clip_frames=t))
    rows = {"clip_id": [f"clip-{i}" for i in range(len(clips))], "source": ["test.mp4"] * len(clips),
            "start_time": [float(i) for i in range(len(clips))], "end_time": [i + 1.0 for i in range(len(clips))],
            "has_actions": [actions is not None] * len(clips), "frames": clips,
            "actions": [list(a) for a in actions] if actions is not None else [[NULL_ACTION] * (t - 1)] * len(clips)}
    Dataset.from_dict(rows, features=schema).save_to_disk(str(folder))
    return folder
