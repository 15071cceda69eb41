"""Simulator-forcing on a tiny model: the loss against a cross-entropy worked out frame by frame from the
raw dynamics, the context is the model's own samples (not the truth), the curriculum, exact resume
after SIGKILL, and recipe errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model, sigkill_resume_and_compare, tiny_overrides
from tolerances import assert_close_reordered

from posttrain.config import RecipeError
from posttrain.forcing import ForcingConfig, anchored_batch, anchored_nll, forcing_inputs, own_frames_at
from posttrain.logging_utils import read_metrics
from posttrain.models.world_model import forced_score_by_prefix
from posttrain.runner import run_recipe
from posttrain.sft import token_nll

RECIPE = "recipes/forcing_tabletop.yaml"
# 6-frame tiny episodes: 2 true context frames + up to 3 own frames + 1 (the tiny model's window is 4 frames,
# so the last targets see only generated frames).
SMALL = ["num_context=2", "own_frames=3", "own_frames_start=1", "curriculum_steps=2", "clips_per_step=4",
         "teacher_forced_fraction=0.5", "train.micro_batch_size=3", "train.video_every=0", "train.tensorboard=false",
         "eval.horizon=4", "eval.batch_size=4"]


def _next_frame_logp(model, prefix: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """(N, V) float64 log-probs of the frame after `prefix` (T, N), from the raw dynamics run on that
    prefix ALONE (so nothing later can leak in)."""
    with torch.no_grad():
        hidden = model.dynamics(prefix[None], actions[None])[:, -1]
        return torch.log_softmax(model.dynamics.logits(hidden).double(), -1)[0]


def test_loss_is_the_cross_entropy_of_true_frames_after_own_frames_worked_out_frame_by_frame():
    model = make_tiny_model(seed=3).eval()
    torch.manual_seed(0)
    batch, c, r, n, v = 3, 2, 3, model.tokens_per_frame, model.vocab_size
    true = torch.randint(v, (batch, c + r + 1, n))
    own = torch.randint(v, (batch, r, n))
    actions = torch.randint(8, (batch, c + r))
    teacher_forced = torch.tensor([False, True, False])
    inputs, targets = forcing_inputs(true, own, c, teacher_forced)
    loss, _ = token_nll(targets.numel())(model.score(inputs, actions, c, targets=targets), None)
    # By hand: target frame C + t is predicted from the true context then own frames 1..t (row 1: true
    # frames), running the raw dynamics on that prefix ALONE (so nothing later can leak in).
    total = 0.0
    for b in range(batch):
        context = true[b] if teacher_forced[b] else torch.cat([true[b, :c], own[b]])
        for t in range(r + 1):
            logp = _next_frame_logp(model, context[: c + t], actions[b, : c + t])
            total -= float(logp.gather(-1, true[b, c + t][:, None]).sum())
    expected = total / targets.numel()
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-5), (float(loss.detach()), expected)
    # The generic per-prefix fallback (what token-by-token models use) gives the same log-probs.
    fallback = forced_score_by_prefix(model, inputs, actions, c, 1.0, targets)
    assert_close_reordered(fallback, model.score(inputs, actions, c, targets=targets))
    # targets=None is plain teacher forcing; a wrong shape is refused.
    torch.testing.assert_close(model.score(true, actions, c, targets=true[:, c:]), model.score(true, actions, c))
    with pytest.raises(ValueError, match="targets must be"):
        model.score(inputs, actions, c, targets=targets[:, 1:])


def test_own_anchor_adds_the_cross_entropy_of_the_models_own_frames_worked_out_frame_by_frame():
    """own_anchor = w: loss = (CE of the true targets + w x CE, at each own-context position j < R, of the
    own frame the context holds next) / true target tokens, checked against the raw dynamics."""
    model = make_tiny_model(seed=5).eval()
    torch.manual_seed(1)
    batch, c, r, n, v, weight = 3, 2, 2, model.tokens_per_frame, model.vocab_size, 0.5
    true = torch.randint(v, (batch, c + r + 1, n))
    own = torch.randint(v, (batch, r, n))
    actions = torch.randint(8, (batch, c + r))
    teacher_forced = torch.tensor([True, False, False])
    rows = (~teacher_forced).nonzero().squeeze(1)
    inputs, targets = forcing_inputs(true, own, c, teacher_forced)
    (tokens, all_targets, all_actions), mask = anchored_batch(inputs, targets, actions, rows, c)
    assert tokens.shape[0] == batch + len(rows) and mask.tolist() == [[1, 1, 0], [1, 1, 0]]
    loss_fn = anchored_nll(targets.numel(), batch, mask, weight)
    logp = model.score(tokens, all_actions, c, targets=all_targets)
    # Two micro-batches, split across the truth rows and the anchor copies, sum to the one-batch loss.
    whole, stats = loss_fn(logp, torch.arange(len(tokens)))
    parts = [loss_fn(logp[i], i)[0] for i in (torch.arange(0, 2), torch.arange(2, len(tokens)))]
    torch.testing.assert_close(sum(parts), whole)

    truth_total = anchor_total = 0.0
    for b in range(batch):
        context = true[b] if teacher_forced[b] else torch.cat([true[b, :c], own[b]])
        for t in range(r + 1):
            logp_t = _next_frame_logp(model, context[: c + t], actions[b, : c + t])
            truth_total -= float(logp_t.gather(-1, true[b, c + t][:, None]).sum())
            if not teacher_forced[b] and t < r:  # the own frame the model put after this prefix
                anchor_total -= float(logp_t.gather(-1, own[b, t][:, None]).sum())
    expected = (truth_total + weight * anchor_total) / targets.numel()
    assert math.isclose(float(whole.detach()), expected, rel_tol=1e-5), (float(whole), expected)
    assert math.isclose(stats["anchor_nll"], anchor_total, rel_tol=1e-5)


def test_own_anchor_needs_greedy_own_frames():
    with pytest.raises(ValueError, match="context_temperature=0"):
        ForcingConfig(own_anchor=0.5, context_temperature=1.0)


def test_curriculum_grows_own_frames_linearly():
    config = ForcingConfig(own_frames=6, own_frames_start=2, curriculum_steps=4,
                           data=ForcingConfig().data.__class__(seeds="0:4", frames=9))
    assert [own_frames_at(s, config) for s in range(6)] == [2, 3, 4, 5, 6, 6]


def test_context_is_the_models_own_greedy_rollout_not_the_truth(tiny_model, data_cache, tmp_path, monkeypatch):
    """Step 0 (the LoRA policy still equals the base): the frames the update sees after the true context
    are exactly the base model's greedy rollout for clips not teacher-forced, and the targets the truth."""
    from posttrain import rollouts, training
    from posttrain.data import EpisodeDataConfig, load_episodes
    from posttrain.models import load_model

    seen = {}
    original = training.update

    def update(session, tokens, actions, loss_fn, **kwargs):
        seen.setdefault("batches", []).append((tokens.clone(), actions.clone(), kwargs["targets"].clone()))
        return original(session, tokens, actions, loss_fn, **kwargs)

    monkeypatch.setattr(training, "update", update)
    out = tmp_path / "own"
    run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, out) + SMALL + [
        "steps=1", "curriculum_steps=0", "train.eval_at_end=false"])
    tokens, actions, targets = seen["batches"][0]
    # The recipe's own_anchor > 0: after SMALL's 4 clips come copies of the own-context ones, whose
    # targets are their own frames (checked below).
    clips = 4
    copies = tokens[clips:], targets[clips:]
    tokens, actions, targets = tokens[:clips], actions[:clips], targets[:clips]
    c, r = 2, 3
    base = load_model(tiny_model).eval()
    episodes = load_episodes(EpisodeDataConfig(seeds="0:8", frames=6, image_size=32, cache_dir=str(data_cache)),
                             ("frames",), progress=False)
    truth = rollouts.encode_episodes(base, episodes["frames"])
    # Every target row is some episode's true frames c..c+r; find which, to know the row's episode.
    rows = [next(e for e in range(len(truth)) if torch.equal(truth[e, c: c + r + 1], targets[i]))
            for i in range(len(targets))]
    greedy = base.rollout(tokens[:, :c], actions, r, temperature=0.0, decode=False).tokens
    own_rows = [i for i in range(len(rows)) if not torch.equal(tokens[i, c: c + r], truth[rows[i], c: c + r])]
    forced_rows = [i for i in range(len(rows)) if i not in own_rows]
    assert own_rows and forced_rows, "the recipe asks for half of the clips teacher-forced"
    for i in own_rows:
        assert torch.equal(tokens[i, :c], truth[rows[i], :c])
        assert torch.equal(tokens[i, c: c + r], greedy[i])
    assert torch.equal(copies[0], tokens[own_rows]) and torch.equal(copies[1], tokens[own_rows][:, c:])
    record = [m for m in read_metrics(out / "metrics.jsonl") if m.get("step") == 0][0]
    assert record["own_frames"] == r and record["teacher_forced_clips"] == len(forced_rows)
    assert math.isfinite(record["loss"]) and math.isfinite(record["own_context_psnr"])


