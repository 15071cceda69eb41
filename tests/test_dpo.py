"""DPO: losses worked out by hand and against TRL 1.16's formula; end-to-end runs through the runner.

TRL 1.16 exposes no standalone DPO loss function: the losses are inline in
`DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py). So `test_matches_trl_formula` checks
that TRL's source still contains the lines we mirror and compares `dpo_loss` with those lines
evaluated on the same tensors:
    sigmoid: per_sequence_loss = -F.logsigmoid(self.beta * delta_score)
    ipo:     chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)  (same for rejected)
             per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2
"""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import base_state, sigkill_resume_and_compare, split_changes, tiny_overrides
from tolerances import assert_close_reordered

from posttrain.dpo import ReferenceCache, dpo_loss
from posttrain.logging_utils import read_metrics
from posttrain.rollouts import best_and_worst
from posttrain.runner import run_recipe

RECIPE = "recipes/dpo_tabletop.yaml"
SMALL = ["horizon=4", "steps=2", "prompts_per_step=2", "train.micro_batch_size=3", "train.video_every=0"]


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_sigmoid_loss_by_hand():
    """beta = 0.1, pi_c - ref_c = 1, pi_r - ref_r = -1: h = 2, beta * h = 0.2,
    loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.818731) = 0.598139;
    implicit rewards beta * log-ratio: chosen 0.1, rejected -0.1.
    With label smoothing 0.1: 0.9 * 0.598139 + 0.1 * log(1 + e^0.2) = 0.9 * 0.598139 + 0.1 * 0.798139 = 0.618139."""
    loss, chosen, rejected = dpo_loss(t(-3.0), t(-6.0), t(-4.0), t(-5.0), beta=0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)
    smoothed, _, _ = dpo_loss(t(-3.0), t(-6.0), t(-4.0), t(-5.0), beta=0.1, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.618139, abs=1e-6)


def test_ipo_loss_by_hand():
    """IPO with token averaging: log-ratios 1 and -1 over 4 tokens -> h = (1 - (-1)) / 4 = 0.5;
    beta = 0.5 -> target 1 / (2 * 0.5) = 1 -> loss (0.5 - 1)^2 = 0.25. With beta = 0.25 the
    target is 2 -> (0.5 - 2)^2 = 2.25. Equal log-ratios with beta = 0.1: (0 - 5)^2 = 25."""
    args = (t(-3.0), t(-6.0), t(-4.0), t(-5.0))
    assert dpo_loss(*args, beta=0.5, loss_type="ipo", num_tokens=4)[0].item() == pytest.approx(0.25)
    assert dpo_loss(*args, beta=0.25, loss_type="ipo", num_tokens=4)[0].item() == pytest.approx(2.25)
    assert dpo_loss(t(-1.0), t(-1.0), t(-1.0), t(-1.0), beta=0.1, loss_type="ipo")[0].item() == pytest.approx(25.0)


