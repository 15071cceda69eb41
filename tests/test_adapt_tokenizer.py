"""`method: adapt_tokenizer`: the decoder learns the footage, every token id stays, resume is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import sigkill_resume_and_compare, write_footage

RECIPE = "recipes/adapt_tokenizer_footage.yaml"


def _clips(count: int, frames: int = 6, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Footage-like clips: a coloured gradient with a bright square drifting across it, one per clip."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    clips = []
    for _ in range(count):
        colour = rng.uniform(0.2, 1.0, 3)
        background = (ramp[None, :, None] * colour + ramp[:, None, None] * (1 - colour)) / 2
        x, y = rng.integers(0, size - 8, 2)
        clip = np.repeat(background[None], frames, 0)
        for t in range(frames):
            left = min(size - 8, x + t)
            clip[t, y: y + 8, left: left + 8] = rng.uniform(0.5, 1.0, 3)
        clips.append((clip * 255).round().astype(np.uint8))
    return clips


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    return write_footage(tmp_path_factory.mktemp("adapt") / "footage", _clips(6))


def _overrides(model, footage, out, *extra):
    return [f"model={model}", f"data.path={footage}", f"out={out}", "heldout_fraction=0.34", "batch_size=8",
            "lr=0.003", "warmup=2", "threads=1", *extra]


PLAIN = ("reference=false", "loss=mse")
"""The decoder alone, under squared error (the recipe's defaults before the reference decoder)."""


def test_the_decoder_learns_the_footage_and_every_token_id_stays(tiny_model_dir, footage, tmp_path):
    from datasets import load_from_disk

    from posttrain.adapt_tokenizer import reconstruction_scores
    from posttrain.models import load_model
    from posttrain.runner import run_recipe

    out = tmp_path / "run"
    run_recipe(RECIPE, _overrides(tiny_model_dir, footage, out, "steps=40", "eval_every=20", "checkpoint_every=0",
                                  *PLAIN))
    base, adapted = load_model(str(tiny_model_dir)), load_model(str(out / "model"))
    base_state, adapted_state = base.state_dict(), adapted.state_dict()
    assert base_state.keys() == adapted_state.keys()
    changed = {k for k in base_state if not torch.equal(base_state[k], adapted_state[k])}
    assert changed and all(k.startswith("tokenizer.decoder.") for k in changed), sorted(changed)[:5]
    decoder = [k for k in adapted_state if k.startswith("tokenizer.decoder.")]
    assert decoder[-1] in changed and len(changed) > len(decoder) // 2  # (an untrained tiny encoder's latents can
    # all round to one FSQ code, which leaves the first convolution's weight without a gradient)

    frames = load_from_disk(str(footage)).with_format("torch", columns=["frames"], dtype=torch.uint8)[:]["frames"]
    frames = frames.reshape(-1, *frames.shape[2:])
    assert torch.equal(adapted.tokenizer.encode(frames), base.tokenizer.encode(frames))  # the dynamics' inputs
    held_out = frames[4 * 6:]  # heldout_fraction 0.34 of 6 clips: the last 2, never trained on
    before, after = reconstruction_scores(base.tokenizer, held_out), reconstruction_scores(adapted.tokenizer, held_out)
    report = json.loads((out / "report" / "tokenizer.json").read_text())
    assert report["heldout_clips"] == "4..5" and report["heldout_frames_scored"] == len(held_out)
    assert report["held_out_before"] == before and report["held_out_after"] == after  # measured on the saved model
    assert after["mse"] < 0.5 * before["mse"], (before, after)  # an untrained decoder: a large, certain drop
    assert (out / "report" / "reconstructions.png").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "held_out" in r] == [0, 20, 40]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)


ROLLOUTS = ("rollout_context=2", "rollout_horizon=3")
"""Rollouts that fit the test clips' 6 frames."""


@pytest.mark.parametrize("extra", [("reference=false",), ("reference=true",),
                                   ("reference=true", "rollouts=0.5", *ROLLOUTS)], ids=["plain", "reference", "rollouts"])
