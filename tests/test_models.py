"""The base world model: tokenizer, KV-cached rollouts, exact log-probs, persistence."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from tolerances import assert_close_reordered

from posttrain.models import FrameTokenizer, TokenizerConfig, TokenWorldModel, load_model
from posttrain.models.tokenizer import FSQ


def _inputs(model, batch=2, frames=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (batch, frames, 32, 32, 3), dtype=torch.uint8, generator=generator)
    return model.encode(video)


def test_fsq_ids_and_latents_round_trip():
    fsq = FSQ((8, 5, 5, 5))
    ids = torch.arange(1000)
    latents = fsq.ids_to_latents(ids)
    assert latents.abs().max() <= 1
    # Re-quantising the decoded latents gives the same ids back.
    rounded = latents * (fsq.levels // 2)
    assert torch.equal(fsq.codes_to_ids(rounded), ids)
    assert TokenizerConfig().vocab_size == 1000 and TokenizerConfig().tokens_per_frame == 64


def test_tokenizer_shapes():
    tokenizer = FrameTokenizer(TokenizerConfig(image_size=32, downsample=8, channels=(8, 16, 16, 16), levels=(4, 4)))
    frames = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    ids = tokenizer.encode(frames)
    assert ids.shape == (2, 3, 16) and ids.max() < 16
    decoded = tokenizer.decode(ids)
    assert decoded.shape == (2, 3, 32, 32, 3) and 0 <= decoded.min() and decoded.max() <= 1


@pytest.mark.parametrize("horizon,window", [(2, 4), (7, 4), (9, 8), (10, 6)])  # 2 + horizon > window: it slides
def test_kv_cached_rollout_equals_full_recompute(horizon, window):
    model = make_tiny_model(context_frames=window).eval()
    context = _inputs(model)[:, :2]
    actions = torch.randint(0, 35, (2, 2 + horizon - 1))
    cached = model.rollout(context, actions, horizon, seeds=[3, 4], decode=False)
    full = model.rollout(context, actions, horizon, seeds=[3, 4], decode=False, use_cache=False)
    assert torch.equal(cached.tokens, full.tokens)
    assert_close_reordered(cached.logprobs, full.logprobs)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_score(temperature):
    model = make_tiny_model(context_frames=3).eval()
    context = _inputs(model)[:, :2]
    actions = torch.randint(0, 35, (2, 2 + 6 - 1))
    out = model.rollout(context, actions, 6, temperature=temperature, seeds=[1, 2], decode=False)
    scored = model.score(torch.cat([context, out.tokens], 1), actions, num_context=2, temperature=temperature)
    assert_close_reordered(scored, out.logprobs)


def test_same_seed_same_rollout_and_greedy_is_argmax():
    model = make_tiny_model().eval()
    context = _inputs(model)[:, :2]
    actions = torch.randint(0, 35, (2, 5))
    a = model.rollout(context, actions, 4, seeds=[7, 8], decode=False)
    b = model.rollout(context, actions, 4, seeds=[7, 8], decode=False)
    c = model.rollout(context, actions, 4, seeds=[7, 9], decode=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens[0], c.tokens[0])
    assert not torch.equal(a.tokens[1], c.tokens[1])
    greedy = model.rollout(context, actions, 1, temperature=0.0, decode=False)
    full = torch.cat([context, greedy.tokens], 1)
    logits = model.next_frame_logits(full, actions[:, :2], num_context=2)[:, -1]
    assert torch.equal(greedy.tokens[:, 0], logits.argmax(-1))


def test_tiny_model_overfits_one_clip():
    torch.manual_seed(0)
    model = make_tiny_model()
    tokens = _inputs(model, batch=1, frames=5)
    actions = torch.tensor([[1, 1, 7, 2]])
    optimizer = torch.optim.Adam(model.dynamics.parameters(), lr=3e-3)
    for _ in range(150):
        loss = -model.score(tokens, actions, num_context=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    model.eval()
    greedy = model.rollout(tokens[:, :1], actions, 4, temperature=0.0, decode=False)
    assert torch.equal(greedy.tokens, tokens[:, 1:])


def test_save_load_round_trip(tmp_path):
    model = make_tiny_model().eval()
    model.save_pretrained(tmp_path, metadata={"note": "test"})
    loaded = load_model(tmp_path)
    context = _inputs(model)[:, :2]
    actions = torch.randint(0, 35, (2, 4))
    a = model.rollout(context, actions, 3, seeds=[1, 2])
    b = loaded.rollout(context, actions, 3, seeds=[1, 2])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.frames, b.frames)
    assert loaded.metadata == {"note": "test"}


def test_bfloat16_weights_halve_the_file_and_load_exactly(tmp_path):
    """weights_dtype='bfloat16': floating weights stored at half the bytes; the loaded model holds exactly
    the bf16-rounded weights (in float32 parameters), and its score() equals its rollout log-probs."""
    from safetensors.torch import load_file

    model = make_tiny_model()
    model.save_pretrained(tmp_path / "f32")
    model.save_pretrained(tmp_path / "bf16", weights_dtype="bfloat16")
    stored = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.bfloat16}
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("f32", "bf16")]
    assert sizes[1] < 0.55 * sizes[0]
    loaded = TokenWorldModel.from_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["weights_dtype"] == "bfloat16"
    for key, value in loaded.state_dict().items():
        original = model.state_dict()[key]
        expected = original.to(torch.bfloat16).float() if original.is_floating_point() else original
        assert value.dtype == original.dtype and torch.equal(value, expected), key
    context, actions = _inputs(loaded)[:, :2], torch.randint(0, 35, (2, 4))
    out = loaded.rollout(context, actions, 3, seeds=[1, 2])
    scored = loaded.score(torch.cat([context, out.tokens], 1), actions, num_context=2)
    assert_close_reordered(scored, out.logprobs)
    with pytest.raises(ValueError, match="weights_dtype must be one of"):
        model.save_pretrained(tmp_path / "f16", weights_dtype="float16")
    from posttrain.pretrain import PretrainConfig

    assert PretrainConfig(weights_dtype="bfloat16").weights_dtype == "bfloat16"
    with pytest.raises(ValueError, match="weights_dtype must be one of"):
        PretrainConfig(weights_dtype="float16")


def test_saved_files_follow_the_umask(tmp_path):
    """safetensors alone writes 0600; a published model must be readable by whoever the umask allows."""
    import os

    old = os.umask(0o022)
    try:
        make_tiny_model().save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}


def test_bad_checkpoint_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenWorldModel.from_pretrained(tmp_path / "nope")
    make_tiny_model().save_pretrained(tmp_path / "ok")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        TokenWorldModel.from_pretrained(tmp_path / "no-weights")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    config["architecture"] = "SomeoneElsesModel"
    (tmp_path / "ok" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture 'SomeoneElsesModel'"):
        TokenWorldModel.from_pretrained(tmp_path / "ok")
    config["architecture"] = "posttrain.TokenWorldModel"
    config["dynamics"]["width"] = 64
    (tmp_path / "ok" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="wrong shapes"):
        TokenWorldModel.from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TokenWorldModel.from_pretrained(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match=r"neither a built-in name \(default, flow\) nor an existing folder"):
        load_model(tmp_path / "missing")


def test_model_satisfies_protocol():
    from posttrain.models import WorldModel

    assert isinstance(make_tiny_model(), WorldModel)


def test_bad_rollout_arguments():
    model = make_tiny_model().eval()
    context = _inputs(model)[:, :2]
    with pytest.raises(ValueError, match="actions must be"):
        model.rollout(context, torch.zeros(2, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="2 rollouts"):
        model.rollout(context, torch.zeros(2, 5, dtype=torch.long), 4, seeds=[1])


def _patched_model(seed: int = 0, positions: str = "learned"):
    """The new base's layout in miniature: a 4-pixel-patch tokenizer (8x8 grid at 32x32) and dynamics
    that hold a 2x2 block of tokens per position (16 positions, 4 output heads)."""
    from posttrain.models import DynamicsConfig

    torch.manual_seed(seed)
    return TokenWorldModel(
        TokenizerConfig(image_size=32, downsample=4, channels=(8, 16, 16), levels=(4, 4), decoder_blocks=1),
        DynamicsConfig(width=32, layers=2, heads=2, context_frames=3, patch=2, positions=positions)).eval()


def test_patch_grouping_round_trips_and_keeps_token_order():
    model = _patched_model()
    dynamics = model.dynamics
    tokens = torch.arange(64).view(1, 1, 64)  # an 8x8 grid, row-major
    groups = dynamics.patchify(tokens)
    assert groups.shape == (1, 1, 16, 4)
    assert groups[0, 0, 0].tolist() == [0, 1, 8, 9]  # the top-left 2x2 block
    assert groups[0, 0, 1].tolist() == [2, 3, 10, 11]
    assert torch.equal(dynamics.unpatchify(groups[..., None]).squeeze(-1), tokens)


def test_patched_tokenizer_round_trip_after_a_little_training():
    """A 4-pixel-patch tokenizer learns to reconstruct a fixed batch (MSE falls 5x) and decode(encode(x))
    equals its own forward reconstruction."""
    model = _patched_model()
    tokenizer = model.tokenizer.train()
    palette = torch.tensor([[230, 40, 40], [40, 200, 60], [30, 60, 220], [200, 200, 40]], dtype=torch.uint8)
    blocks = torch.randint(0, 4, (4, 8, 8), generator=torch.Generator().manual_seed(0))
    # One colour per 4x4 patch, four colours: what 16 codes per token can hold exactly.
    frames = palette[blocks].repeat_interleave(4, 1).repeat_interleave(4, 2)
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        recon, _ = tokenizer(frames)
        loss = ((recon - frames.float() / 255) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tokenizer.eval()
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    ids = tokenizer.encode(frames)
    assert ids.shape == (4, 64)
    with torch.no_grad():
        recon, forward_ids = tokenizer(frames)
    assert torch.equal(ids, forward_ids)
    torch.testing.assert_close(tokenizer.decode(ids), recon.clamp(0, 1))


@pytest.mark.parametrize("positions", ["learned", "rotary", "rotary+learned"])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_patched_rollout_logprobs_equal_score_and_cache(temperature, positions):
    """Cached rollouts (the window slides: 2 + 6 frames > 3), full recompute and `score` agree, for every way
    the dynamics sees space."""
    model = _patched_model(positions=positions)
    context = model.encode(torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8))
    actions = torch.randint(0, 35, (2, 2 + 6 - 1))
    out = model.rollout(context, actions, 6, temperature=temperature, seeds=[1, 2], decode=False)
    scored = model.score(torch.cat([context, out.tokens], 1), actions, num_context=2, temperature=temperature)
    assert_close_reordered(scored, out.logprobs)
    full = model.rollout(context, actions, 6, temperature=temperature, seeds=[1, 2], decode=False, use_cache=False)
    assert torch.equal(out.tokens, full.tokens)
    if temperature == 0.0:  # greedy is the argmax of the scored logits
        logits = model.next_frame_logits(torch.cat([context, out.tokens], 1), actions, 2)
        assert torch.equal(logits.argmax(-1), out.tokens)


def test_patched_model_saves_and_loads(tmp_path):
    model = _patched_model()
    model.save_pretrained(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.dynamics.config.patch == 2 and again.tokenizer.config.decoder_blocks == 1
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_rotary_positions_make_attention_scores_depend_on_offsets_only():
    """With positions="rotary", the query-key score of two cells is unchanged when both move by the same
    (row, column, frame) offset; with the learned embedding, rotary covers time only and every cell of a frame
    gets the same rotation (the embedding carries where it is)."""
    from posttrain.models.dynamics import apply_rotary

    dynamics = _patched_model(positions="rotary").dynamics  # a 4x4 grid of positions per frame
    assert dynamics.spatial_embed is None and not any("spatial" in k for k in dynamics.state_dict())
    cos, sin = dynamics.rotary_tables(torch.arange(5))
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=generator, dtype=torch.float64).unbind(0)

    def score(frame_q, cell_q, frame_k, cell_k):
        i, j = frame_q * 16 + cell_q, frame_k * 16 + cell_k
        rq = apply_rotary(q.view(1, 1, 1, 16), cos[i:i + 1].double(), sin[i:i + 1].double())
        rk = apply_rotary(k.view(1, 1, 1, 16), cos[j:j + 1].double(), sin[j:j + 1].double())
        return float((rq * rk).sum())

    def cell(row, col):
        return row * 4 + col

    reference = score(1, cell(0, 1), 0, cell(2, 0))
    for shift_frame, shift_row, shift_col in [(1, 0, 0), (0, 1, 0), (0, 0, 2), (3, 1, 1)]:
        moved = score(1 + shift_frame, cell(shift_row, 1 + shift_col), shift_frame, cell(2 + shift_row, shift_col))
        assert moved == pytest.approx(reference, rel=1e-5, abs=1e-5)
    # A different offset gives a different score: the positions are seen, not ignored.
    assert abs(score(1, cell(0, 1), 0, cell(1, 0)) - reference) > 1e-3

    learned = _patched_model(positions="learned").dynamics
    cos, _ = learned.rotary_tables(torch.arange(2))
    assert torch.equal(cos[:16], cos[:1].expand(16, -1)) and not torch.equal(cos[0], cos[16])


def test_rotary_positions_save_load_and_refusals(tmp_path):
    from posttrain.models import DynamicsConfig

    model = _patched_model(positions="rotary+learned")
    model.save_pretrained(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.dynamics.config.positions == "rotary+learned"
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="positions='sinusoidal': expected one of learned, rotary"):
        DynamicsConfig(positions="sinusoidal")
    with pytest.raises(ValueError, match="head dim of at least 6"):
        DynamicsConfig(width=16, heads=4, positions="rotary")


def test_shipped_model_config_means_learned_positions():
    """Configs written before `positions` existed (every shipped model's) load as "learned"."""
    from posttrain.models.registry import resolve_model_path

    saved = json.loads((resolve_model_path("default") / "config.json").read_text())["dynamics"]
    assert "positions" not in saved or saved["positions"] == "learned"
    assert load_model("default").dynamics.config.positions == "learned"


@pytest.mark.parametrize("temperature,num_context", [(0.0, 2), (1.0, 2), (0.7, 1)])
def test_stepping_one_frame_at_a_time_equals_rollout(temperature, num_context):
    """start_rollout + one rollout_step per action (what `posttrain play` does per key press) gives
    `rollout`'s tokens and log-probs exactly, and the full-recompute rollout's tokens, also once the
    3-frame window slides."""
    model = make_tiny_model(context_frames=3).eval()
    context = _inputs(model, frames=num_context)
    horizon = 7
    actions = torch.randint(0, 35, (2, num_context + horizon - 1), generator=torch.Generator().manual_seed(1))
    reference = model.rollout(context, actions, horizon, temperature=temperature, seeds=[5, 6], decode=False)
    full = model.rollout(context, actions, horizon, temperature=temperature, seeds=[5, 6], decode=False,
                         use_cache=False)
    state = model.start_rollout(context, actions[:, :num_context - 1], seeds=[5, 6])
    stepped = [model.rollout_step(state, actions[:, num_context - 1 + k], temperature=temperature)
               for k in range(horizon)]
    assert torch.equal(torch.stack([tokens for tokens, _ in stepped], 1), reference.tokens)
    assert torch.equal(torch.stack([logprobs for _, logprobs in stepped], 1), reference.logprobs)
    assert torch.equal(reference.tokens, full.tokens)
    assert state.frames_sampled == horizon and len(state.cache) == model.dynamics.config.layers


def test_bad_incremental_rollout_arguments():
    model = make_tiny_model().eval()
    context = _inputs(model)[:, :2]
    with pytest.raises(ValueError, match="context_actions must be"):
        model.start_rollout(context, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="2 rollouts"):
        model.start_rollout(context, torch.zeros(2, 1, dtype=torch.long), seeds=[1])
    state = model.start_rollout(context, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="action must be"):
        model.rollout_step(state, torch.zeros(2, 1, dtype=torch.long))
