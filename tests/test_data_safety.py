"""Nothing a user owns is deleted, nothing is left running: --out may not overlap an input, --overwrite
replaces only folders posttrain wrote, pool workers die with a killed parent, stale staging folders
of dead jobs are removed (and only those), adapters are checked, truncated videos are flagged, and
commands do not print PyBullet's or DeepSpeed's start-up lines."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.envs3d.jobs import OUTPUT_MARKER, STAGING_OWNER, remove_stale_staging, staging_folder

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
ROOT = Path(__file__).resolve().parent.parent


def _ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def _video(path: Path, seconds: float, rate: int = 8, faststart: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _ffmpeg("-f", "lavfi", "-i", f"testsrc=size=48x40:rate={rate}", "-t", str(seconds), "-c:v", "libx264",
            "-pix_fmt", "yuv420p", *(["-movflags", "+faststart"] if faststart else []), str(path))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """parent/videos/{a,b}.mp4: 2 s each at 8 fps."""
    parent = tmp_path_factory.mktemp("footage")
    _video(parent / "videos" / "a.mp4", 2)
    _video(parent / "videos" / "b.mp4", 2)
    return parent / "videos"


# --- 1. --out never overlaps an input; --overwrite replaces only our own folders -----------------


@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_ingest_refuses_out_overlapping_the_footage(videos, tmp_path, where, capsys):
    before = _snapshot(videos.parent)
    out = {"same": videos, "parent": videos.parent, "inside": videos / "clips", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(videos, target_is_directory=True)
    code = main(["footage", "ingest", str(videos), "--out", str(out), "--overwrite", "--quiet",
                 "--clip-frames", "4"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--out {out}" in err and str(videos) in err and len(err.strip().splitlines()) == 1
    assert _snapshot(videos.parent) == before  # not a file of the footage was touched


def _fake_lora_run(run_dir: Path) -> Path:
    """A LoRA run folder that a plain (unmerged) export copies without loading anything."""
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (run_dir / "adapter" / "posttrain_adapter.json").write_text('{"base_model": "default"}')
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    return run_dir


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_adapter_export_refuses_out_overlapping_the_run(tmp_path, where, capsys):
    run_dir = _fake_lora_run(tmp_path / "runs" / "sft")
    before = _snapshot(tmp_path / "runs")
    out = {"same": run_dir, "inside": run_dir / "export", "parent": tmp_path / "runs"}[where]
    assert main(["adapter", "export", str(run_dir), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and str(run_dir) in err and len(err.strip().splitlines()) == 1
    assert _snapshot(tmp_path / "runs") == before


def test_overwrite_replaces_only_folders_posttrain_wrote(videos, tmp_path, capsys):
    mine = tmp_path / "my_notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    commands = {
        "footage": ["footage", "ingest", str(videos), "--clip-frames", "4", "--quiet"],
        "scenes": ["scenes", "generate", "--seeds", "0:1", "--frames", "2", "--size", "16", "--quiet"],
        "export": ["adapter", "export", str(_fake_lora_run(tmp_path / "run"))],
    }
    for name, argv in commands.items():
        assert main([*argv, "--out", str(mine), "--overwrite"]) == 2, name
        err = capsys.readouterr().err
        assert f"--overwrite refuses to replace {mine}" in err, name
        assert (mine / "notes.txt").read_text() == "precious"

    # Folders written by posttrain carry their marker and can be replaced.
    clips, scenes = tmp_path / "clips", tmp_path / "scenes"
    for argv, out in ((commands["footage"], clips), (commands["scenes"], scenes)):
        assert main([*argv, "--out", str(out)]) == 0
        assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert (clips / "manifest.json").is_file()
    assert json.loads((scenes / OUTPUT_MARKER).read_text()) == {"written_by": "posttrain scenes generate"}


def test_ingest_overwrite_needs_its_own_marker_not_any_manifest(videos, tmp_path, capsys):
    site = tmp_path / "site"  # a folder of the user's that happens to hold a manifest.json
    site.mkdir()
    (site / "manifest.json").write_text("{}")
    (site / "index.html").write_text("hi")
    argv = ["footage", "ingest", str(videos), "--clip-frames", "4", "--quiet", "--overwrite"]
    assert main([*argv, "--out", str(site)]) == 2
    err = capsys.readouterr().err
    assert f"--overwrite refuses to replace {site}" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(site) == {"manifest.json": b"{}", "index.html": b"hi"}

    # A dataset ingested before the marker existed (manifest.json only) may still be replaced.
    clips = tmp_path / "clips"
    assert main([*argv, "--out", str(clips)]) == 0
    assert json.loads((clips / OUTPUT_MARKER).read_text()) == {"written_by": "posttrain footage ingest"}
    (clips / OUTPUT_MARKER).unlink()
    assert main([*argv, "--out", str(clips)]) == 0
    assert (clips / OUTPUT_MARKER).is_file()


# --- 2. killed jobs leave no workers running and no staging folders behind ------------------------


def _wait_for_exit(pid: int, guard_seconds: float = 120) -> None:
    """Block until `pid` exits, woken by the kernel (a pidfd becomes readable when the process exits):
    no sleeping or polling. The guard only stops a test whose bug leaves the worker alive from hanging
    forever; a worker that dies wakes this at once."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    try:
        select.select([fd], [], [], guard_seconds)
    finally:
        os.close(fd)