def test_resume_after_sigkill_equals_an_unbroken_run(tiny_model_dir, footage, tmp_path, extra):
    unbroken, resumed = sigkill_resume_and_compare(
        RECIPE, lambda out: _overrides(tiny_model_dir, footage, out, "steps=4", "eval_every=0", "checkpoint_every=2",
                                       *extra),
        tmp_path, kill_after=2)
    assert unbroken.keys() == resumed.keys()
    assert all(torch.equal(unbroken[k], resumed[k]) for k in unbroken)


def test_steps_draw_frames_from_seed_and_step_only():
    from posttrain.adapt_tokenizer import draw_frames

    rows = [0, 1, 2, 3]
    first = draw_frames(0, 5, rows, 6, 16)
    assert first == draw_frames(0, 5, rows, 6, 16)
    assert first != draw_frames(0, 6, rows, 6, 16) and first != draw_frames(1, 5, rows, 6, 16)
    assert all(row in rows and 0 <= frame < 6 for row, frame in first)


def test_rollout_frames_and_windows_are_pure_functions_of_their_arguments():
    from posttrain.adapt_tokenizer import draw_rollout_frames, rollout_windows

    picks = draw_rollout_frames(0, 5, (7, 3, 8), 16)
    assert picks == draw_rollout_frames(0, 5, (7, 3, 8), 16) and picks != draw_rollout_frames(0, 6, (7, 3, 8), 16)
    assert len(picks) == 16 and all(0 <= w < 7 and 0 <= r < 3 and 0 <= k < 8 for w, r, k in picks)
    # every start of a 16-frame clip that leaves room for 2 + 8 frames: 0..6; past the limit, evenly spaced
    assert rollout_windows([3, 4], 16, 2, 8, 100) == [(row, s) for row in (3, 4) for s in range(7)]
    assert rollout_windows([3, 4], 16, 2, 8, 3) == [(3, 0), (3, 6), (4, 6)]  # of 14: the 1st, 7th (6.5 rounds to
    # even) and 14th


def _adapter_for(model_dir, folder):
    """A LoRA adapter on `model_dir` whose B matrices are not zero (so it changes the dynamics' rollouts)."""
    from posttrain.adapters import LoraSettings, apply_lora, save_adapter
    from posttrain.models import load_model, weights_hash

    torch.manual_seed(1)
    peft = apply_lora(load_model(str(model_dir)), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return save_adapter(peft, folder, str(model_dir), weights_hash(model_dir), {"method": "test"})


def test_a_rollout_step_decodes_the_drawn_guesses_beside_their_windows_last_true_frame(tiny_model_dir, footage,
                                                                                       tmp_path):
    """With rollouts=1 a step's loss is, by hand: the cached rollout frames `draw_rollout_frames` picks, decoded
    beside their window's last true frame (k + 1 frames back for the k-th predicted frame), against the true
    frames they stand for. The report's decoded held-out rollouts are the saved model's."""
    from datasets import load_from_disk
    from safetensors.torch import load_file

    from posttrain.adapt_tokenizer import (
        draw_rollout_frames,
        load_checkpoint,
        read_frames,
        read_windows,
        rollout_scores,
        rollout_windows,
        with_reference_path,
    )
    from posttrain.models import load_model
    from posttrain.runner import run_recipe

    out = tmp_path / "run"
    run_recipe(RECIPE, _overrides(tiny_model_dir, footage, out, "steps=3", "eval_every=0", "checkpoint_every=1",
                                  "rollouts=1.0", *ROLLOUTS))
    cache = load_file(str(out / "rollout_tokens.safetensors"))
    tokens, held_tokens = cache["train"], cache["held_out"]
    windows = rollout_windows(list(range(4)), 6, 2, 3, 256)  # 4 training clips x starts 0, 1
    assert tokens.shape[:3] == (len(windows), 3, 3) and held_tokens.shape[:3] == (2, 2, 3)

    # The decoder as the last step found it (checkpoint 2: its gate already weighs the reference's age, which
    # a fresh gate ignores), and that step's draw.
    tokenizer = with_reference_path(load_model(str(tiny_model_dir)), "tiny").tokenizer
    modules = tokenizer.decoding_modules
    optimizer = torch.optim.Adam([p for module in modules for p in module.parameters()])
    assert load_checkpoint(out, tokenizer, optimizer) == 2
    dataset = load_from_disk(str(footage))
    picks = draw_rollout_frames(0, 2, tuple(tokens.shape[:3]), 8)
    ids = torch.stack([tokens[w, r, k] for w, r, k in picks])
    truth = read_frames(dataset, [(windows[w][0], windows[w][1] + 2 + k) for w, _, k in picks]).float() / 255
    last = read_frames(dataset, [(windows[w][0], windows[w][1] + 1) for w, _, _ in picks])
    with torch.no_grad():
        drawn = tokenizer.draw(ids, last, torch.tensor([k + 1 for _, _, k in picks]))
    expected = float(((drawn - truth) ** 2).mean())
    last_step = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][3]
    assert last_step["step"] == 3
    assert abs(last_step["loss"] - expected) <= 64 * torch.finfo(torch.float32).eps * max(expected, 1e-3), \
        (last_step, expected)

    report = json.loads((out / "report" / "tokenizer.json").read_text())
    frames, _ = read_windows(dataset, [(4, 0), (5, 0)], 5)
    assert report["held_out_rollouts"]["after"] == rollout_scores(load_model(str(out / "model")).tokenizer,
                                                                  held_tokens, frames, 2)
    assert report["held_out_rollouts"]["windows"] == 2 and report["rollouts"] == 1.0