def test_matches_trl_formula():
    """See the module docstring: TRL's loss lines, evaluated as TRL writes them, equal ours."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    source = inspect.getsource(trl_dpo.DPOTrainer._compute_loss)
    for line in ("per_sequence_loss = -F.logsigmoid(self.beta * delta_score)",
                 "chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)",
                 "per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2"):
        assert line in source, f"TRL's DPO loss changed: {line!r} is gone"
    generator = torch.Generator().manual_seed(0)
    policy_c, policy_r, ref_c, ref_r = (-50 * torch.rand(5, generator=generator, dtype=torch.float64) for _ in range(4))
    beta, tokens = 0.3, 48
    completion_mask = torch.ones(10, tokens)  # TRL's batch is [chosen; rejected]
    chosen_scores, rejected_scores = policy_c - ref_c, policy_r - ref_r  # reverse-KL (standard DPO) scores
    delta_score = chosen_scores - rejected_scores
    trl_sigmoid = -F.logsigmoid(beta * delta_score)
    chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
    ipo_delta = (chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
                 - rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0))
    trl_ipo = (ipo_delta - 1 / (2 * beta)) ** 2
    ours_sigmoid = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)[0]
    ours_ipo = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta, "ipo", num_tokens=tokens)[0]
    torch.testing.assert_close(ours_sigmoid, trl_sigmoid)
    torch.testing.assert_close(ours_ipo, trl_ipo.to(ours_ipo))


def test_best_and_worst_skips_ties_and_invalid():
    rewards = torch.tensor([[1.0, 3.0, 2.0], [2.0, 2.0, 2.0], [5.0, float("nan"), 1.0], [4.0, 0.0, 9.0]])
    valid = torch.tensor([[True, True, True], [True, True, True], [True, False, True], [False, False, True]])
    keep, best, worst, ties, invalid = best_and_worst(rewards, valid)
    assert keep.tolist() == [True, False, True, False]
    assert (best[0].item(), worst[0].item()) == (1, 0)
    assert (best[2].item(), worst[2].item()) == (0, 2)  # the NaN sample is never picked
    assert (ties, invalid) == (1, 1)


def test_reference_cache_computes_once_and_checks_the_base(tmp_path):
    path = tmp_path / "cache.safetensors"
    calls = []

    def compute(positions):
        calls.append(positions.tolist())
        return torch.stack([positions.double(), -positions.double()], 1)

    cache = ReferenceCache(path, "hash-a")
    values, hits, misses = cache.lookup(["a", "b"], compute)
    assert (hits, misses) == (0, 2) and values.tolist() == [[0.0, 0.0], [1.0, -1.0]]
    reopened = ReferenceCache(path, "hash-a")
    values, hits, misses = reopened.lookup(["b", "c"], compute)
    assert (hits, misses) == (1, 1) and values.tolist() == [[1.0, -1.0], [1.0, -1.0]]
    assert calls == [[0, 1], [1]]
    assert ReferenceCache(path, "hash-b").values == {}  # made for another base model: ignored


def test_online_lora_end_to_end(tiny_model, data_cache, tmp_path, captured_trainer):
    out = tmp_path / "dpo"
    run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, out) + SMALL + ["eval.horizon=4"])
    records = [r for r in read_metrics(out / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        assert math.isfinite(record["loss"]) and record["pairs"] + record["skipped_ties"] + record["skipped_invalid"] == 2
        assert record["reference_cache_misses"] == record["pairs"]  # online pairs are new every step
        assert 0.0 <= record["reward_accuracy"] <= 1.0
    base = base_state(tiny_model)
    changed, unchanged, adapter = split_changes(captured_trainer["trainer"].policy, base)
    assert unchanged == set(base) and not changed and adapter  # every base weight intact; only LoRA moved
    from safetensors import safe_open

    with safe_open(str(out / "reference_cache" / "rank0.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert len(keys) == sum(r["pairs"] for r in records) and all(k.startswith("online-") for k in keys)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "report" / "metrics.json").is_file()


def test_sigkill_and_resume_equals_unbroken_run(tiny_model, data_cache, tmp_path):
    """Online DPO killed right after checkpoint 1 of 4 and resumed: bit-identical adapter, the same
    per-step losses (pairs are re-sampled from (seed, step, prompt, sample), references re-read)."""
    overrides = lambda out: tiny_overrides(tiny_model, data_cache, out) + SMALL + [  # noqa: E731
        "steps=4", "train.checkpoint_every=1", "train.eval_at_end=false", "train.lr=0.01"]
    unbroken, resumed = sigkill_resume_and_compare(RECIPE, overrides, tmp_path)
    assert unbroken.keys() == resumed.keys() and any("lora_B" in k and v.abs().max() > 0 for k, v in unbroken.items())
    for key in unbroken:
        assert torch.equal(unbroken[key], resumed[key]), key
    steps = lambda out: {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "step" in r}  # noqa: E731
    a, b = steps(tmp_path / "unbroken"), steps(tmp_path / "killed")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:
        for key in ("loss", "pairs", "reward_mean"):
            assert a[step][key] == b[step][key] or (math.isnan(a[step][key]) and math.isnan(b[step][key])), (step, key)


def test_micro_batches_sum_to_the_full_batch_gradient(tiny_model, data_cache, tmp_path, monkeypatch):
    """Online DPO, 2 pairs in micro-batches of one pair (2 rows): the gradient handed to the optimizer
    equals one backward over both pairs (gradients, not weights: see tests/grad_capture.py)."""
    import grad_capture

    records: list = []
    grad_capture.install(records, full_batch=True, patch=monkeypatch.setattr)
    run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, tmp_path / "dpo-micro") + SMALL + [
        "steps=1", "train.micro_batch_size=2", "train.eval_at_end=false"])
    assert [r["pairs"] for r in read_metrics(tmp_path / "dpo-micro" / "metrics.jsonl") if "step" in r] == [2]
    (record,) = records
    assert any("lora_B" in k and v.abs().max() > 1e-4 for k, v in record["full_batch"].items())
    for key, value in record["full_batch"].items():
        assert_close_reordered(record["step_grads"][key], value, msg=key)


def test_offline_full_finetune_ipo_reuses_cache_on_resume(tiny_model, data_cache, tmp_path, captured_trainer):
    out = tmp_path / "dpo-offline"
    overrides = tiny_overrides(tiny_model, data_cache, out) + SMALL + [
        "pairs.source=offline", "loss_type=ipo", "beta=0.5", "lora.enabled=false", "train.eval_at_end=false",
        "train.checkpoint_every=1"]
    run_recipe(RECIPE, overrides)
    changed, unchanged, _ = split_changes(captured_trainer["trainer"].policy, base_state(tiny_model))
    assert changed and all(k.startswith("dynamics.") for k in changed)
    assert all(k in unchanged for k in base_state(tiny_model) if k.startswith("tokenizer."))  # frozen
    run_recipe(RECIPE, overrides + ["steps=3"], resume=True)
    stages = [r for r in read_metrics(out / "metrics.jsonl") if r.get("stage") == "pairs"]
    assert stages[0]["reference_cache_misses"] == stages[0]["pairs"] > 0
    assert stages[1]["reference_cache_hits"] == stages[0]["pairs"] and stages[1]["reference_cache_misses"] == 0
    assert stages[1]["reused"] is True  # the offline pairs were read back, not re-sampled
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in steps] == [0, 1, 2] and all(math.isfinite(r["loss"]) for r in steps)


def test_jsonl_pairs(tiny_model, data_cache, tmp_path):
    """A person's JSONL: one pair as token ids (H, N), one as uint8 frames (H, h, w, 3)."""
    horizon, tokens_per_frame = 4, 16
    rng = np.random.default_rng(0)
    np.save(tmp_path / "c0.npy", rng.integers(0, 16, (horizon, tokens_per_frame)))
    np.save(tmp_path / "r0.npy", rng.integers(0, 16, (horizon, tokens_per_frame)))
    np.save(tmp_path / "c1.npy", rng.integers(0, 256, (horizon, 32, 32, 3), dtype=np.uint8))
    np.save(tmp_path / "r1.npy", rng.integers(0, 256, (horizon, 32, 32, 3), dtype=np.uint8))
    lines = [{"prompt_id": 3, "chosen": "c0.npy", "rejected": "r0.npy"},
             {"prompt_id": 5, "chosen": "c1.npy", "rejected": "r1.npy"}]
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "dpo-jsonl"
    run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, out) + SMALL + [
        "pairs.source=jsonl", f"pairs.path={tmp_path / 'prefs.jsonl'}", "train.eval_at_end=false"])
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["stage"] == "pairs" and records[0]["pairs"] == 2
    steps = [r for r in records if "step" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and r["pairs"] == 2 for r in steps)
    lines[0]["prompt_id"] = 999  # not an episode of data.seeds
    (tmp_path / "prefs.jsonl").write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(ValueError, match="prompt_id 999"):
        run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, tmp_path / "bad") + SMALL + [
            "pairs.source=jsonl", f"pairs.path={tmp_path / 'prefs.jsonl'}", "train.eval_at_end=false"])
    # Frames of another size: one line naming the line and the sizes (was a shape error inside encode).
    np.save(tmp_path / "c2.npy", rng.integers(0, 256, (horizon, 16, 16, 3), dtype=np.uint8))
    (tmp_path / "prefs.jsonl").write_text(json.dumps({**lines[1], "chosen": "c2.npy"}) + "\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl:1 chosen: .*c2.npy holds 16x16 frames; the model reads 32x32"):
        run_recipe(RECIPE, tiny_overrides(tiny_model, data_cache, tmp_path / "bad2") + SMALL + [
            "pairs.source=jsonl", f"pairs.path={tmp_path / 'prefs.jsonl'}", "train.eval_at_end=false"])


