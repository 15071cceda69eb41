"""The post-training recipes on a flow model, changing `model=` only (issue: a second model family): GRPO (frame
and rollout credit) and DPO run on the SDE paths' exact log-probs; the first policy ratio is 1 (the update's score
is the sampler's log-probs); recipes that need what a flow model lacks refuse it by name."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_grpo_overrides, tiny_overrides

from posttrain.logging_utils import read_metrics
from posttrain.models.flow import FlowConfig, FlowWorldModel
from posttrain.runner import run_recipe

TINY = dict(image_size=32, block_out_channels=(8, 16), norm_num_groups=4, sample_steps=3, sde_steps=(0,),
            context_frames=2)


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    torch.manual_seed(0)
    return FlowWorldModel(FlowConfig(**TINY)).save_pretrained(tmp_path_factory.mktemp("flow32") / "model")


def test_the_first_ratio_is_one_in_float32():
    """GRPO's old log-probs are the sampler's; the update recomputes them with `forward`: per element, within a
    few float32 ulps of their size (so exp(new - old) is 1 to float32 precision)."""
    torch.manual_seed(1)
    model = FlowWorldModel(FlowConfig(**TINY)).eval()
    frames = torch.randint(0, 256, (3, 2, 32, 32, 3), dtype=torch.uint8)
    actions = torch.randint(0, 5, (3, 5))
    context = model.encode(frames)
    out = model.rollout(context, actions, horizon=3, temperature=1.0, seeds=[0, 1, 2])
    with torch.no_grad():
        new = model(torch.cat([context, out.tokens], 1), actions, 2, 1.0)
    ratio = torch.exp(new.double() - out.logprobs)
    scale = float(out.logprobs.abs().max())
    assert (ratio - 1).abs().max() <= 64 * max(scale, 1.0) * float(torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("credit", ["frame", "rollout"])
def test_grpo_runs_on_a_flow_model(flow_dir, data_cache, tmp_path, credit):
    out = tmp_path / f"grpo-{credit}"
    run_recipe("recipes/grpo_tabletop.yaml", tiny_grpo_overrides(flow_dir, data_cache, out, steps=2, extra=[
        f"credit={credit}", "train.threads=1", "eval.horizon=3"]))
    records = [r for r in read_metrics(out / "metrics.jsonl") if "clip_fraction" in r]
    assert len(records) == 2
    # One update per step on the weights that sampled: every ratio is 1, none clipped.
    assert all(r["clip_fraction"] == 0.0 for r in records)
    assert all(r["grad_norm"] > 0 and r["skipped_nonfinite"] == 0 for r in records)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "report" / "metrics.json").is_file()


def test_dpo_runs_on_a_flow_model(flow_dir, data_cache, tmp_path):
    out = tmp_path / "dpo"
    run_recipe("recipes/dpo_tabletop.yaml", tiny_overrides(flow_dir, data_cache, out) + [
        "horizon=4", "steps=2", "prompts_per_step=2", "train.micro_batch_size=2", "train.video_every=0",
        "eval.horizon=4", "train.threads=1"])
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_dense_credit_gives_each_latent_element_its_cells_advantage(flow_dir, data_cache, tmp_path):
    """credit: dense on a flow model: a frame's S c h w log-probs are laid out (S, c, h, w), so element
    (s, ch, i, j) takes cell (i, j)'s advantage; the main job's recipe runs on it."""
    from posttrain import credit

    model = FlowWorldModel.from_pretrained(flow_dir)
    rows, cols = credit.token_grid(model, (32, 32))
    assert (rows, cols) == model.token_grid == (32, 32)
    cells = torch.arange(2 * rows * cols, dtype=torch.float64).view(1, -1)  # 2 frames, a distinct value per cell
    expanded = credit.expand_to_logprobs(cells, (rows, cols), model.logprobs_per_frame)
    layout = expanded.view(2, len(TINY["sde_steps"]), 3, rows, cols)  # (frame, S, c, h, w)
    for s in range(layout.shape[1]):
        for ch in range(3):
            assert torch.equal(layout[:, s, ch].flatten(1), cells.view(2, -1))
    out = tmp_path / "dense"
    run_recipe("recipes/grpo_drift.yaml", tiny_grpo_overrides(flow_dir, data_cache, out, steps=1, extra=[
        "prefix_frames=0", "train.threads=1", "train.eval_at_end=false"]))
    (record,) = [r for r in read_metrics(out / "metrics.jsonl") if "clip_fraction" in r]
    assert record["clip_fraction"] == 0.0 and record["advantage_abs_mean"] > 0 and record["grad_norm"] > 0


def test_flow_sft_micro_batches_sum_to_the_full_batch_gradient(flow_dir, data_cache, tmp_path, monkeypatch):
    """The flow-matching noise is drawn per clip from (seed, step, clip), not from a shared stream: 4 clips in
    micro-batches of 1 hand the optimizer the gradient of one backward over all 4."""
    import grad_capture
    from tolerances import assert_close_reordered

    records: list = []
    grad_capture.install(records, full_batch=True, patch=monkeypatch.setattr)
    run_recipe("recipes/sft_tabletop.yaml", tiny_overrides(flow_dir, data_cache, tmp_path / "sft-micro") + [
        "clip_frames=4", "batch_size=4", "steps=1", "train.micro_batch_size=1", "train.eval_at_end=false",
        "eval_every=0", "lora.enabled=false", "train.threads=1"])
    (record,) = records
    grads, steps = record["full_batch"], record["step_grads"]
    assert any(v.abs().max() > 0 for v in grads.values())
    for key, value in grads.items():
        if key.endswith("to_k.bias"):
            # Softmax is invariant to a shift along the keys, so this gradient is zero but for rounding: its
            # terms are the size of the key weights' gradient, which is the scale to compare it at.
            scale = float(grads[key[: -len("bias")] + "weight"].abs().max())
            tolerance = 64 * float(torch.finfo(torch.float32).eps) * scale
            assert (steps[key] - value).abs().max() <= tolerance and value.abs().max() <= tolerance, key
            continue
        assert_close_reordered(steps[key], value, msg=key)


def test_grpo_on_a_flow_model_resumes_exactly_after_sigkill(flow_dir, data_cache, tmp_path):
    from conftest import sigkill_resume_and_compare

    def overrides(out):
        return tiny_grpo_overrides(flow_dir, data_cache, out, steps=3, extra=[
            "train.threads=1", "train.eval_at_end=false"])

    unbroken, resumed = sigkill_resume_and_compare("recipes/grpo_tabletop.yaml", overrides, tmp_path)
    assert unbroken.keys() == resumed.keys() and unbroken
    for name, value in unbroken.items():
        assert torch.equal(value, resumed[name]), name


def test_a_flow_lora_adapter_saves_reloads_exports_and_merges(flow_dir, data_cache, tmp_path):
    from peft import PeftModel
    from tolerances import assert_close_reordered

    from posttrain.cli import main
    from posttrain.models import load_model

    out = tmp_path / "grpo"
    run_recipe("recipes/grpo_tabletop.yaml", tiny_grpo_overrides(flow_dir, data_cache, out, steps=2, extra=[
        "train.threads=1", "train.eval_at_end=false", "train.lr=0.01"]))
    base = load_model(flow_dir).eval()
    torch.manual_seed(5)
    frames = torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8)
    actions = torch.randint(0, 5, (2, 4))
    context = base.encode(frames)
    sampled = base.rollout(context, actions, horizon=2, temperature=1.0, seeds=[0, 1])
    tokens = torch.cat([context, sampled.tokens], 1)

    def score(model):
        with torch.no_grad():
            return model(tokens, actions, 2, 1.0)

    export = tmp_path / "export"
    assert main(["adapter", "export", str(out), "--out", str(export)]) == 0
    reloaded = PeftModel.from_pretrained(load_model(flow_dir), str(export)).eval()
    adapted = score(reloaded)
    assert not torch.allclose(adapted, score(base), atol=1e-4), "the adapter changed the flow model"
    merged_dir = tmp_path / "merged"
    assert main(["adapter", "export", str(out), "--out", str(merged_dir), "--merge"]) == 0
    merged = load_model(merged_dir).eval()
    assert isinstance(merged, FlowWorldModel)
    assert_close_reordered(score(merged), adapted)


def test_diffusion_dpo_loss_is_the_hand_worked_value(tmp_path):
    """flow_score: denoising. The pair's DPO loss, from the recipe's pieces (score_kwargs, the forward, dpo_loss),
    equals Diffusion-DPO's -log sigmoid(-beta [(e_pi(c) - e_ref(c)) - (e_pi(r) - e_ref(r))]) with each e the
    summed squared velocity error at the (t, eps) drawn from the pair's seed, computed here from `velocity`."""
    import math

    from posttrain.data import EpisodeDataConfig
    from posttrain.dpo import DPOConfig, dpo_loss, pair_noise_seeds, score_kwargs

    torch.manual_seed(0)
    policy = FlowWorldModel(FlowConfig(**TINY)).eval()
    reference = FlowWorldModel(FlowConfig(**TINY)).eval()  # other weights
    frames = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)  # chosen, rejected: 2 context + 2 frames
    actions = torch.randint(0, 5, (1, 3)).expand(2, 3)
    tokens = policy.encode(frames)
    config = DPOConfig(flow_score="denoising", beta=0.01, horizon=2, data=EpisodeDataConfig(frames=4))
    kwargs = score_kwargs(config, policy, ["pair-a"], 2)
    (seed,) = pair_noise_seeds(["pair-a"]).tolist()
    assert kwargs["objective"] == "flow_matching" and kwargs["noise_seeds"].tolist() == [seed, seed]
    with torch.no_grad():
        pi = policy(tokens, actions, 2, 1.0, **kwargs).double().sum((1, 2))  # (chosen, rejected)
        ref = reference(tokens, actions, 2, 1.0, **kwargs).double().sum((1, 2))
    loss, _, _ = dpo_loss(pi[:1], pi[1:], ref[:1], ref[1:], config.beta)

    def error(model, row):
        g = torch.Generator().manual_seed(seed)
        t, eps = torch.rand(2, generator=g), torch.randn(2, 3, 32, 32, generator=g)
        x = model.to_space(frames[row])  # (4, 3, 32, 32) clean states
        total = 0.0
        for f in range(2):
            x0 = x[2 + f]
            x_t = (1 - t[f]) * x0 + t[f] * eps[f]
            with torch.no_grad():
                v = model.velocity(x_t[None], t[f:f + 1], x[f: f + 2][None], actions[row, 1 + f: 2 + f])
            total += float((v[0] - (eps[f] - x0)).double().square().sum())
        return total

    h = -(error(policy, 0) - error(reference, 0)) + (error(policy, 1) - error(reference, 1))
    expected = -math.log(1 / (1 + math.exp(-config.beta * h)))
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_dpo_with_the_diffusion_dpo_score_runs_and_refuses_a_token_model(flow_dir, tiny_model_dir, data_cache, tmp_path):
    common = ["horizon=4", "steps=2", "prompts_per_step=2", "train.micro_batch_size=2", "train.video_every=0",
              "eval.horizon=4", "train.threads=1", "flow_score=denoising", "train.eval_at_end=false"]
    out = tmp_path / "dpo"
    run_recipe("recipes/dpo_tabletop.yaml", tiny_overrides(flow_dir, data_cache, out) + common)
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    with pytest.raises(ValueError, match="flow_score=denoising"):
        run_recipe("recipes/dpo_tabletop.yaml", tiny_overrides(tiny_model_dir, data_cache, tmp_path / "token") + common)