def test_rollouts_from_an_adapter_and_the_adapter_rebased_onto_the_adapted_model(tiny_model_dir, footage, tmp_path):
    from safetensors.torch import load_file

    from posttrain.adapt_tokenizer import own_rollouts, rollout_windows
    from posttrain.adapters import load_adapter
    from posttrain.evaluate import load_with_adapter
    from posttrain.models import load_model, weights_hash
    from posttrain.runner import run_recipe

    adapter = _adapter_for(tiny_model_dir, tmp_path / "sft-adapter")
    out = tmp_path / "run"
    run_recipe(RECIPE, _overrides(tiny_model_dir, footage, out, "steps=4", "eval_every=0", "checkpoint_every=0",
                                  "rollouts=0.5", f"adapter={adapter}", *ROLLOUTS))
    from datasets import load_from_disk

    dataset = load_from_disk(str(footage))
    windows = rollout_windows(list(range(4)), 6, 2, 3, 256)
    tokens = load_file(str(out / "rollout_tokens.safetensors"))["train"]
    assert torch.equal(tokens, own_rollouts(load_with_adapter(str(tiny_model_dir), str(adapter)), dataset, windows,
                                            2, 3, 0))
    assert not torch.equal(tokens, own_rollouts(load_model(str(tiny_model_dir)), dataset, windows, 2, 3, 0))
    info = json.loads((out / "adapter" / "posttrain_adapter.json").read_text())
    assert info["base_weights_sha256"] == weights_hash(out / "model")
    assert info["rebased_from"]["base_weights_sha256"] == weights_hash(tiny_model_dir)
    assert load_file(str(out / "adapter" / "adapter_model.safetensors")).keys() == \
        load_file(str(adapter / "adapter_model.safetensors")).keys()
    original = load_file(str(adapter / "adapter_model.safetensors"))
    assert all(torch.equal(v, original[k]) for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items())
    load_adapter(load_model(str(out / "model")), out / "adapter", base_name=str(out / "model"))  # the check passes
    with pytest.raises(ValueError, match="was made for base model"):
        load_adapter(load_model(str(tiny_model_dir)), out / "adapter", base_name=str(tiny_model_dir))

    # `adapter export --merge` of the run folder: one model with the fitted decoder and the adapter's dynamics.
    from posttrain.publish import export_run

    export_run(out, tmp_path / "export", merge=True)
    merged = load_model(str(tmp_path / "export")).state_dict()
    expected = load_with_adapter(str(out / "model"), str(out / "adapter")).state_dict()
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "adapt_tokenizer post-training" in card and "rollouts: 0.5" in card
    # The card quotes the run's own held-out report (not the last training step), and names the adapter it carries.
    report = json.loads((out / "report" / "tokenizer.json").read_text())
    before, after = report["held_out_before"], report["held_out_after"]
    assert f"| reconstruction PSNR (dB) of true frames | {before['psnr_db']:.5g} | {after['psnr_db']:.5g} |" in card
    rollouts = report["held_out_rollouts"]
    t1 = [line for line in card.splitlines() if line.startswith("| rollout SSIM, T=1")]
    assert len(t1) == 1 and t1[0].endswith(f"| {rollouts['before']['T=1']['ssim']:.5g} | "
                                           f"{rollouts['after']['T=1']['ssim']:.5g} |"), t1
    assert "the rollouts of the adapter sft-adapter (a local adapter), re-based onto the fitted decoder" in card
    assert "the last record of metrics.jsonl" not in card


