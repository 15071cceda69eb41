"""The flow model in a frozen tokenizer's latent space, its frame-by-frame rollout (play's), and its pre-training
recipe (posttrain/pretrain_flow.py): states are the tokenizer's FSQ latents, the tokenizer never trains or takes
LoRA, start_rollout + steps equal rollout, and pre-training resumes exactly after a SIGKILL."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.flow import FlowConfig, FlowWorldModel


@pytest.fixture(scope="module")
def tiny_token_model():
    from conftest import make_tiny_model

    return make_tiny_model().eval()


SMALL = dict(block_out_channels=(8, 16), norm_num_groups=4, sample_steps=3, sde_steps=(0, 2), context_frames=2)


def _latent(tiny_token_model, seed: int = 0, **changes) -> FlowWorldModel:
    torch.manual_seed(seed)
    return FlowWorldModel.latent(tiny_token_model.tokenizer, FlowConfig(**{**SMALL, **changes})).eval()


def _frames(batch=2, frames=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (batch, frames, size, size, 3), generator=g, dtype=torch.uint8),
            torch.randint(0, 5, (batch, frames + 4), generator=g))


def test_latent_states_are_the_tokenizers_latents_and_decode_to_its_reconstruction(tiny_token_model):
    model = _latent(tiny_token_model)
    tokenizer = tiny_token_model.tokenizer
    assert model.state_shape == (len(tokenizer.config.levels), tokenizer.config.grid, tokenizer.config.grid)
    frames, _ = _frames()
    states = model.to_space(frames)  # (B, T, c, h, w)
    levels = tokenizer.fsq.levels.view(-1, 1, 1)
    grid_values = states * (levels // 2)
    assert torch.equal(grid_values, grid_values.round()), "clean states are FSQ grid values"
    ids = tokenizer.fsq.codes_to_ids((grid_values).movedim(-3, -1))
    assert torch.equal(ids.flatten(-2), tokenizer.encode(frames)), "the same codes as the token model's"
    with torch.no_grad():
        reconstruction = tokenizer(frames)[0].clamp(0, 1)
    decoded = model.decode(model.encode(frames))
    assert decoded.shape == frames.shape
    assert torch.allclose(decoded, reconstruction, atol=8 * float(torch.finfo(torch.float32).eps))
    # Off-grid states are snapped before decoding (snap: true), or decoded as they are (snap: false); states
    # beyond the grid snap to its end codes (an even level's top code is (L/2 - 1) / (L/2), not 1).
    off = states + 0.01
    assert torch.allclose(model.from_space(off), reconstruction, atol=1e-6)
    top = torch.full_like(states[:1, :1], 5.0)
    codes = (levels - 1 - levels // 2) / (levels // 2)
    with torch.no_grad():
        expected = ((tokenizer.decoder(codes.expand_as(top[0])).float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.allclose(model.from_space(top)[0], expected, atol=1e-6)
    unsnapped = FlowWorldModel.latent(tokenizer, FlowConfig(**SMALL, snap=False))
    assert not torch.allclose(unsnapped.from_space(off), reconstruction, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_latent_score_paths_equals_the_rollout_logprobs(tiny_token_model, dtype):
    model = _latent(tiny_token_model).to(dtype)
    frames, actions = _frames()
    out = model.rollout_paths(frames[:, :2], actions, horizon=3, temperature=1.0, seeds=[5, 6])
    assert out.paths.shape == (2, 3, 4, *model.state_shape) and out.frames.shape == (2, 3, 32, 32, 3)
    scored = model.score_paths(frames[:, :2], out.paths, actions, temperature=1.0)
    # Both sides sum ~c*h*w float64 terms of float32/float64 states: a few ulps of the log-density's size.
    scale = out.logprobs.abs().max()
    eps = float(torch.finfo(dtype).eps)
    assert torch.allclose(scored.double(), out.logprobs, atol=float(scale) * eps * 64)


def test_the_tokenizer_is_frozen_not_adapted_and_saved(tiny_token_model, tmp_path):
    from posttrain.adapters import LoraSettings, apply_lora, freeze_for_full_finetune

    model = _latent(tiny_token_model)
    targets = model.lora_target_modules
    assert targets and all(name.startswith("denoiser.") for name in targets)
    freeze_for_full_finetune(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("tokenizer.") for n in trainable)
    model.train()
    assert model.denoiser.training and not model.tokenizer.training
    peft = apply_lora(_latent(tiny_token_model), LoraSettings(enabled=True, r=2))
    adapted = {n for n, _ in peft.named_parameters() if "lora_" in n}
    assert adapted and not any(".tokenizer." in n for n in adapted)
    loaded = FlowWorldModel.from_pretrained(model.save_pretrained(tmp_path / "flow"))
    assert loaded.config.space == "latent" and loaded.state_shape == model.state_shape
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    for name, value in tiny_token_model.tokenizer.state_dict().items():
        assert torch.equal(loaded.tokenizer.state_dict()[name], value), name


@pytest.mark.parametrize("space", ["pixels", "latent"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_start_rollout_and_steps_are_the_rollout(tiny_token_model, space, temperature):
    """What `posttrain play` runs (one rollout_step per key) is exactly `rollout`."""
    model = _latent(tiny_token_model) if space == "latent" else FlowWorldModel(FlowConfig(image_size=32, **SMALL)).eval()
    frames, actions = _frames(frames=3)
    context = model.encode(frames)
    full = model.rollout(context, actions, horizon=4, temperature=temperature, seeds=[1, 2])
    state = model.start_rollout(context, actions[:, :2], seeds=[1, 2])
    steps = [model.rollout_step(state, actions[:, 2 + h], temperature=temperature) for h in range(4)]
    assert torch.equal(torch.stack([s[0] for s in steps], 1), full.tokens)
    assert torch.equal(torch.stack([s[1] for s in steps], 1), full.logprobs)
    with pytest.raises(ValueError, match="context_actions"):
        model.start_rollout(context, actions[:, :1])


def test_pretrain_flow_recipe_trains_saves_and_resumes_exactly_after_sigkill(tiny_model_dir, data_cache, tmp_path):
    from conftest import sigkill_resume_and_compare, tiny_overrides

    from posttrain.models import load_model

    def overrides(out):
        return [o for o in tiny_overrides(None, data_cache, out) if not o.startswith("model=")] + [
            f"tokenizer_from={tiny_model_dir}", "extra_data=[]", "flow.image_size=32",
            "flow.block_out_channels=[8,16]", "flow.norm_num_groups=4", "flow.context_frames=2",
            "clip_frames=4", "batch_size=4", "train.micro_batch_size=2", "steps=3", "eval_every=2",
            "train.checkpoint_every=1", "train.threads=1", "train.warmup_steps=1"]

    unbroken, resumed = sigkill_resume_and_compare("recipes/pretrain_flow_tabletop.yaml", overrides, tmp_path)
    assert unbroken.keys() == resumed.keys()
    for name, value in unbroken.items():
        assert torch.equal(value, resumed[name]), name
    model = load_model(str(tmp_path / "unbroken" / "model"))
    assert isinstance(model, FlowWorldModel) and model.config.space == "latent"
    assert (tmp_path / "unbroken" / "model" / "mean_frame.png").is_file()
    start = FlowWorldModel.latent(load_model(str(tiny_model_dir)).tokenizer, model.config)
    assert all(torch.equal(model.tokenizer.state_dict()[k], v) for k, v in start.tokenizer.state_dict().items())
    assert not all(torch.equal(model.denoiser.state_dict()[k], v) for k, v in start.denoiser.state_dict().items())


@pytest.mark.parametrize("space", ["pixels", "latent"])
def test_the_protocol_score_is_the_rollouts_per_element_logprobs(tiny_token_model, space):
    """What GRPO and DPO call: forward(context + rollout tokens) == rollout log-probs, per element, and those sum
    to the paths' log-densities."""
    model = (_latent(tiny_token_model) if space == "latent"
             else FlowWorldModel(FlowConfig(image_size=32, **SMALL)).eval()).double()
    frames, actions = _frames(frames=2)
    context = model.encode(frames)
    assert context.shape == (2, 2, model.tokens_per_frame)
    out = model.rollout(context, actions, horizon=3, temperature=1.0, seeds=[7, 8])
    assert out.tokens.shape == (2, 3, model.tokens_per_frame)
    assert out.logprobs.shape == (2, 3, model.logprobs_per_frame) and out.logprobs.dtype == torch.float64
    scored = model(torch.cat([context, out.tokens], 1), actions, 2, 1.0)
    assert scored.shape == out.logprobs.shape
    scale = float(out.logprobs.abs().max())
    assert torch.allclose(scored, out.logprobs, atol=64 * scale * float(torch.finfo(torch.float64).eps))
    paths = model.rollout_paths(frames, actions, 3, temperature=1.0, seeds=[7, 8])
    assert torch.allclose(paths.logprobs, out.logprobs.view(2, 3, len(SMALL["sde_steps"]), -1).sum(-1))
    assert torch.equal(model.decode(out.tokens), paths.frames)