def test_training_makes_the_chosen_rollouts_more_likely(tiny_model, data_cache, tmp_path, captured_trainer):
    """A few DPO steps on fixed JSONL pairs raise log pi(chosen) - log pi(rejected) for every pair,
    measured with the trained policy against its own adapter-disabled base (the reference)."""
    from posttrain.data import load_episodes
    from posttrain.dpo import load_jsonl_pairs
    from posttrain.rollouts import EPISODE_FIELDS, encode_episodes
    from posttrain.runner import build_config

    horizon, tokens_per_frame = 4, 16
    rng = np.random.default_rng(1)
    lines = []
    for index, prompt in enumerate((1, 4, 6)):
        for side in ("c", "r"):
            np.save(tmp_path / f"{side}{index}.npy", rng.integers(0, 16, (horizon, tokens_per_frame)))
        lines.append({"prompt_id": prompt, "chosen": f"c{index}.npy", "rejected": f"r{index}.npy"})
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "dpo-likely"
    overrides = tiny_overrides(tiny_model, data_cache, out) + SMALL + [
        "pairs.source=jsonl", f"pairs.path={tmp_path / 'prefs.jsonl'}", "train.eval_at_end=false",
        "steps=6", "train.lr=0.01", "train.checkpoint_every=0"]
    run_recipe(RECIPE, overrides)
    trainer = captured_trainer["trainer"]
    _, config = build_config(RECIPE, overrides)
    episodes = load_episodes(config.data, EPISODE_FIELDS, progress=False)
    pairs = load_jsonl_pairs(tmp_path / "prefs.jsonl", world=trainer.world, episodes=episodes,
                             episode_tokens=encode_episodes(trainer.world, episodes["frames"]),
                             num_context=config.num_context, horizon=config.horizon)
    actions = episodes["actions"][pairs.episode_index]
    num_context = config.num_context

    @torch.no_grad()
    def margins():
        chosen = trainer.policy(pairs.chosen, actions, num_context).double().sum(dim=(1, 2))
        rejected = trainer.policy(pairs.rejected, actions, num_context).double().sum(dim=(1, 2))
        return chosen - rejected  # (P,) log pi(chosen) - log pi(rejected)

    trainer.policy.eval()
    after = margins()
    with trainer.policy.disable_adapter():
        before = margins()
    assert (after > before + 1.0).all(), (before, after)  # measured: +9 to +12 nats
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "step" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and losses[-1] < losses[0], losses