def _one_line_error(capsys, argv) -> str:
    from posttrain.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("posttrain: error: "), err
    return err


def test_bad_inputs_are_one_line_errors_before_any_work(tiny_model_dir, footage, tmp_path, capsys):
    from posttrain.cli import main

    pixels = tmp_path / "pixels-flow"
    assert main(["models", "init", "--arch", "flow", "--layers", "1", "--width", "8", "--size", "32",
                 "--out", str(pixels)]) == 0
    capsys.readouterr()
    big = write_footage(tmp_path / "big", _clips(3, size=64))
    from conftest import make_tiny_model

    make_tiny_model(seed=5).save_pretrained(tmp_path / "other-model")
    other_adapter = _adapter_for(tmp_path / "other-model", tmp_path / "other-adapter")
    cases = {
        "no frame tokenizer": (_overrides(pixels, footage, tmp_path / "a"), "has no frame tokenizer"),
        "frame size": (_overrides(tiny_model_dir, big, tmp_path / "b"), "--size 32"),
        "nothing held out": (_overrides(tiny_model_dir, footage, tmp_path / "c", "heldout_fraction=0"),
                             "heldout_fraction=0"),
        "too few clips": (_overrides(tiny_model_dir, write_footage(tmp_path / "one", _clips(1)), tmp_path / "d"),
                          "too few"),
        "output inside the footage": (_overrides(tiny_model_dir, footage, footage / "run"), str(footage)),
        "unknown loss": (_overrides(tiny_model_dir, footage, tmp_path / "e", "loss=ssim"), "mse, ssim_l1"),
        "adapter without rollouts": (_overrides(tiny_model_dir, footage, tmp_path / "f", f"adapter={footage}"),
                                     "set rollouts above 0"),
        "rollouts longer than a clip": (_overrides(tiny_model_dir, footage, tmp_path / "g", "rollouts=0.5",
                                                   "rollout_horizon=5"), "too short for rollouts"),
        "rollouts share": (_overrides(tiny_model_dir, footage, tmp_path / "h", "rollouts=1.5"), "rollouts=1.5"),
        "object weight on footage": (_overrides(tiny_model_dir, footage, tmp_path / "j", "object_weight=5"),
                                     "no 'segmentation' column"),
        "adapter for another base": (_overrides(tiny_model_dir, footage, tmp_path / "i", "rollouts=0.5", *ROLLOUTS,
                                                f"adapter={other_adapter}"), "was made for base model"),
    }
    capsys.readouterr()  # the datasets writer's own progress lines
    for name, (overrides, expected) in cases.items():
        err = _one_line_error(capsys, ["run", RECIPE, *overrides])
        assert expected in err, (name, err)
    assert not any((tmp_path / name).exists() for name in "abcdefghij")
    assert not (footage / "run").exists()