@pytest.mark.parametrize("context", [["context_temperature=1.0", "own_anchor=0.0"],
                                     ["context_temperature=0.0", "own_anchor=1.0"]], ids=["sampled", "anchored"])
def test_sigkill_and_resume_equals_unbroken_run(tiny_model, data_cache, tmp_path, context):
    """Killed right after checkpoint 1 of 3 and resumed: bit-identical adapter (own rollouts at T=1, so
    the sampling seeds must come back exactly too; and greedy ones with the anchor)."""
    overrides = lambda out: tiny_overrides(tiny_model, data_cache, out) + SMALL + context + [  # noqa: E731
        "steps=3", "train.checkpoint_every=1", "train.eval_at_end=false"]
    unbroken, resumed = sigkill_resume_and_compare(RECIPE, overrides, tmp_path)
    assert unbroken.keys() == resumed.keys() and any("lora_B" in k and v.abs().max() > 0 for k, v in unbroken.items())
    for key in unbroken:
        assert torch.equal(unbroken[key], resumed[key]), key


def test_own_anchor_runs_and_logs_its_loss(tiny_model, data_cache, tmp_path):
    out = tmp_path / "anchored"
    run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, out) + SMALL + [
        "steps=2", "own_anchor=0.5", "train.checkpoint_every=0", "train.eval_at_end=false"])
    records = [m for m in read_metrics(out / "metrics.jsonl") if "step" in m and "loss" in m]
    assert len(records) == 2
    for record in records:  # a step whose clips all drew teacher forcing has no own frames to anchor to
        assert math.isfinite(record["loss"])
        if record["teacher_forced_clips"] < 4:
            assert math.isfinite(record["anchor_loss"]) and record["anchor_loss"] > 0
        else:
            assert record["anchor_loss"] is None
    assert any(record["anchor_loss"] is not None for record in records)


@pytest.mark.parametrize("override, message", [
    ("own_frame=3", "own_frame"),  # a typo: unknown keys are refused, with the near miss named
    ("own_frames=9", "data.frames=6 must be at least"),
    ("own_frames_start=5", "own_frames_start=5 exceeds"),
    ("teacher_forced_fraction=1.5", "teacher_forced_fraction"),
])
def test_recipe_errors(tiny_model, data_cache, tmp_path, override, message):
    with pytest.raises((RecipeError, ValueError), match=message):
        run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, tmp_path / "bad") + SMALL + [override])
    assert not (tmp_path / "bad").exists()
