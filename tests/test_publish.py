"""The studio flow on a tiny model: footage -> LoRA SFT -> adapter export (PEFT folder + model card) -> reload
equals the in-memory policy; merged export equals base + adapter; a different base is refused; push is mocked."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from conftest import make_tiny_model
from tolerances import assert_close_reordered

from posttrain.adapters import load_adapter
from posttrain.cli import main
from posttrain.data import EpisodeDataConfig, load_episodes
from posttrain.models import load_model, weights_hash
from posttrain.rollouts import encode_episodes

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
RECIPE = "recipes/sft_lora_footage.yaml"


def _make_video(path, seconds: int) -> None:
    """A moving test pattern at 8 fps (ingest keeps every frame)."""
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", "testsrc=size=48x40:rate=8", "-t", str(seconds), "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(path)], check=True)


def _score(model, tokens, actions):
    model.eval()
    with torch.no_grad():
        return model(tokens, actions, 1)


def test_studio_flow_footage_to_exported_adapter(tiny_model, tmp_path, captured_trainer, capsys):
    videos = tmp_path / "my_videos"
    videos.mkdir()
    _make_video(videos / "take.mp4", 4)  # 32 frames at 8 fps -> 5 clips of 6 frames
    footage = tmp_path / "footage"
    assert main(["footage", "ingest", str(videos), "--out", str(footage), "--size", "32", "--clip-frames", "6",
                 "--quiet"]) == 0
    run_dir = tmp_path / "run"
    assert main(["run", RECIPE, f"model={tiny_model}", f"out={run_dir}", f"data.path={footage}", "steps=2",
                 "clip_frames=4", "batch_size=4", "train.micro_batch_size=4", "train.lr=0.01", "eval_every=1",
                 "heldout_fraction=0.2", "train.checkpoint_every=0", "train.tensorboard=false", "eval.horizon=4"]) == 0
    held = json.loads((run_dir / "report" / "heldout_loss.json").read_text())
    assert held["heldout_clips"] == 1 and math.isfinite(held["heldout_loss_post"])
    trainer = captured_trainer["trainer"]
    clips = load_episodes(EpisodeDataConfig(path=str(footage)), ("frames", "actions"), progress=False)
    assert clips["frames"].shape[0] == 5  # 5 clips: 4 trained on, the last one held out (heldout_clips == 1)

    export = tmp_path / "export"
    assert main(["adapter", "export", str(run_dir), "--out", str(export)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "posttrain_adapter.json", "README.md"} <= {
        p.name for p in export.iterdir()}
    card = (export / "README.md").read_text()
    assert str(tiny_model) not in card and str(tmp_path) not in card and tiny_model.name in card and weights_hash(tiny_model) in card
    assert "method: sft" in card and "heldout_fraction: 0.2" in card  # the recipe, as YAML
    assert f"footage dataset `{footage.name} (a local dataset)`, 5 clips" in card
    assert f"| held-out loss | {held['heldout_loss_base']:.5g} | {held['heldout_loss_post']:.5g} |" in card
    assert "envs3d" not in card  # the held-out clips come from the footage, not eval.data
    # The card quotes the held-out rollout report on the footage: base vs fine-tuned beside both baselines.
    rollouts = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert f"Held-out rollouts (clips 4..4 of {footage.name} (a local dataset), horizon 4)" in card
    for temperature, pair in rollouts["temperatures"].items():
        base_ssim, post_ssim = pair["base"]["ssim_mean"], pair["post"]["ssim_mean"]
        persistence = pair["base"]["baselines"]["persistence"]["ssim_mean"]
        mean_image = pair["base"]["baselines"]["mean_image"]["ssim_mean"]
        assert (f"| {temperature} | ssim_mean | {persistence:.5g} | {mean_image:.5g} | {base_ssim:.5g} | "
                f"{post_ssim:.5g} |") in card
    assert "consistency_3d_mean" not in card and "object_presence_mean" not in card  # no simulator metrics
    # The footage run's base-vs-fine-tuned rollout GIF travels with the adapter and is embedded in the card.
    assert (export / "rollout.gif").read_bytes() == (run_dir / "report" / "rollout.gif").read_bytes()
    assert "![rollout](rollout.gif)" in card

    from peft import PeftModel

    tokens, actions = encode_episodes(trainer.world, clips["frames"][:3, :4]), clips["actions"][:3, :3]
    in_memory = _score(trainer.policy, tokens, actions)
    reloaded = _score(PeftModel.from_pretrained(load_model(tiny_model), str(export)), tokens, actions)
    base = _score(load_model(tiny_model), tokens, actions)
    assert not torch.allclose(in_memory, base, atol=1e-4)  # the adapter changed the model
    torch.testing.assert_close(reloaded, in_memory, rtol=0, atol=1e-6)

    merged_dir = tmp_path / "merged"
    assert main(["adapter", "export", str(run_dir), "--out", str(merged_dir), "--merge"]) == 0
    assert (merged_dir / "config.json").is_file() and (merged_dir / "model.safetensors").is_file()
    assert_close_reordered(_score(load_model(merged_dir), tokens, actions), in_memory)
    assert weights_hash(merged_dir) in (merged_dir / "README.md").read_text()

    # An adapter trained on tiny model A refuses tiny model B (other weights), naming both.
    other = make_tiny_model(seed=1).save_pretrained(tmp_path / "tiny-b")
    with pytest.raises(ValueError) as refused:
        load_adapter(load_model(other), export, base_name=str(other))
    assert str(tiny_model) in str(refused.value) and str(other) in str(refused.value)

    # Exporting again over an existing folder needs --overwrite; the error names the folder.
    capsys.readouterr()
    assert main(["adapter", "export", str(run_dir), "--out", str(export)]) == 2
    err = capsys.readouterr().err
    assert str(export) in err and "--overwrite" in err
    assert main(["adapter", "export", str(run_dir), "--out", str(export), "--overwrite"]) == 0


def _fake_full_finetune(tiny_model, run_dir):
    """A finished full fine-tuning run folder: model/, config.json and metrics.jsonl (no report)."""
    make_tiny_model(seed=2).save_pretrained(run_dir / "model", metadata={
        "method": "sft", "base": str(tiny_model), "base_weights_sha256": weights_hash(tiny_model)})
    (run_dir / "config.json").write_text(json.dumps({"method": "sft", "model": str(tiny_model), "data": {
        "seeds": "0:8", "frames": 6, "image_size": 32, "path": ""}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n")
    return run_dir


def test_full_finetune_export_copies_the_model(tiny_model, tmp_path, capsys):
    run_dir = _fake_full_finetune(tiny_model, tmp_path / "run")
    out = tmp_path / "export"
    assert main(["adapter", "export", str(run_dir), "--out", str(out), "--merge"]) == 0
    assert "nothing to merge" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == (run_dir / "model" / "model.safetensors").read_bytes()
    load_model(out)
    card = (out / "README.md").read_text()
    assert weights_hash(tiny_model) in card and weights_hash(out) in card
    assert str(tiny_model) not in card and str(tmp_path) not in card, "a public card names local folders by name only"
    # The hash is the one recorded at training time: a base rewritten since does not change the card.
    (run_dir / "model" / "config.json").write_text((run_dir / "model" / "config.json").read_text().replace(
        weights_hash(tiny_model), "0" * 64))
    assert main(["adapter", "export", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert "0" * 64 in (out / "README.md").read_text()
    assert "envs3d seeds `0:8`, 6 frames per episode at 32x32 px" in card
    assert "| loss | 2.5 |" in card  # no report: the last metrics.jsonl record


def test_export_errors_name_the_path(tmp_path, capsys):
    run_dir = tmp_path / "not-a-run"
    run_dir.mkdir()
    assert main(["adapter", "export", str(run_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(run_dir / "adapter") in err and "model/" in err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["not-a-run"]


@pytest.mark.parametrize("name, text", [
    ("config.json", "[1, 2]"),                      # the run's recipe dump, not an object
    ("report/metrics.json", '{"temperatures": '),   # a report cut short
    ("model/config.json", b"\xff\xfe{}"),          # not UTF-8
])
def test_export_of_a_run_with_a_broken_json_file_names_it(tiny_model, tmp_path, capsys, name, text):
    run_dir = _fake_full_finetune(tiny_model, tmp_path / "run")
    (run_dir / name).parent.mkdir(exist_ok=True)
    if isinstance(text, bytes):
        (run_dir / name).write_bytes(text)
    else:
        (run_dir / name).write_text(text)
    assert main(["adapter", "export", str(run_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(run_dir / name) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_push_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    (folder / "adapter_config.json").write_text("{}")
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "https://huggingface.co/me/studio/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert main(["adapter", "push", str(folder), "--repo-id", "me/studio", "--private", "--token", "hf_x"]) == 0
    assert [c[:2] for c in calls] == [("create_repo", "me/studio"), ("upload_folder", "me/studio")]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][2]["folder_path"] == str(folder)
    assert "me/studio" in capsys.readouterr().out

    calls.clear()
    assert main(["adapter", "push", str(tmp_path), "--repo-id", "me/studio"]) == 2  # not an export folder
    assert not calls and str(tmp_path) in capsys.readouterr().err


def test_push_without_network_is_one_line_naming_the_repo(tmp_path, monkeypatch, capsys):
    import sys

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    connect_error = sys.modules[HTTPError.__module__].ConnectError  # httpx's, under whatever name the Hub uses
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    (folder / "adapter_config.json").write_text("{}")

    def offline(self, *args, **kwargs):
        raise connect_error("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    assert main(["adapter", "push", str(folder), "--repo-id", "me/studio", "--token", "hf_x"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out and len(err.splitlines()) == 1, err
    assert err.startswith("posttrain: error:") and "'me/studio'" in err and "Name or service not known" in err


def test_adapter_records_a_relative_base_folder_as_absolute(tiny_model, tmp_path, monkeypatch, capsys):
    """A run with model=mymodel (relative) must still merge when exported from another directory."""
    import shutil

    from posttrain.adapters import LoraSettings, apply_lora, save_adapter

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_model, work / "mymodel")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    peft_model = apply_lora(load_model("mymodel"), LoraSettings(r=4, alpha=8))
    save_adapter(peft_model, "run/adapter", "mymodel", weights_hash(work / "mymodel"))
    info = json.loads((work / "run" / "adapter" / "posttrain_adapter.json").read_text())
    assert info["base_model"] == str((work / "mymodel").resolve())
    save_adapter(peft_model, "run/adapter-default", "default", "sha")
    assert json.loads((work / "run" / "adapter-default" / "posttrain_adapter.json").read_text())["base_model"] == (
        "default")

    monkeypatch.chdir(elsewhere)
    assert main(["adapter", "export", str(work / "run"), "--merge", "--out", str(tmp_path / "merged")]) == 0, (
        capsys.readouterr().err)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