def test_a_latent_flow_model_gets_its_decoder_adapted_too(tiny_model_dir, footage, tmp_path, capsys):
    """A flow model in a tokenizer's latent space decodes through that tokenizer: the same run adapts it, and the
    denoiser is untouched."""
    from posttrain.cli import main
    from posttrain.models import load_model

    flow = tmp_path / "latent-flow"
    assert main(["models", "init", "--arch", "unet2d", "--space", "latent", "--tokenizer", str(tiny_model_dir),
                 "--layers", "1", "--width", "8", "--out", str(flow)]) == 0
    out = tmp_path / "run"
    assert main(["run", RECIPE, *_overrides(flow, footage, out, "steps=3", "eval_every=0", "checkpoint_every=0",
                                            *PLAIN)]) == 0
    base, adapted = load_model(str(flow)).state_dict(), load_model(str(out / "model")).state_dict()
    changed = {k for k in base if not torch.equal(base[k], adapted[k])}
    assert changed and all(k.startswith("tokenizer.decoder.") for k in changed), sorted(changed)[:5]


def test_a_reference_frame_lets_the_decoder_copy_what_did_not_move(tiny_model_dir, footage, tmp_path):
    """The clips' backgrounds hold still while a square drifts: decoded beside the previous frame, a frame is
    mostly that frame, so the reference path must beat the plain decoder by far on held-out clips."""
    from datasets import load_from_disk

    from posttrain.adapt_tokenizer import reconstruction_scores
    from posttrain.models import load_model
    from posttrain.runner import run_recipe

    out = tmp_path / "run"
    run_recipe(RECIPE, _overrides(tiny_model_dir, footage, out, "steps=60", "eval_every=0", "checkpoint_every=0",
                                  "reference_gap=2"))  # the recipe's reference: true and loss: ssim_l1
    base, adapted = load_model(str(tiny_model_dir)), load_model(str(out / "model"))
    assert adapted.decodes_with_reference and not base.decodes_with_reference
    base_state, adapted_state = base.state_dict(), adapted.state_dict()
    added = set(adapted_state) - set(base_state)
    assert added == {f"tokenizer.reference_{part}.{kind}" for part in ("in", "gate.0", "gate.2")
                     for kind in ("weight", "bias")}
    changed = {k for k in base_state if not torch.equal(base_state[k], adapted_state[k])}
    assert changed and all(k.startswith("tokenizer.decoder.") for k in changed), sorted(changed)[:5]

    clips = load_from_disk(str(footage)).with_format("torch", columns=["frames"], dtype=torch.uint8)[:]["frames"]
    held_out = clips[4:, 1:].reshape(-1, *clips.shape[2:])  # the 2 held-out clips, frames 1..5
    previous = clips[4:, :-1].reshape(-1, *clips.shape[2:])
    assert torch.equal(adapted.tokenizer.encode(held_out), base.tokenizer.encode(held_out))
    plain = reconstruction_scores(adapted.tokenizer, held_out)
    with_reference = reconstruction_scores(adapted.tokenizer, held_out, references=previous)
    assert with_reference["mse"] < 0.5 * plain["mse"], (plain, with_reference)
    report = json.loads((out / "report" / "tokenizer.json").read_text())
    assert report["reference"] is True and report["loss"] == "ssim_l1" and "with_previous_frame" in report["held_out_after"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["objective"]) for r in records if "loss" in r)


def test_reference_is_refused_for_a_latent_flow_model(tiny_model_dir, footage, tmp_path, capsys):
    from posttrain.cli import main

    flow = tmp_path / "latent-flow"
    assert main(["models", "init", "--arch", "unet2d", "--space", "latent", "--tokenizer", str(tiny_model_dir),
                 "--layers", "1", "--width", "8", "--out", str(flow)]) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, ["run", RECIPE, *_overrides(flow, footage, tmp_path / "run", "reference=true")])
    assert "reference: true" in err and "FlowWorldModel" in err, err
    assert not (tmp_path / "run" / "model").exists()


