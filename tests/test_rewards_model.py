"""Learned reward model: BT loss, a learnable preference, save/load, JSONL pairs, registry."""

import dataclasses
import json
import math

import numpy as np
import torch
from PIL import Image

from posttrain.rewards import get_reward
from posttrain.rewards.reward_model import (
    PreferencePairs,
    RewardModelConfig,
    bradley_terry_loss,
    load_pairs_jsonl,
    load_reward_model,
    pairs_from_reward,
    save_reward_model,
    train_reward_model,
)
from posttrain.rewards.synthetic import blur_frames, make_episodes, truth_rollouts


def test_bt_loss_by_hand():
    assert math.isclose(float(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))), math.log(1 + math.exp(-1)),
                        rel_tol=1e-6)
    assert math.isclose(float(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))), 0.31326, abs_tol=1e-5)
    got = bradley_terry_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0]))
    assert math.isclose(float(got), (0.31326 + math.log(2)) / 2, abs_tol=1e-5)


def _sharp_vs_blurred(seeds):
    episodes = make_episodes(seeds, num_steps=4, height=32, width=32)
    gt = truth_rollouts(episodes, num_context=1)
    blurred = torch.stack([blur_frames(f, 1.5) for f in gt.frames])
    return pairs_from_reward(gt, dataclasses.replace(gt, frames=blurred), episodes, get_reward("ssim"))


def test_learns_trivial_preference_and_roundtrips(tmp_path):
    pairs = _sharp_vs_blurred(range(40))
    assert pairs.chosen.shape[0] == 40  # the verifier ranked every pair (sharp truth wins)
    cfg = RewardModelConfig(steps=60, channels=8, batch_size=16, lr=1e-2)
    model, report = train_reward_model(pairs, cfg)
    assert report["n_heldout"] == 8 and report["heldout_accuracy"] > 0.9, report
    save_reward_model(model, tmp_path / "rm", report)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["config"]["channels"] == 8
    loaded = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        assert torch.equal(loaded(pairs.chosen[:4], pairs.context[:4]), model(pairs.chosen[:4], pairs.context[:4]))
    # As a registered reward: the sharp rollout scores higher than its blurred twin.
    episodes = make_episodes(range(50, 54), num_steps=4, height=32, width=32)
    gt = truth_rollouts(episodes, num_context=1)
    blurred = dataclasses.replace(gt, frames=torch.stack([blur_frames(f, 1.5) for f in gt.frames]))
    learned = get_reward("learned", path=str(tmp_path / "rm"))
    assert (learned(gt, episodes) > learned(blurred, episodes)).all()


def test_jsonl_pairs(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    Image.fromarray(np.concatenate(list(b), axis=1)).save(tmp_path / "b.png")  # a 16 x 48 strip
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt_id": 7, "chosen": "a.npy", "rejected": "b.png"}) + "\n")
    pairs = load_pairs_jsonl(tmp_path / "pairs.jsonl")
    assert isinstance(pairs, PreferencePairs) and pairs.context is None
    assert torch.equal(pairs.chosen[0], torch.from_numpy(a).float() / 255)
    assert torch.equal(pairs.rejected[0], torch.from_numpy(b).float() / 255)
    assert pairs.prompt_ids.tolist() == [7]


def test_broken_reward_model_folders_are_one_line_errors_caught_before_any_work(tmp_path):
    import shutil

    import pytest

    from posttrain.rewards import RewardSpec, check_reward_specs
    from posttrain.rewards.reward_model import RewardModel

    good = save_reward_model(RewardModel(RewardModelConfig(channels=4)), tmp_path / "good")
    cases = {
        "run folder": (lambda f: [p.unlink() for p in f.iterdir()], "no config.json"),
        "no weights": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
        "not JSON": (lambda f: (f / "config.json").write_text("{"), "config.json"),
        "a list": (lambda f: (f / "config.json").write_text("[1]"), "config.json"),
        "no config key": (lambda f: (f / "config.json").write_text('{"report": {}}'), "config.json"),
        "bad value": (lambda f: (f / "config.json").write_text('{"config": {"channels": 0}}'), "config.json"),
        "cut short": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
                      "model.safetensors"),
        "other shape": (lambda f: (f / "config.json").write_text('{"config": {"channels": 8}}'), "model.safetensors"),
    }
    for case, (damage, word) in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        shutil.copytree(good, folder)
        damage(folder)
        with pytest.raises((ValueError, FileNotFoundError)) as raised:
            load_reward_model(folder)
        message = str(raised.value)
        assert word in message and str(folder) in message and "\n" not in message, (case, message)
        # A recipe naming it fails at the spec check, before episodes and rollouts (was a RewardFailureError
        # traceback after the first rollouts).
        with pytest.raises(ValueError, match=r"rewards\[1\]: reward 'learned'"):
            check_reward_specs([RewardSpec(name="psnr"), RewardSpec(name="learned", params={"path": str(folder)})])
    check_reward_specs([RewardSpec(name="learned", params={"path": str(good)})])


def test_broken_pair_files_are_one_line_errors_naming_the_file(tmp_path):
    import pytest

    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8, 3), np.uint8))
    np.save(tmp_path / "long.npy", np.zeros((3, 8, 8, 3), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"not a png")  # was PIL's UnidentifiedImageError (an OSError): a traceback
    line = {"prompt_id": 1, "chosen": "a.npy", "rejected": "bad.png"}
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match="bad.png: not a readable PNG"):
        load_pairs_jsonl(tmp_path / "p.jsonl")
    # Rollouts of different lengths on different lines: was torch.stack's RuntimeError traceback.
    lines = [{"prompt_id": 1, "chosen": "a.npy", "rejected": "a.npy"}, {"prompt_id": 2, "chosen": "long.npy",
                                                                         "rejected": "a.npy"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ValueError, match=r"p.jsonl:2: chosen has shape \(3, 8, 8, 3\).*p.jsonl:1"):
        load_pairs_jsonl(tmp_path / "p.jsonl")