def test_sft_trains_a_flow_model_on_the_flow_matching_loss(tiny_token_model):
    from posttrain.sft import objective_kwargs, teacher_forced_loss

    model = _latent(tiny_token_model)
    assert objective_kwargs(model) == {"objective": "flow_matching"}
    assert objective_kwargs(tiny_token_model) == {}
    frames, actions = _frames(frames=4)
    tokens = model.encode(frames)
    torch.manual_seed(3)
    loss = teacher_forced_loss(model, tokens, actions[:, :3], num_context=1)
    torch.manual_seed(3)
    states = model.to_space(frames)
    t = torch.rand(2, 3)
    noise = torch.randn(2, 3, *model.state_shape)
    with torch.no_grad():
        expected = model._velocity_error(states, actions[:, :3], 1, t, noise).double().mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_the_embedded_flow_model_loads_and_shares_the_default_encoder():
    """`--model flow`: a latent FlowWorldModel whose frozen tokenizer has exactly the default token model's encoder,
    so the two families see frames in the same latent space (and token ids). The decoders may differ: the default
    model's was fitted to its own token rollouts (v4.1), the flow model keeps v4's, which it was trained with. The
    checkpoint stays within the 20 MB budget."""
    from posttrain.models import load_model
    from posttrain.models.registry import resolve_model_path

    folder = resolve_model_path("flow")
    assert (folder / "model.safetensors").stat().st_size <= 20 * 2 ** 20
    flow, token = load_model("flow"), load_model("default")
    assert isinstance(flow, FlowWorldModel) and flow.config.space == "latent" and flow.image_size == token.image_size
    encoder = {name: value for name, value in token.tokenizer.state_dict().items() if name.startswith("encoder.")}
    assert encoder, "the token model's tokenizer has no encoder weights"
    for name, value in encoder.items():
        assert torch.equal(flow.tokenizer.state_dict()[name], value), name
    assert (folder / "mean_frame.png").is_file() and (folder / "README.md").is_file()