def test_the_restoration_loss_by_hand():
    """0.84 (1 - SSIM) + 0.16 L1: zero for equal frames; for a flat grey against a flat grey 0.1 brighter,
    SSIM is the luminance term alone, (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), and L1 is 0.1."""
    from posttrain.adapt_tokenizer import restoration_loss

    frames = torch.rand(2, 16, 16, 3, dtype=torch.float64)
    assert restoration_loss(frames, frames).item() == 0.0
    a, b = torch.full((1, 16, 16, 3), 0.4, dtype=torch.float64), torch.full((1, 16, 16, 3), 0.5, dtype=torch.float64)
    c1 = 0.01 ** 2
    luminance = (2 * 0.4 * 0.5 + c1) / (0.4 ** 2 + 0.5 ** 2 + c1)
    expected = 0.84 * (1 - luminance) + 0.16 * 0.1
    # The variances come out as E[x^2] - E[x]^2 (cancellation at the scale of 0.5^2) and are divided by C2.
    tolerance = 16 * torch.finfo(torch.float64).eps * 0.5 ** 2 / 0.03 ** 2
    assert abs(restoration_loss(a, b).item() - expected) < tolerance


def test_a_sequence_reference_is_one_frame_older_at_each_step():
    """One reference per sequence is the last true frame before it: frame t is t + 1 frames after it. One
    reference per frame is the frame just before it."""
    from posttrain.models.tokenizer import FrameTokenizer, TokenizerConfig

    tokenizer = FrameTokenizer(TokenizerConfig(image_size=32, downsample=4, channels=(8, 8, 8), levels=(4, 4),
                                               reference=True))
    lead = torch.Size((2, 3))
    reference = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    frames, gaps = tokenizer._references(reference, lead)
    assert gaps.tolist() == [1, 2, 3, 1, 2, 3]
    assert torch.equal(frames[4], reference[1]) and frames.shape == (6, 32, 32, 3)
    per_frame = reference[:, None].expand(2, 3, 32, 32, 3)
    assert tokenizer._references(per_frame, lead)[1].tolist() == [1] * 6
    with pytest.raises(ValueError, match="one per frame, or one per sequence"):
        tokenizer._references(reference[:1], lead)


def test_resume_with_another_recipe_is_refused(tiny_model_dir, footage, tmp_path, capsys):
    """A checkpoint continues only the run that wrote it: another lr (or rollouts share) is one line, exit 2."""
    from posttrain.runner import run_recipe

    out = tmp_path / "run"
    run_recipe(RECIPE, _overrides(tiny_model_dir, footage, out, "steps=2", "eval_every=0", "checkpoint_every=1"))
    before = (out / "model" / "model.safetensors").read_bytes()
    for change, named in (("lr=0.001", "lr (0.003 -> 0.001)"), ("rollouts=0.5", "rollouts (0.0 -> 0.5)")):
        err = _one_line_error(capsys, ["run", RECIPE, *_overrides(tiny_model_dir, footage, out, "steps=2",
                                                                   "eval_every=0", "checkpoint_every=1", change,
                                                                   *ROLLOUTS), "--resume"])
        assert named in err, err
    assert (out / "model" / "model.safetensors").read_bytes() == before