def test_nft_loss_is_the_hand_worked_value():
    """DiffusionNFT with beta = 0.5, c = 2: one rollout of 2 elements, residuals new = (1, -2), old = (0.5, 1),
    advantage 1 -> r = 0.5 + 1/4 = 0.75.
    v+ - u = 0.5 new + 0.5 old = (0.75, -0.5); v- - u = 1.5 old - 0.5 new = (0.25, 2.5);
    per element 2 (0.75 (v+)^2 + 0.25 (v-)^2) / 0.5 = 4 (0.75 (0.5625, 0.25) + 0.25 (0.0625, 6.25))
    = 4 (0.4375, 1.75) = (1.75, 7.0); mean 4.375."""
    from posttrain.grpo import nft_loss

    new = torch.tensor([[1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    loss, stats = nft_loss(new, old, torch.tensor([1.0]), torch.tensor([True]), beta=0.5, adv_clip=2.0)
    assert float(loss.detach()) == pytest.approx(4.375, rel=1e-12) and stats["nft_positive_share"] == 1
    # d/d new: 4 (0.75 * 2 (v+) 0.5 + 0.25 * 2 (v-) (-0.5)) / 2 elements = (0.75 v+ - 0.25 v-) ... per element:
    loss.backward()
    positive, negative = torch.tensor([0.75, -0.5]), torch.tensor([0.25, 2.5])
    expected = 4 * (0.75 * 2 * positive * 0.5 + 0.25 * 2 * negative * -0.5) / 2
    assert torch.allclose(new.grad[0], expected.double())
    # An advantage at the clip or beyond is a sure positive (r = 1): the loss is then plain flow matching
    # on the positive velocity; at r = 0.5 positives and negatives weigh the same.
    sure, _ = nft_loss(new.detach(), old, torch.tensor([9.0]), torch.tensor([True]), beta=1.0, adv_clip=2.0)
    assert float(sure) == pytest.approx(2 * (1 + 4) / 2, rel=1e-12)


def test_grpo_nft_runs_on_a_flow_model_and_refuses_a_token_model(flow_dir, tiny_model_dir, data_cache, tmp_path):
    out = tmp_path / "nft"
    run_recipe("recipes/grpo_tabletop.yaml", tiny_grpo_overrides(flow_dir, data_cache, out, steps=2, extra=[
        "loss_type=nft", "credit=frame", "train.threads=1", "train.eval_at_end=false"]))
    records = [r for r in read_metrics(out / "metrics.jsonl") if "grad_norm" in r]
    assert len(records) == 2 and all(r["grad_norm"] > 0 and r["skipped_nonfinite"] == 0 for r in records)
    with pytest.raises(ValueError, match="loss_type=nft"):
        run_recipe("recipes/grpo_tabletop.yaml", tiny_grpo_overrides(tiny_model_dir, data_cache, tmp_path / "tok",
                                                                     steps=1, extra=["loss_type=nft"]))
