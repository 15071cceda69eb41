"""The flow-matching world model's core (posttrain/models/flow.py) on a tiny U-Net: the SDE step's density is a
hand-worked Gaussian, score_paths equals the rollout's log-probs, the loss is a hand-worked value, greedy is
deterministic, save/load round-trips."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.models.flow import FlowConfig, FlowWorldModel

EPS32 = float(torch.finfo(torch.float32).eps)
TINY = dict(image_size=16, block_out_channels=(8, 16), norm_num_groups=4, sample_steps=3, sde_steps=(0, 1))


def _model(seed: int = 0, **changes) -> FlowWorldModel:
    torch.manual_seed(seed)
    return FlowWorldModel(FlowConfig(**{**TINY, **changes})).eval()


def _episode(batch: int = 2, frames: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (batch, frames, 16, 16, 3), generator=g, dtype=torch.uint8),
            torch.randint(0, 5, (batch, frames - 1), generator=g))


def test_the_sde_step_density_is_the_hand_worked_gaussian(monkeypatch):
    """A constant velocity field v = 0.5 makes the step's mean and std closed-form numbers."""
    model = _model(sample_steps=2, sde_steps=(0, 1))
    monkeypatch.setattr(model, "velocity", lambda x, t, context, action: torch.full_like(x, 0.5))
    times = model.times()  # 1, 0.5, 0
    x = torch.full((1, 3, 16, 16), 0.2)
    mean, std = model._step(x, torch.full_like(x, 0.5), times, 1, temperature=1.0)
    # Step 1 goes from t = 0.5 to 0 (d = 0.5): s = 0.7 sqrt(0.5 / 0.5) = 0.7,
    # mean = 0.2 - 0.5 (0.5 + 0.49 / 1.0 (0.2 + 0.5 * 0.5)) = 0.2 - 0.5 (0.5 + 0.2205) = -0.16025,
    # std = 0.7 sqrt(0.5).
    assert std == pytest.approx(0.7 * math.sqrt(0.5), rel=1e-12)
    assert torch.allclose(mean, torch.full_like(x, -0.16025), atol=4 * EPS32)
    # Its log-density against torch.distributions, for a point off the mean.
    point = mean + 0.3
    ours = model.gaussian_logprob(point, mean, std)
    reference = torch.distributions.Normal(mean.double(), std).log_prob(point.double()).sum()
    assert float(ours) == pytest.approx(float(reference), rel=1e-12)
    # One element by hand: -0.5 (0.3 / std)^2 - log(std) - 0.5 log(2 pi), times 768 elements.
    one = -0.5 * (0.3 / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    assert float(ours) == pytest.approx(768 * one, rel=1e-6)
    # At t = 1 the scale s is infinite; the step uses the next time's s (Flow-GRPO's sigma_max).
    assert model._noise_scale(times, 0, 1.0) == pytest.approx(0.7 * math.sqrt(0.5 / 0.5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_score_paths_equals_the_rollout_logprobs(dtype):
    model = _model().to(dtype)
    frames, actions = _episode()
    out = model.rollout_paths(frames[:, :2], actions, horizon=3, temperature=1.0, seeds=[3, 4])
    assert out.frames.shape == (2, 3, 16, 16, 3) and out.paths.shape == (2, 3, 4, 3, 16, 16)
    assert out.logprobs.shape == (2, 3, 2) and torch.isfinite(out.logprobs).all()
    with torch.no_grad():
        scored = model.score_paths(frames[:, :2], out.paths, actions, temperature=1.0)
    if dtype == torch.float64:
        # The same velocities recomputed in another batch layout. In float64 each of the 768 terms
        # 0.5 z^2 + log(std) + 0.5 log(2 pi) is off by a few ulps of its size (z^2 / 2 <= |logp| + 768 bounds
        # every term): 768 x 64 ulps of that is far below any real mismatch (a mean off by 1e-6 std moves
        # logp by ~1e-6 |z| per element).
        tol = 768 * 64 * float(torch.finfo(torch.float64).eps) * (out.logprobs.abs() + 768)
        assert ((scored - out.logprobs).abs() <= tol).all(), ((scored - out.logprobs).abs() / tol).max()
    else:
        # float32: a step's mean may differ between the two layouts by some ulps of the states' size
        # (|d mean| <= 64 eps (max|x| + 1)), which moves logp by sum_i z_i d mean_i / std <= sum|z| |d mean| / std,
        # and sum|z| <= sqrt(n sum z^2) where sum z^2 / 2 = -logp - n (log std + log(2 pi) / 2) (exact).
        n, times = 768, model.times().double()
        stds = torch.tensor([model._noise_scale(times, k, 1.0) * math.sqrt(float(times[k] - times[k + 1]))
                             for k in sorted(model.config.sde_steps)], dtype=torch.float64)
        z2 = 2 * (-out.logprobs - n * (stds.log() + 0.5 * math.log(2 * math.pi)))
        size = float(out.paths.abs().max()) + 1
        tol = (n * z2).sqrt() * 64 * EPS32 * size / stds
        assert ((scored - out.logprobs).abs() <= tol).all(), ((scored - out.logprobs).abs() / tol).max()
    # And the scores are of *these* choices: another path scores differently.
    other = model.rollout_paths(frames[:, :2], actions, horizon=3, temperature=1.0, seeds=[5, 6])
    with torch.no_grad():
        mismatched = model.score_paths(frames[:, :2], other.paths, actions, temperature=1.0)
    assert not torch.allclose(mismatched, scored, atol=1.0)


def test_score_paths_is_differentiable_with_respect_to_the_weights():
    model = _model()
    frames, actions = _episode()
    out = model.rollout_paths(frames[:, :2], actions, horizon=2, temperature=1.0, seeds=[0, 1])
    model.score_paths(frames[:, :2], out.paths, actions).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().max() > 0 for g in grads)


def test_greedy_is_the_deterministic_ode_and_sampling_follows_the_seeds():
    model = _model()
    frames, actions = _episode()
    a = model.rollout_paths(frames[:, :2], actions, horizon=2, temperature=0.0, seeds=[0, 1])
    b = model.rollout_paths(frames[:, :2], actions, horizon=2, temperature=0.0, seeds=[0, 1])
    assert torch.equal(a.frames, b.frames) and a.logprobs.shape == (2, 2, 0)
    s1 = model.rollout_paths(frames[:, :2], actions, horizon=2, temperature=1.0, seeds=[0, 1])
    s2 = model.rollout_paths(frames[:, :2], actions, horizon=2, temperature=1.0, seeds=[0, 1])
    s3 = model.rollout_paths(frames[:, :2], actions, horizon=2, temperature=1.0, seeds=[7, 8])
    assert torch.equal(s1.frames, s2.frames) and not torch.equal(s1.frames, s3.frames)
    # A rollout's first frame does not depend on the others in the batch (per-rollout generators).
    alone = model.rollout_paths(frames[:1, :2], actions[:1], horizon=2, temperature=1.0, seeds=[0])
    assert torch.allclose(alone.frames[0], s1.frames[0], atol=1e-5)
    with pytest.raises(ValueError, match="no stochastic step"):
        model.score_paths(frames[:, :2], a.paths, actions, temperature=0.0)


def test_flow_matching_loss_is_the_hand_worked_value(monkeypatch):
    """Frames of constant 0.75 (x_0 = 0.5 in [-1, 1]), noise 1, t = 0.25 and a velocity field of 0.2: the
    target velocity is eps - x_0 = 0.5, so the loss is (0.2 - 0.5)^2 = 0.09; the noisy input is
    (1 - t) x_0 + t eps = 0.625."""
    model = _model()
    seen = {}

    def velocity(x_t, t, context, action):
        seen.update(x_t=x_t, t=t, context=context, action=action)
        return torch.full_like(x_t, 0.2)

    monkeypatch.setattr(model, "velocity", velocity)
    frames = torch.full((1, 3, 16, 16, 3), 0.75)
    actions = torch.tensor([[3, 4]])
    loss = model.flow_matching_loss(frames, actions, num_context=1, t=torch.full((1, 2), 0.25),
                                    noise=torch.ones(1, 2, 3, 16, 16))
    assert float(loss) == pytest.approx(0.09, abs=8 * EPS32)
    assert torch.allclose(seen["x_t"], torch.full_like(seen["x_t"], 0.625), atol=4 * EPS32)
    assert seen["action"].tolist() == [3, 4]  # the action into each target frame
    assert seen["context"].shape == (2, 2, 3, 16, 16)  # two context frames per target (the first repeats)


def test_training_lowers_the_flow_matching_loss():
    model = _model().train()
    frames, actions = _episode(batch=2, frames=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    fixed = dict(t=torch.rand(2, 2, generator=g), noise=torch.randn(2, 2, 3, 16, 16, generator=g))
    first = float(model.flow_matching_loss(frames, actions, **fixed).detach())
    for _ in range(30):
        optimizer.zero_grad()
        model.flow_matching_loss(frames, actions, **fixed).backward()
        optimizer.step()
    assert float(model.flow_matching_loss(frames, actions, **fixed).detach()) < 0.5 * first


def test_save_and_load_round_trip(tmp_path):
    model = _model(seed=3)
    model.save_pretrained(tmp_path / "flow")
    loaded = FlowWorldModel.from_pretrained(tmp_path / "flow").eval()
    assert loaded.config == model.config
    frames, actions = _episode()
    a = model.rollout_paths(frames[:, :2], actions, horizon=2, temperature=1.0, seeds=[0, 1])
    b = loaded.rollout_paths(frames[:, :2], actions, horizon=2, temperature=1.0, seeds=[0, 1])
    assert torch.equal(a.frames, b.frames) and torch.equal(a.logprobs, b.logprobs)
    (tmp_path / "flow" / "config.json").write_text('{"architecture": "posttrain.TokenWorldModel"}')
    with pytest.raises(ValueError, match="is not 'posttrain.FlowWorldModel'"):
        FlowWorldModel.from_pretrained(tmp_path / "flow")


def test_posttrain_eval_takes_a_flow_model_folder_on_envs3d_and_footage(tmp_path, data_cache, capsys):
    """`load_model` reads the folder and `posttrain eval` scores it with the same metrics as a token model."""
    import json

    import numpy as np
    from conftest import write_footage

    from posttrain.cli import main
    from posttrain.models import load_model

    folder = _model(image_size=32).save_pretrained(tmp_path / "flow32")
    assert isinstance(load_model(str(folder)), FlowWorldModel)
    out = tmp_path / "eval" / "envs3d.json"
    assert main(["eval", "--model", str(folder), "--seeds", "0:2", "--size", "32", "--horizon", "3",
                 "--cache-dir", str(data_cache), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["ssim_per_step"]) == 3 and 0 <= report["object_presence_mean"] <= 1
    assert np.isfinite(report["consistency_3d_mean"])
    rng = np.random.default_rng(0)
    footage = write_footage(tmp_path / "footage", [rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
                                                   for _ in range(3)])
    out = tmp_path / "eval" / "footage.json"
    assert main(["eval", "--model", str(folder), "--data", str(footage), "--size", "32", "--horizon", "3",
                 "--temperature", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    # A pixel-space model draws any frame exactly: its "tokenizer" ceiling is the truth itself.
    assert report["tokenizer_ceiling"]["mse_mean"] == 0.0 and "object_presence_mean" not in report


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_trains_a_flow_model_with_the_flow_matching_loss(lora, tmp_path, data_cache, captured_trainer):
    """The SFT recipe on a flow model folder, changing `model=` only: its loss is the flow-matching error per
    element, full fine-tuning changes the U-Net and LoRA (PEFT, the model's own targets) only the adapter; the
    report's rollouts run on it."""
    import json

    from conftest import base_state, split_changes, tiny_overrides

    from posttrain.logging_utils import read_metrics
    from posttrain.runner import run_recipe

    folder = _model(image_size=32).save_pretrained(tmp_path / "flow32")
    out = tmp_path / "sft"
    run_recipe("recipes/sft_tabletop.yaml", tiny_overrides(folder, data_cache, out) + [
        "clip_frames=4", "batch_size=4", "train.micro_batch_size=2", "eval.horizon=3", "eval_every=1", "steps=2",
        f"lora.enabled={str(lora).lower()}", "train.lr=0.003"])
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and all(0 < r["loss"] < 10 for r in records)
    base = base_state(folder)
    changed, unchanged, adapter = split_changes(captured_trainer["trainer"].policy, base)
    if lora:
        assert not changed and adapter and any("conv" in name or "to_" in name for name in adapter)
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    else:
        assert changed and not adapter
        assert isinstance(FlowWorldModel.from_pretrained(out / "model"), FlowWorldModel)
    report = json.loads((out / "report" / "metrics.json").read_text())
    assert len(report["temperatures"]["0.0"]["post"]["ssim_per_step"]) == 3


def test_models_init_writes_a_fresh_flow_model(tmp_path, capsys):
    from posttrain.cli import main
    from posttrain.models import load_model

    assert main(["models", "init", "--arch", "flow", "--layers", "1", "--width", "8", "--size", "32",
                 "--out", str(tmp_path / "flow")]) == 0
    model = load_model(str(tmp_path / "flow"))
    assert isinstance(model, FlowWorldModel) and model.config.block_out_channels == (8, 16, 16)
    assert "untrained flow world model" in capsys.readouterr().out
    assert main(["models", "init", "--arch", "flow", "--layers", "1", "--width", "12", "--out",
                 str(tmp_path / "odd")]) == 2  # 12 is not a multiple of the U-Net's 8 groups


def test_models_init_writes_a_latent_unet2d_flow_model(tmp_path, tiny_model_dir, capsys):
    from posttrain.cli import main
    from posttrain.models import load_model

    assert main(["models", "init", "--arch", "unet2d", "--space", "latent", "--tokenizer", str(tiny_model_dir),
                 "--layers", "1", "--width", "8", "--out", str(tmp_path / "latent")]) == 0
    model = load_model(str(tmp_path / "latent"))
    token_model = load_model(str(tiny_model_dir))
    assert isinstance(model, FlowWorldModel) and model.config.space == "latent"
    assert model.state_shape == (2, 4, 4) and model.image_size == 32
    assert all(torch.equal(model.tokenizer.state_dict()[k], v) for k, v in token_model.tokenizer.state_dict().items())
    assert "2x4x4 latent states" in capsys.readouterr().out
    # A flow model has no FSQ tokenizer to lend.
    assert main(["models", "init", "--arch", "flow", "--space", "latent", "--tokenizer", str(tmp_path / "latent"),
                 "--layers", "1", "--width", "8", "--out", str(tmp_path / "bad")]) == 2


class _MyDenoiser(torch.nn.Module):
    """A user's own denoiser, not a diffusers class: convolutions, an action embedding and a time projection."""

    lora_target_modules = ["middle"]

    def __init__(self, context_frames: int = 2, num_actions: int = 35, width: int = 8):
        super().__init__()
        self.inputs = torch.nn.Conv2d(3 * (1 + context_frames), width, 3, padding=1)
        self.middle = torch.nn.Conv2d(width, width, 3, padding=1)
        self.outputs = torch.nn.Conv2d(width, 3, 3, padding=1)
        self.action = torch.nn.Embedding(num_actions + 1, width)
        self.time = torch.nn.Linear(1, width)

    def forward(self, x, timesteps, class_labels):
        h = self.inputs(x) + (self.action(class_labels) + self.time(timesteps[:, None] / 1000))[:, :, None, None]
        return self.outputs(torch.nn.functional.silu(self.middle(torch.nn.functional.silu(h))))


def test_your_own_denoiser_runs_eval_sft_and_a_lora_adapter_by_changing_model_only(tmp_path, data_cache):
    import json

    from conftest import tiny_overrides

    from posttrain.cli import main
    from posttrain.models import load_model, register_architecture
    from posttrain.runner import run_recipe

    register_architecture("tests.MyDenoiserFlow", lambda folder, location: FlowWorldModel.from_pretrained(
        folder, location, denoiser=_MyDenoiser()))
    torch.manual_seed(0)
    config = FlowConfig(**{**TINY, "image_size": 32})
    folder = FlowWorldModel(config, denoiser=_MyDenoiser(), architecture="tests.MyDenoiserFlow").save_pretrained(
        tmp_path / "mine")
    model = load_model(str(folder))
    assert isinstance(model.denoiser, _MyDenoiser) and model.lora_target_modules == ["middle"]
    with pytest.raises(ValueError, match="your own denoiser"):
        FlowWorldModel.from_pretrained(folder)  # without the module, the folder cannot be rebuilt
    out = tmp_path / "sft"
    run_recipe("recipes/sft_tabletop.yaml", tiny_overrides(folder, data_cache, out) + [
        "clip_frames=4", "batch_size=4", "train.micro_batch_size=4", "eval.horizon=3", "eval_every=0", "steps=2",
        "train.lr=0.01"])
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["middle"]
    assert main(["eval", "--model", str(folder), "--adapter", str(out / "adapter"), "--seeds", "500:502", "--size",
                 "32", "--horizon", "3", "--cache-dir", str(data_cache), "--json", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert len(report["ssim_per_step"]) == 3 and len(report["base"]["ssim_per_step"]) == 3


def test_python_dash_m_from_the_checkout_root_builds_a_flow_model(tmp_path):
    """`python -m posttrain` (and so `accelerate launch -m posttrain`) from the clone's root: the working
    directory's `kernels/` folder must not shadow Hugging Face's `kernels`, which diffusers imports (it did:
    "cannot import name 'CUDAProperties' from 'kernels'")."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    assert (root / "kernels" / "__init__.py").is_file()  # the folder that would shadow it
    command = [sys.executable, "-m", "posttrain", "models", "init", "--arch", "flow", "--layers", "1", "--width", "8",
               "--size", "32", "--out", str(tmp_path / "flow")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "flow" / "config.json").is_file() and (tmp_path / "flow" / "model.safetensors").is_file()


def test_fewer_sample_steps_is_the_model_built_with_them():
    """set_sample_steps(K) on a 3-step model rolls out exactly as the same weights built for K steps; stochastic
    steps past K are dropped (step 0 stays)."""
    three = _model(sample_steps=3, sde_steps=(0, 2))
    two = _model(sample_steps=2, sde_steps=(0,))
    two.load_state_dict(three.state_dict())
    three.set_sample_steps(2)
    assert three.config.sample_steps == 2 and three.config.sde_steps == (0,)
    frames, actions = _episode()
    for temperature in (0.0, 1.0):
        a = three.rollout_paths(frames[:, :2], actions, horizon=2, temperature=temperature, seeds=[0, 1])
        b = two.rollout_paths(frames[:, :2], actions, horizon=2, temperature=temperature, seeds=[0, 1])
        assert a.paths.shape == (2, 2, 3, 3, 16, 16)
        assert torch.equal(a.paths, b.paths) and torch.equal(a.logprobs, b.logprobs)
    for steps, error in ((1, "sample_steps=1 leaves no stochastic step"), (0, "sample_steps=0")):
        with pytest.raises(ValueError, match=error):  # one Euler step from t = 1 has no SDE noise scale
            three.set_sample_steps(steps)
    assert three.config.sample_steps == 2  # a refused change leaves the model as it was


def test_eval_and_play_take_sample_steps_for_a_flow_model_only(tmp_path, data_cache, tiny_model_dir, capsys):
    import json

    from posttrain.cli import main

    folder = _model(image_size=32).save_pretrained(tmp_path / "flow32")
    two = _model(image_size=32, sample_steps=2).save_pretrained(tmp_path / "flow32-two-steps")  # TINY: sde 0, 1
    common = ["--seeds", "0:2", "--size", "32", "--horizon", "2", "--cache-dir", str(data_cache)]
    assert main(["eval", "--model", str(folder), "--sample-steps", "2", *common, "--json", str(tmp_path / "a.json")]) == 0
    assert main(["eval", "--model", str(two), *common, "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["sample_steps"] == 2 and "sample_steps" not in b
    assert a["mse_per_step"] == b["mse_per_step"] and a["ssim_per_step"] == b["ssim_per_step"]
    capsys.readouterr()
    for argv in (["eval", "--model", str(tiny_model_dir), "--sample-steps", "2", *common, "--json",
                  str(tmp_path / "c.json")],
                 ["eval", "--model", str(folder), "--sample-steps", "0", *common, "--json", str(tmp_path / "d.json")],
                 ["play", "--model", str(tiny_model_dir), "--sample-steps", "2", "--port", "0"],
                 ["play", "--model", str(folder), "--sample-steps", "0", "--port", "0"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--sample-steps" in err, err
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "d.json").exists()