def _process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("command", ["scenes", "footage"])
def test_workers_die_with_a_killed_parent_and_staging_is_cleaned_next_run(videos, tmp_path, command):
    out = tmp_path / "out"
    argv, fault = {
        "scenes": (["scenes", "generate", "--seeds", "0:8", "--frames", "2", "--size", "16"],
                   "generate_after_first_episode"),
        "footage": (["footage", "ingest", str(videos), "--clip-frames", "4"], "ingest_after_first_source"),
    }[command]
    env = {**os.environ, "POSTTRAIN_FAULT": fault, "OMP_NUM_THREADS": "1"}
    # The parent SIGKILLs itself once its two workers have produced a result (no timers involved).
    # stderr goes to a file, not a pipe: surviving workers would hold a pipe open and hang the test.
    log = tmp_path / "parent.log"
    with log.open("w") as stderr:
        parent = subprocess.run([sys.executable, "-m", "posttrain", *argv, "--workers", "2", "--quiet",
                                 "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                timeout=600)
    assert parent.returncode == -9, log.read_text()
    found = re.search(r"workers \[([\d, ]+)\]", log.read_text())
    assert found, log.read_text()
    workers = [int(pid) for pid in found.group(1).split(",")]
    assert len(workers) == 2
    for pid in workers:
        _wait_for_exit(pid)
    alive = [pid for pid in workers if not _process_gone(pid)]
    for pid in alive:  # do not leave them behind when the test fails
        os.kill(pid, 9)
    assert not alive, f"workers {alive} outlived their SIGKILLed parent"

    stale = list(tmp_path.glob(".out.partial-*"))
    assert len(stale) == 1 and not out.exists()
    assert main([*argv, "--quiet", "--out", str(out)]) == 0  # the next run removes the dead job's staging
    assert out.is_dir() and not list(tmp_path.glob(".out.partial-*"))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_staging_folders_of_provably_dead_owners_are_removed(tmp_path):
    out = tmp_path / "data"

    def staging(name: str, owner: dict | None) -> Path:
        folder = tmp_path / f".data.partial-{name}"
        folder.mkdir()
        (folder / "episodes.arrow").write_text("half")
        if owner is not None:
            (folder / STAGING_OWNER).write_text(json.dumps(owner))
        return folder

    ours = staging_folder(out)  # this process: alive
    recorded = json.loads((ours / STAGING_OWNER).read_text())
    assert recorded["pid"] == os.getpid() and recorded["host"] == socket.gethostname()
    dead = staging("dead", {**recorded, "pid": _dead_pid()})
    legacy = staging("legacy", None)  # no owner record: cannot prove anything
    elsewhere = staging("elsewhere", {**recorded, "pid": _dead_pid(), "host": "another-host"})
    if recorded["start_time"] is not None:  # Linux: a live pid that is a different process than recorded
        reused = staging("reused", {**recorded, "start_time": recorded["start_time"] - 1})
    # A killed footage ingest that had already set the previous dataset aside: it is put back.
    aside = staging("aside", {**recorded, "pid": _dead_pid()})
    (aside / "previous").mkdir()
    (aside / "previous" / "manifest.json").write_text("{}")

    removed = remove_stale_staging(out)
    expected = {dead, aside} | ({reused} if recorded["start_time"] is not None else set())
    assert set(removed) == expected
    assert not any(p.exists() for p in expected)
    assert ours.is_dir() and legacy.is_dir() and elsewhere.is_dir()
    assert (out / "manifest.json").read_text() == "{}"


# --- 3. adapters are checked before they are applied ------------------------------------------------


@pytest.fixture
def saved_adapter(tiny_model, tmp_path) -> Path:
    """A rank-4 LoRA adapter of the tiny model, saved as training saves it (with posttrain_adapter.json)."""
    from posttrain.adapters import LoraSettings, apply_lora, save_adapter
    from posttrain.models import load_model, weights_hash

    peft_model = apply_lora(load_model(tiny_model), LoraSettings(r=4, alpha=8))
    return save_adapter(peft_model, tmp_path / "adapter", str(tiny_model), weights_hash(tiny_model))


def _eval_argv(tiny_model, adapter, tmp_path) -> list[str]:
    return ["eval", "--model", str(tiny_model), "--adapter", str(adapter), "--seeds", "0:1", "--size", "32",
            "--context", "1", "--horizon", "1", "--batch-size", "1", "--cache-dir", str(tmp_path / "cache"),
            "--json", str(tmp_path / "eval.json")]


def test_saved_adapter_files_follow_the_umask(tiny_model, tmp_path):
    """PEFT's safetensors file would be 0600; a published adapter must be readable as the umask allows
    (umask 022 pinned, so the test cannot pass because the runner's umask happens to be 077)."""
    import os

    from posttrain.adapters import LoraSettings, apply_lora, save_adapter
    from posttrain.envs3d.jobs import current_umask
    from posttrain.models import load_model, weights_hash

    old = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        folder = save_adapter(apply_lora(load_model(tiny_model), LoraSettings(r=4, alpha=8)), tmp_path / "adapter",
                              str(tiny_model), weights_hash(tiny_model))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert "adapter_model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_adapter_without_its_base_record_needs_force(tiny_model, saved_adapter, tmp_path, capsys):
    from posttrain.adapters import load_adapter
    from posttrain.models import load_model

    (saved_adapter / "posttrain_adapter.json").unlink()
    with pytest.raises(ValueError, match="posttrain_adapter.json.*--force-adapter"):
        load_adapter(load_model(tiny_model), saved_adapter, base_name=str(tiny_model))
    assert load_adapter(load_model(tiny_model), saved_adapter, base_name=str(tiny_model), force=True) is not None

    argv = _eval_argv(tiny_model, saved_adapter, tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(saved_adapter) in err and "--force-adapter" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--force-adapter"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["adapter"] == str(saved_adapter)


def test_edited_adapter_rank_is_a_one_line_error(tiny_model, saved_adapter, tmp_path, capsys):
    config_path = saved_adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "r": 8}))
    assert main(_eval_argv(tiny_model, saved_adapter, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{config_path}: r=8, but adapter_model.safetensors holds rank-4 weights" in err


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name, damage, words", [
    ("adapter_model.safetensors", _truncate, ["cannot be read"]),
    ("adapter_model.safetensors", Path.unlink, ["has no adapter_model.safetensors"]),
    ("adapter_config.json", lambda p: p.write_text('{"r": 4,'), ["not valid JSON"]),
    ("posttrain_adapter.json", lambda p: p.write_text("{base"), ["not valid JSON"]),
    ("posttrain_adapter.json", lambda p: p.write_text("[]"), ["JSON object"]),
])
def test_broken_adapter_files_are_one_line_errors_naming_the_file(tiny_model, saved_adapter, tmp_path, capsys,
                                                                  name, damage, words):
    # A missing weights file must not send PEFT to the Hub (it takes the folder for a repo id).
    damage(saved_adapter / name)
    assert main(_eval_argv(tiny_model, saved_adapter, tmp_path)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1 and err.startswith("posttrain: error:"), err
    assert str(saved_adapter / name) in err or f"{saved_adapter} has no {name}" in err, err
    for word in words:
        assert word in err, (word, err)


# --- 4. a truncated video is flagged, not passed off as ok --------------------------------------------


def test_half_a_video_is_marked_partial(tmp_path, capsys):
    src = tmp_path / "src"
    # 6 s at 24 fps = 144 frames; faststart puts the index first, so half the file still opens and
    # (with frame threading) decodes cleanly up to where it was cut.
    full = _video(tmp_path / "full.mp4", 6, rate=24, faststart=True)
    data = full.read_bytes()
    src.mkdir()
    (src / "half.mp4").write_bytes(data[: len(data) // 2])
    (src / "whole.mp4").write_bytes(data)
    out = tmp_path / "clips"
    assert main(["footage", "ingest", str(src), "--out", str(out), "--clip-frames", "4", "--quiet"]) == 0
    captured = capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    entries = {e["path"]: e for e in manifest["sources"]}
    half, whole = entries["half.mp4"], entries["whole.mp4"]
    assert whole["status"] == "ok" and whole["source_frames"] == whole["expected_frames"] == 144
    assert half["status"] == "partial" and half["expected_frames"] == 144 and 0 < half["source_frames"] < 144
    assert half["reason"].startswith(f"read {half['source_frames']} of the 144 frames")
    assert half["clips"] > 0  # what was read is kept
    assert manifest["counts"]["partial"] == 1
    assert f"warning: partial: half.mp4: read {half['source_frames']} of the 144 frames" in captured.err
    assert "1 partial" in captured.out


# --- 5. no start-up noise from PyBullet or DeepSpeed ------------------------------------------------

NOISE = ("pybullet build time", "argv[0]=", "Setting accelerator to CPU")


def _posttrain(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POSTTRAIN_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "posttrain", *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_scenes_generate_prints_no_pybullet_lines(tmp_path, workers):
    done = _posttrain(["scenes", "generate", "--seeds", "0:2", "--frames", "2", "--size", "16", "--quiet",
                       "--workers", workers, "--out", str(tmp_path / "scenes")])
    assert done.returncode == 0, done.stderr
    assert "wrote 2 episodes" in done.stdout
    for line in NOISE:
        assert line not in done.stdout + done.stderr
    assert "Saving the dataset" not in done.stderr  # --quiet: not even datasets' own bar


def test_a_run_without_deepspeed_does_not_import_it(tiny_model, tmp_path):
    """A plain (non-DeepSpeed) SFT run: deepspeed's import prints its accelerator warning, so it must not happen."""
    overrides = [f"model={tiny_model}", f"out={tmp_path / 'run'}", "data.seeds=0:2", "data.frames=4",
                 "data.image_size=32", f"data.cache_dir={tmp_path / 'cache'}", "data.workers=1",
                 "eval.data.seeds=500:501", "eval.data.frames=4", "eval.data.image_size=32",
                 f"eval.data.cache_dir={tmp_path / 'cache'}", "eval.data.workers=1", "clip_frames=4", "batch_size=2",
                 "train.micro_batch_size=2", "eval.horizon=2", "steps=1", "eval_every=0", "train.eval_at_end=false",
                 "train.checkpoint_every=1", "train.tensorboard=false"]
    done = _posttrain(["run", "recipes/sft_tabletop.yaml", *overrides])
    assert done.returncode == 0, done.stderr
    for line in NOISE:
        assert line not in done.stdout + done.stderr


def test_plain_progress_lines_for_logs():
    """Where stderr is not a terminal (nohup, CI) progress is plain lines: after the first step, after the
    last, and between them at most every `every` seconds of an injected clock (no real timer in the test)."""
    import io

    from posttrain.envs3d.jobs import plain_progress

    now = [100.0]
    out = io.StringIO()
    update = plain_progress(4, "grpo", every=30.0, clock=lambda: now[0], stream=out)
    for seconds, fields in ((10, {"reward_mean": 0.25}), (10, {}), (25, {"reward_mean": 0.5}), (1, {})):
        now[0] += seconds
        update(**fields)
    update(advance=0, loss=1.0)  # a field-only update prints nothing
    assert out.getvalue().splitlines() == [
        "grpo: 1/4 (25%) 0m10s elapsed, eta 0m30s, reward_mean=0.25",
        "grpo: 3/4 (75%) 0m45s elapsed, eta 0m15s, reward_mean=0.5",
        "grpo: 4/4 (100%) 0m46s elapsed, reward_mean=0.5",
    ]
