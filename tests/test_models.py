"""The base world model: tokenizer, KV-cached rollouts, exact log-probs, persistence."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

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
    torch.testing.assert_close(cached.logprobs, full.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_score(temperature):
    model = make_tiny_model(context_frames=3).eval()
    context = _inputs(model)[:, :2]
    actions = torch.randint(0, 35, (2, 2 + 6 - 1))
    out = model.rollout(context, actions, 6, temperature=temperature, seeds=[1, 2], decode=False)
    scored = model.score(torch.cat([context, out.tokens], 1), actions, num_context=2, temperature=temperature)
    torch.testing.assert_close(scored, out.logprobs, atol=1e-5, rtol=1e-5)


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
    with pytest.raises(FileNotFoundError, match="neither 'default' nor an existing folder"):
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