def test_the_object_term_is_the_mean_absolute_error_over_object_pixels(tiny_model_dir, data_cache, tmp_path):
    """On envs3d episodes, `object_weight` adds w x the mean |recon - truth| over the simulator's object pixels:
    the last step's record, recomputed by hand from checkpoint 2 (true frames' ids and rollouts both)."""
    from datasets import load_from_disk
    from safetensors.torch import load_file

    from posttrain.adapt_tokenizer import (
        draw_frames,
        draw_rollout_frames,
        load_checkpoint,
        read_frames,
        restoration_loss,
        rollout_windows,
    )
    from posttrain.data import EpisodeDataConfig, dataset_path
    from posttrain.models import load_model
    from posttrain.runner import run_recipe

    data = ["data.path=", "data.seeds=0:6", "data.frames=6", "data.image_size=32", f"data.cache_dir={data_cache}",
            "data.workers=1"]
    out = tmp_path / "run"
    run_recipe(RECIPE, [f"model={tiny_model_dir}", f"out={out}", *data, "heldout_fraction=0.34", "batch_size=8",
                        "lr=0.003", "warmup=2", "threads=1", "steps=3", "eval_every=0", "checkpoint_every=1",
                        "reference=false", "rollouts=0.5", *ROLLOUTS, "object_weight=5"])
    dataset = load_from_disk(str(dataset_path(EpisodeDataConfig(seeds="0:6", frames=6, image_size=32,
                                                                cache_dir=str(data_cache), workers=1))))
    tokenizer = load_model(str(tiny_model_dir)).tokenizer
    optimizer = torch.optim.Adam(tokenizer.decoder.parameters())
    assert load_checkpoint(out, tokenizer, optimizer) == 2
    pairs = draw_frames(0, 2, [0, 1, 2, 3], 6, 4)
    windows = rollout_windows([0, 1, 2, 3], 6, 2, 3, 256)
    tokens = load_file(str(out / "rollout_tokens.safetensors"))["train"]
    picks = draw_rollout_frames(0, 2, tuple(tokens.shape[:3]), 4)
    targets = [(windows[w][0], windows[w][1] + 2 + k) for w, _, k in picks]
    with torch.no_grad():
        recon = torch.cat([tokenizer(read_frames(dataset, pairs))[0],
                           tokenizer.draw(torch.stack([tokens[w, r, k] for w, r, k in picks]))])
    truth = read_frames(dataset, pairs + targets).float() / 255
    objects = read_frames(dataset, pairs + targets, "segmentation") > 0
    assert objects.any() and not objects.all()
    expected = float((recon - truth).abs()[objects].mean())
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][3]
    assert record["step"] == 3
    assert abs(record["object_l1"] - expected) <= 64 * torch.finfo(torch.float32).eps * max(expected, 1e-3)
    rest = float(restoration_loss(recon, truth))  # the recipe's ssim_l1 over the whole frames, beside it
    assert abs(record["objective"] - (rest + 5 * expected)) <= 64 * torch.finfo(torch.float32).eps * (rest + 5 * expected)


def test_the_reports_greedy_gif_decodes_beside_the_last_true_frame_as_eval_does():
    """report.greedy_pair (the run report's and SFT's rollout.gif) draws a reference decoder's frames beside the last
    true context frame, as `posttrain eval`'s metrics do, not with the plain path."""
    import copy

    from conftest import make_tiny_reference_model

    from posttrain.report import greedy_pair
    from posttrain.rollouts import decode_frames

    generator = torch.Generator().manual_seed(0)
    model = make_tiny_reference_model(3, generator)
    base = copy.deepcopy(model)  # a "base" whose dynamics differ, so that the pair's two sides are told apart
    with torch.no_grad():
        for parameter in base.dynamics.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    frames = torch.randint(0, 256, (1, 2, 32, 32, 3), dtype=torch.uint8, generator=generator)
    reference = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8, generator=generator)
    context = model.encode(frames)
    actions = torch.zeros(1, 4, dtype=torch.long)
    before, after = greedy_pair(model, base, context, actions, 3, seed=5, reference=reference)
    tokens = model.rollout(context, actions, 3, temperature=0.0, seeds=[5], decode=False).tokens
    with torch.no_grad():
        drawn, plain = decode_frames(model, tokens, reference), model.decode(tokens)
    assert torch.equal(after, drawn)
    assert not torch.equal(after, plain)  # the test can tell the two paths apart
    base_tokens = base.rollout(context, actions, 3, temperature=0.0, seeds=[5], decode=False).tokens
    assert not torch.equal(base_tokens, tokens)
    with torch.no_grad():
        assert torch.equal(before, decode_frames(base, base_tokens, reference))
