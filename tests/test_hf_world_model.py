"""HFWorldModel (a transformers Llama over [frame][action]... tokens) behind the WorldModel protocol:
score == rollout log-probs, KV cache == recompute, bit-identical save/load, `posttrain models init`,
load_model dispatch, and SFT / DPO / GRPO running on it by changing `model=` only."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import split_changes, tiny_grpo_overrides, tiny_overrides
from safetensors.torch import load_file
from tolerances import assert_close_reordered

from posttrain.models import FrameTokenizer, HFWorldModel, TokenizerConfig, TokenWorldModel, load_model
from posttrain.models.hf_world_model import llama_backbone, lm_vocab_size
from posttrain.models.world_model import WorldModel, weights_hash
from posttrain.runner import run_recipe

TINY_TOKENIZER = TokenizerConfig(image_size=32, downsample=8, channels=(8, 16, 16, 16), levels=(4, 4))
NUM_ACTIONS = 35  # envs3d's


def make_tiny_hf_model(seed: int = 0, max_frames: int = 8) -> HFWorldModel:
    """2 layers, width 32, 2 heads; the conftest tiny model's tokenizer (16 tokens/frame, 16 codes)."""
    torch.manual_seed(seed)
    tokenizer = FrameTokenizer(TINY_TOKENIZER)
    backbone = llama_backbone(lm_vocab_size(TINY_TOKENIZER.vocab_size, NUM_ACTIONS), layers=2, width=32, heads=2,
                              max_positions=max_frames * (TINY_TOKENIZER.tokens_per_frame + 1))
    return HFWorldModel(backbone, tokenizer, NUM_ACTIONS).eval()


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-hf-model")
    make_tiny_hf_model().save_pretrained(path)
    return path


def base_state(folder) -> dict:
    """The HF folder's weights as the policy's state_dict names them (no single model.safetensors)."""
    return {k: v.clone() for k, v in load_model(folder).state_dict().items()}


def _prompt(batch=3, context=2, actions=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 16, (batch, context, 16), generator=generator),
            torch.randint(0, NUM_ACTIONS + 1, (batch, actions), generator=generator))


def test_implements_the_protocol():
    model = make_tiny_hf_model()
    assert isinstance(model, WorldModel)
    assert (model.tokens_per_frame, model.vocab_size, model.max_frames) == (16, 16, 8)
    assert model.lora_target_modules == ["q_proj", "v_proj"] and model.frozen_modules == ("tokenizer",)
    frames = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    tokens = model.encode(frames)
    assert tokens.shape == (2, 3, 16) and model.decode(tokens).shape == (2, 3, 32, 32, 3)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_score_equals_rollout_logprobs(temperature):
    """Greedy reports log-probs at temperature 1 (as the built-in model does); sampled ones at T."""
    model = make_tiny_hf_model()
    context, actions = _prompt()
    out = model.rollout(context, actions, 4, temperature=temperature, seeds=[1, 2, 3], decode=False)
    assert out.tokens.shape == out.logprobs.shape == (3, 4, 16)
    assert int(out.tokens.max()) < model.vocab_size  # never an action id
    scored = model.score(torch.cat([context, out.tokens], 1), actions, 2, temperature)
    assert_close_reordered(scored, out.logprobs)
    if temperature == 0.0:
        # Greedy tokens are the argmax of the frame-code logits: each has the largest log-prob.
        assert (out.logprobs <= 0).all()


def test_score_is_a_distribution_over_frame_codes():
    """Summing exp(score) over all 16 codes at one position gives 1: the action ids are outside the softmax."""
    model = make_tiny_hf_model()
    context, actions = _prompt(batch=1, actions=2)
    total = 0.0
    for code in range(16):
        frame = torch.zeros(1, 1, 16, dtype=torch.long)
        frame[0, 0, 0] = code
        with torch.no_grad():
            total += float(model.score(torch.cat([context, frame], 1), actions[:, :2], 2)[0, 0, 0].exp())
    assert total == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.8, "top_k": 5, "top_p": 0.9}])
def test_kv_cache_rollout_equals_recompute_and_seeds_replay(sampling):
    model = make_tiny_hf_model()
    context, actions = _prompt()
    cached = model.rollout(context, actions, 3, seeds=[4, 5, 6], decode=False, **sampling)
    full = model.rollout(context, actions, 3, seeds=[4, 5, 6], decode=False, use_cache=False, **sampling)
    assert torch.equal(cached.tokens, full.tokens)
    assert_close_reordered(cached.logprobs, full.logprobs)
    alone = model.rollout(context[1:2], actions[1:2], 3, seeds=[5], decode=False, **sampling)
    assert torch.equal(alone.tokens[0], cached.tokens[1])  # a seed replays its rollout whatever the batch


def test_too_long_a_sequence_is_refused():
    model = make_tiny_hf_model(max_frames=4)
    context, actions = _prompt(actions=8)
    with pytest.raises(ValueError, match="at most 4 frames"):
        model.rollout(context, actions, 3)
    with pytest.raises(ValueError, match=r"actions must be in \[0, 35\]"):
        model.score(torch.zeros(1, 2, 16, dtype=torch.long), torch.tensor([[36]]), 1)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = make_tiny_hf_model(seed=3)
    model.save_pretrained(tmp_path / "a", metadata={"note": "x"})
    loaded = load_model(tmp_path / "a")
    assert isinstance(loaded, HFWorldModel) and loaded.metadata == {"note": "x"}
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) and reloaded[k].dtype == original[k].dtype for k in original)
    context, actions = _prompt()
    a = model.rollout(context, actions, 2, seeds=[0, 1, 2], decode=False)
    b = loaded.rollout(context, actions, 2, seeds=[0, 1, 2], decode=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    # Saving the loaded model again writes the same weights: the hash adapters record is stable.
    loaded.save_pretrained(tmp_path / "b")
    assert weights_hash(tmp_path / "a") == weights_hash(tmp_path / "b")
    make_tiny_hf_model(seed=4).save_pretrained(tmp_path / "c")
    assert weights_hash(tmp_path / "c") != weights_hash(tmp_path / "a")
    assert not list((tmp_path / "a").rglob("*.bin")) and not list((tmp_path / "a").rglob("*.pt"))


def test_load_errors_name_the_problem(tmp_path):
    import shutil

    make_tiny_hf_model().save_pretrained(tmp_path / "good")

    def broken(name, edit):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        edit(folder)
        return folder

    no_tokenizer = broken("no-tok", lambda f: (f / "tokenizer.safetensors").unlink())
    with pytest.raises(FileNotFoundError, match="has no tokenizer.safetensors"):
        load_model(no_tokenizer)
    no_weights = broken("no-weights", lambda f: (f / "backbone" / "model.safetensors").unlink())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        load_model(no_weights)
    bad_json = broken("bad-json", lambda f: (f / "config.json").write_text('{"architecture": '))
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(bad_json)

    def wrong_tokenizer(folder):
        config = json.loads((folder / "config.json").read_text())
        config["tokenizer"]["levels"] = [4, 4, 4]  # 3 latent channels: other conv shapes
        (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="does not match config.json's tokenizer"):
        load_model(broken("wrong-tok", wrong_tokenizer))
    def bigger_vocab(folder):
        config = json.loads((folder / "config.json").read_text())
        config.pop("frame_vocab_size")
        config["tokenizer"]["levels"] = [8, 8]  # same conv shapes, 64 codes: more ids than the backbone embeds
        (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="the backbone embeds 52 ids but .* need 100"):
        load_model(broken("bigger-vocab", bigger_vocab))
    truncated = broken("truncated", lambda f: (f / "tokenizer.safetensors").write_bytes(b"\x00" * 10))
    with pytest.raises(ValueError, match="cannot be read"):
        load_model(truncated)


def test_load_model_dispatches_on_architecture(tiny_hf_dir, tiny_model_dir):
    assert isinstance(load_model(tiny_hf_dir), HFWorldModel)
    assert isinstance(load_model(tiny_model_dir), TokenWorldModel)
    assert isinstance(load_model("default"), TokenWorldModel)
    assert weights_hash(tiny_model_dir) == __import__("hashlib").sha256(
        (tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()  # the built-in format's hash is unchanged


def test_models_init_cli(tiny_model_dir, tmp_path, capsys):
    from posttrain.cli import main

    out = tmp_path / "fresh"
    assert main(["models", "init", "--arch", "llama", "--layers", "2", "--width", "32", "--heads", "2",
                 "--tokenizer", str(tiny_model_dir), "--max-frames", "6", "--out", str(out)]) == 0
    model = load_model(out)
    assert isinstance(model, HFWorldModel) and model.max_frames == 6
    assert model.backbone.config.num_hidden_layers == 2 and model.backbone.config.hidden_size == 32
    source = load_model(tiny_model_dir).tokenizer.state_dict()
    assert all(torch.equal(source[k], v) for k, v in model.tokenizer.state_dict().items())  # copied, not retrained
    capsys.readouterr()
    assert main(["models", "init", "--layers", "2", "--width", "32", "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["models", "init", "--arch", "gpt2", "--layers", "2", "--width", "32",
                 "--out", str(tmp_path / "other")]) == 2
    assert "only 'llama'" in capsys.readouterr().err
    assert main(["models", "init", "--layers", "2", "--width", "30", "--heads", "4",
                 "--out", str(tmp_path / "odd")]) == 2
    capsys.readouterr()
    assert main(["models", "init", "--layers", "2", "--width", "32", "--heads", "2", "--tokenizer", str(tiny_model_dir),
                 "--out", str(tiny_model_dir / "sub")]) == 2
    assert "lies inside the tokenizer's model folder" in capsys.readouterr().err
    assert not (tiny_model_dir / "sub").exists()


def _assert_only_adapter_changed(policy, folder):
    base = base_state(folder)
    changed, unchanged, adapter = split_changes(policy, base)
    assert unchanged == set(base) and not changed and adapter
    assert all(("q_proj" in k or "v_proj" in k) for k in adapter)


def test_sft_lora_runs_on_it(tiny_hf_dir, data_cache, tmp_path, captured_trainer):
    out = tmp_path / "sft"
    run_recipe("recipes/sft_tabletop.yaml", tiny_overrides(tiny_hf_dir, data_cache, out) + [
        "clip_frames=4", "batch_size=4", "train.micro_batch_size=2", "eval.horizon=2", "eval_every=1", "steps=2",
        "train.eval_at_end=false"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [0, 1]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    _assert_only_adapter_changed(captured_trainer["trainer"].policy, tiny_hf_dir)
    info = json.loads((out / "adapter" / "posttrain_adapter.json").read_text())
    assert info["base_weights_sha256"] == weights_hash(tiny_hf_dir)
    from posttrain.adapters import load_adapter

    merged = load_adapter(load_model(tiny_hf_dir), out / "adapter", str(tiny_hf_dir), merge=True)
    assert isinstance(merged, HFWorldModel)  # the adapter applies to (and merges into) its checked base
    with pytest.raises(ValueError, match="was made for base model"):
        other = tmp_path / "other-base"
        make_tiny_hf_model(seed=1).save_pretrained(other)
        load_adapter(load_model(other), out / "adapter", str(other))


def test_pretrain_recipe_full_finetune_trains_backbone_not_tokenizer(tiny_hf_dir, data_cache, tmp_path,
                                                                     captured_trainer):
    """recipes/sft_hf_tabletop.yaml: full fine-tuning (= pre-training) from a `models init` folder."""
    out = tmp_path / "pretrain"
    run_recipe("recipes/sft_hf_tabletop.yaml", tiny_overrides(tiny_hf_dir, data_cache, out) + [
        "clip_frames=4", "batch_size=4", "train.micro_batch_size=4", "eval.horizon=2", "eval_every=0", "steps=2",
        "train.warmup_steps=0", "train.checkpoint_every=0", "eval_temperatures=[0.0]"])
    base = base_state(tiny_hf_dir)
    changed, unchanged, _ = split_changes(captured_trainer["trainer"].policy, base)
    assert changed and changed | unchanged == set(base)
    assert all(k.startswith("backbone.") for k in changed)
    assert {k for k in base if k.startswith("tokenizer.")} <= unchanged
    trained = load_model(out / "model")
    assert isinstance(trained, HFWorldModel) and trained.metadata["method"] == "sft"
    summary = json.loads((out / "report" / "heldout_loss.json").read_text())
    assert summary["heldout_loss_post"] < summary["heldout_loss_base"]  # lr 1e-3 on a fresh model: it learns
    assert (out / "report" / "metrics.json").is_file()
    from posttrain.publish import export_run

    exported = export_run(out, tmp_path / "export").out  # a full fine-tune exports the HF folder whole
    assert isinstance(load_model(exported), HFWorldModel) and weights_hash(exported) == weights_hash(out / "model")


def test_dpo_lora_runs_on_it(tiny_hf_dir, data_cache, tmp_path, captured_trainer):
    out = tmp_path / "dpo"
    run_recipe("recipes/dpo_tabletop.yaml", tiny_overrides(tiny_hf_dir, data_cache, out) + [
        "horizon=4", "steps=2", "prompts_per_step=2", "train.micro_batch_size=2", "train.video_every=0",
        "eval.horizon=2", "train.eval_at_end=false"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [0, 1]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    _assert_only_adapter_changed(captured_trainer["trainer"].policy, tiny_hf_dir)


def test_forcing_lora_runs_on_it(tiny_hf_dir, data_cache, tmp_path, captured_trainer):
    """Simulator-forcing on a token-by-token backbone: `score(..., targets=)` goes through the per-prefix
    fallback, and its log-probs equal scoring each prefix + target frame on its own."""
    from posttrain.models import load_model
    from posttrain.models.world_model import forced_score_by_prefix

    model = load_model(tiny_hf_dir).eval()
    torch.manual_seed(0)
    inputs = torch.randint(model.vocab_size, (2, 4, model.tokens_per_frame))
    targets = torch.randint(model.vocab_size, (2, 2, model.tokens_per_frame))
    actions = torch.randint(8, (2, 3))
    with torch.no_grad():
        got = model.score(inputs, actions, 2, targets=targets)
        second = model.score(torch.cat([inputs[:, :3], targets[:, 1:]], 1), actions, 3)
    assert torch.equal(got, forced_score_by_prefix(model, inputs, actions, 2, 1.0, targets))
    torch.testing.assert_close(got[:, 1:], second)
    out = tmp_path / "forcing"
    run_recipe("recipes/forcing_tabletop.yaml", tiny_overrides(tiny_hf_dir, data_cache, out) + [
        "own_frames=2", "own_frames_start=1", "curriculum_steps=0", "clips_per_step=2", "steps=2",
        "train.micro_batch_size=2", "train.video_every=0", "train.eval_at_end=false", "train.tensorboard=false"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [0, 1]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    _assert_only_adapter_changed(captured_trainer["trainer"].policy, tiny_hf_dir)


def test_reward_model_recipe_runs_on_it(tiny_hf_dir, data_cache, tmp_path):
    """Reward-model training ranks pairs of the HF world model's own rollouts: changing `model=` is enough."""
    out = tmp_path / "rm"
    run_recipe("recipes/reward_model.yaml", tiny_overrides(tiny_hf_dir, data_cache, out, eval_section="") + [
        "horizon=4", "group_size=3", "reward_model.steps=4", "reward_model.batch_size=8"])
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"] + report["skipped_ties"] + report["skipped_invalid"] == report["prompts"] == 8
    assert math.isfinite(report["train_loss"])


def test_grpo_lora_runs_on_it(tiny_hf_dir, data_cache, tmp_path, captured_trainer):
    out = tmp_path / "grpo"
    run_recipe("recipes/grpo_tabletop.yaml", tiny_grpo_overrides(tiny_hf_dir, data_cache, out, steps=2, extra=[
        "eval.horizon=2", "train.eval_at_end=false", "train.checkpoint_every=0"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(math.isfinite(r["reward_mean"]) and math.isfinite(r["grad_norm"]) for r in records)
    _assert_only_adapter_changed(captured_trainer["trainer"].policy, tiny_hf_dir)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("q_proj" in k or "v_proj" in k for k in adapter)


def test_trl_grpo_trainer_trains_the_backbone_through_rollout_func(tmp_path):
    """TRL 1.16's own GRPOTrainer on HFWorldModel's Llama, with our sampler (`rollout_func`) and our
    `neg_mse` reward as a `reward_funcs` entry (the episode seed is a dataset column). Three pieces of
    glue make it work: a WordLevel tokenizer over the LM ids (TRL requires a PreTrainedTokenizerBase with
    pad/eos: the null action plays both), `env_mask` = 0 on the action ids (they are inputs, not samples),
    and an LM-head bias of -1e4 on the action ids so TRL's full-vocabulary log-probs are our frame-code
    log-probs (checked below: equal to the rollout's to 1e-5, and TRL's logged entropy <= log(16))."""
    import os

    import numpy as np
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

    from posttrain.envs3d import SceneConfig, generate_episode
    from posttrain.rewards import EpisodeBatch, RolloutBatch, get_reward

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    world = make_tiny_hf_model()
    codes, n, num_context, horizon = world.vocab_size, world.tokens_per_frame, 2, 2
    # TRL's fused LM head reads lm_head.weight/.bias directly (trl/trainer/utils.py add_fused_lm_head), so a
    # forward hook would not reach it: the frame-code restriction goes into a frozen bias instead (-1e4 on the
    # action ids underflows to probability 0 in fp32; 0 on frame codes, so our own score/rollout are unchanged).
    head = world.backbone.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[codes:] = -1e4
    world.backbone.lm_head = biased
    vocab = {**{f"f{i}": i for i in range(codes)}, **{f"a{a}": codes + a for a in range(NUM_ACTIONS + 1)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=f"a{NUM_ACTIONS}")),
                                        pad_token=f"a{NUM_ACTIONS}", eos_token=f"a{NUM_ACTIONS}")
    episodes = {seed: generate_episode(seed, num_context + horizon, SceneConfig(image_size=32)) for seed in range(4)}
    split, seen = num_context * (n + 1), {}

    def rollout_func(prompts, trainer):
        seeds = [int(p) for p in prompts]  # the prompt text is the episode seed (RepeatSampler repeats it)
        seen.setdefault("batches", []).append(seeds)
        frames = torch.stack([torch.as_tensor(episodes[s]["frames"]) for s in seeds])
        actions = torch.stack([torch.as_tensor(episodes[s]["actions"]) for s in seeds]).long()
        context = world.encode(frames[:, :num_context])
        step = trainer.state.global_step  # rollout seeds from (step, row): replayable
        out = world.rollout(context, actions, horizon, seeds=[step * 1000 + i for i in range(len(seeds))],
                            decode=False)
        ids = world.interleave(torch.cat([context, out.tokens], 1), actions[:, : num_context + horizon - 1])
        completion = ids[:, split:]  # [frame C][a_C][frame C+1]
        logprobs, mask = torch.zeros(completion.shape), torch.ones(completion.shape, dtype=torch.long)
        for h in range(horizon):
            logprobs[:, h * (n + 1): h * (n + 1) + n] = out.logprobs[:, h]
            mask[:, h * (n + 1) + n:(h + 1) * (n + 1)] = 0  # the action id after the frame was not sampled
        with torch.no_grad():  # what TRL's loss computes: log_softmax over the (hooked) LM vocabulary
            logits = world.backbone(input_ids=ids).logits[:, split - 1:-1]
        trl_logp = trl_selective_log_softmax(logits, completion)
        seen["max_logp_gap"] = max(seen.get("max_logp_gap", 0.0), float(((trl_logp - logprobs) * mask).abs().max()))
        return {"prompt_ids": ids[:, :split].tolist(), "completion_ids": completion.tolist(),
                "logprobs": logprobs.tolist(), "env_mask": mask.tolist()}

    reward = get_reward("neg_mse")

    def neg_mse(prompts, completions, completion_ids, seed, **kwargs):
        ids = torch.tensor(completion_ids)  # (B, H*(N+1) - 1)
        frames = world.decode(torch.stack([ids[:, h * (n + 1): h * (n + 1) + n] for h in range(horizon)], 1))
        batch = EpisodeBatch.from_episodes([episodes[int(s)] for s in seed])
        return reward(RolloutBatch(frames=frames, num_context=num_context), batch).tolist()

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=2,
                      max_steps=2, max_completion_length=horizon * (n + 1), learning_rate=1e-2, logging_steps=1,
                      report_to=[], bf16=False, use_cpu=True, save_strategy="no", beta=0.0)
    data = Dataset.from_dict({"prompt": [str(s) for s in range(4)], "seed": list(range(4))})
    base = {k: v.clone() for k, v in world.backbone.state_dict().items()}
    trainer = GRPOTrainer(model=world.backbone, reward_funcs=[neg_mse], args=args, train_dataset=data,
                          processing_class=tokenizer, rollout_func=rollout_func,
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.model.get_base_model() is world.backbone  # our rollouts sample from the policy TRL trains
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) and r["reward"] < 0 for r in logs)
    assert seen["max_logp_gap"] < 1e-5
    # rollout_func gets each prompt num_generations times already (one completion per row to return).
    assert all(len(b) == 4 and all(b.count(x) == 2 for x in b) for b in seen["batches"]), seen["batches"]
    assert all(r["entropy"] <= math.log(codes) + 1e-4 for r in logs), [r["entropy"] for r in logs]
    state = trainer.model.state_dict()
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in state.items())
    for name, value in state.items():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(value, base[key]), key
    assert np.isfinite(logs[-1]["grad_norm"])


def test_posttrain_eval_runs_on_it(tiny_hf_dir, data_cache, tmp_path):
    from posttrain.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_hf_dir), "--seeds", "500:502", "--horizon", "2", "--size", "32",
                 "--batch-size", "2", "--cache-dir", str(data_cache), "--json", str(out)]) == 0
    assert json.loads(out.read_text())


def test_a_registered_architecture_loads_everywhere_a_model_name_goes(tiny_model_dir, data_cache, tmp_path, capsys,
                                                                     monkeypatch):
    """A user's own model class: its folder names its architecture; `register_architecture` (or the entry
    point) tells `load_model`; the CLI's eval and a GRPO run then take the folder like any other."""
    import shutil

    from posttrain.cli import main
    from posttrain.models import registry

    loaded = []

    def load(folder, map_location):  # stands in for a user's loader; the protocol is what counts
        model = TokenWorldModel.from_pretrained(folder / "inner", map_location)
        loaded.append(folder)
        return model

    folder = tmp_path / "mine"
    shutil.copytree(tiny_model_dir, folder / "inner")
    (folder / "config.json").write_text(json.dumps({"architecture": "acme.Wrapped"}))
    monkeypatch.setattr(registry, "_ARCHITECTURES", {})
    with pytest.raises(ValueError, match="unknown architecture 'acme.Wrapped'.*register_architecture"):
        load_model(folder)
    registry.register_architecture("acme.Wrapped", load)
    assert isinstance(load_model(folder), TokenWorldModel) and loaded == [folder]
    assert main(["eval", "--model", str(folder), "--seeds", "0:2", "--size", "32", "--horizon", "2",
                 "--cache-dir", str(data_cache), "--json", str(tmp_path / "eval.json")]) == 0
    out = tmp_path / "run"
    assert main(["run", "recipes/grpo_tabletop.yaml",
                 *tiny_grpo_overrides(folder, data_cache, out, steps=1, extra=["train.eval_at_end=false"])]) == 0
    info = json.loads((out / "adapter" / "posttrain_adapter.json").read_text())
    assert info["base_weights_sha256"] == weights_hash(folder)  # every file but config.json counts
    # An entry point in the posttrain.world_models group registers it the same way.
    monkeypatch.setattr(registry, "_ARCHITECTURES", {})

    class Point:
        name = "acme.Wrapped"

        @staticmethod
        def load():
            return load

    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [Point] if group == registry.ENTRY_POINT_GROUP else [])
    assert isinstance(load_model(folder), TokenWorldModel)
