"""Footage ingestion: clip counts and pixels checked against the sources, failures isolated, output deterministic."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from posttrain.envs3d.actions import ACTION_NAMES, NUM_ACTIONS
from posttrain.footage import NULL_ACTION, FootageConfig, add_footage_parser, ingest, natural_key

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
datasets = pytest.importorskip("datasets")

CLIP = 8  # frames per clip in these tests (small and fast)
GRAY_FRAMES = 48  # frames of the gray-ramp video at 24 fps (2 s)


def _ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def _testsrc(path: Path, seconds: float) -> None:
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x72:rate=24", "-t", str(seconds),
            "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path))


def _gray_ramp(path: Path, tmp: Path) -> None:
    """24 fps video whose frame n is a flat gray of level 5n: a kept frame's level names its source index."""
    frames = tmp / "ramp_frames"
    frames.mkdir()
    for n in range(GRAY_FRAMES):
        Image.fromarray(np.full((48, 64, 3), 5 * n, np.uint8)).save(frames / f"g_{n}.png")
    _ffmpeg("-framerate", "24", "-i", str(frames / "g_%d.png"), "-c:v", "libx264", "-qp", "0",
            "-pix_fmt", "yuv444p", str(path))


def _seq_image(n: int) -> np.ndarray:
    """160x128 frame n of the png sequence: smooth random texture, different per frame."""
    rng = np.random.default_rng(n)
    small = rng.integers(0, 256, (16, 20, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((160, 128), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("footage")
    src = root / "src"
    (src / "takes").mkdir(parents=True)
    (src / "seq").mkdir()
    _testsrc(src / "takes" / "test.mp4", 3)
    _testsrc(src / "short.mp4", 0.5)  # 12 source frames -> 4 at 8 fps, fewer than one clip
    _gray_ramp(src / "ramp.mp4", root)
    (src / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for n in range(16):  # unpadded names: natural order must put seq_2 before seq_10
        Image.fromarray(_seq_image(n)).save(src / "seq" / f"seq_{n}.png")
    (src / "README.txt").write_text("not footage")
    return src


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="posttrain")
    add_footage_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _config(**kw) -> FootageConfig:
    return FootageConfig(**{"clip_frames": CLIP, "progress": False, **kw})


def _by_source(ds) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, source in enumerate(ds["source"]):
        rows.setdefault(source, []).append(i)
    return rows


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_null_action_is_the_vocabulary_size():
    assert NULL_ACTION == NUM_ACTIONS == 35


def test_cli_ingests_good_sources_and_reports_bad_ones(footage, tmp_path, capsys):
    out = tmp_path / "clips"
    code = _cli(["footage", "ingest", str(footage), "--out", str(out), "--clip-frames", str(CLIP), "--quiet"])
    assert code == 1  # corrupt.mp4 and short.mp4 failed
    err = capsys.readouterr().err
    assert "corrupt.mp4" in err and "short.mp4" in err

    ds = datasets.load_from_disk(str(out))
    rows = _by_source(ds)
    # duration * fps / clip_frames clips per source: 3 s * 8 fps / 8, 2 s * 8 / 8, 16 images / 8.
    assert {k: len(v) for k, v in rows.items()} == {"takes/test.mp4": 3, "ramp.mp4": 2, "seq": 2}
    first = ds.with_format("numpy")[rows["takes/test.mp4"][1]]
    # Stored as uint8 (the numpy formatter widens integers to int64 when reading).
    assert ds.features["frames"].shape == (CLIP, 64, 64, 3) and ds.features["frames"].dtype == "uint8"
    assert first["frames"].shape == (CLIP, 64, 64, 3)
    assert first["actions"].shape == (CLIP - 1,) and (first["actions"] == NULL_ACTION).all()
    assert first["clip_id"] == "takes/test.mp4#0001" and not first["has_actions"]
    assert (first["start_time"], first["end_time"]) == pytest.approx((1.0, 2.0))
    assert first["frames"].std() > 20  # the test pattern, not a blank frame

    manifest = json.loads((out / "manifest.json").read_text())
    entries = {e["path"]: e for e in manifest["sources"]}
    assert entries["corrupt.mp4"]["status"] == "failed" and "unreadable video" in entries["corrupt.mp4"]["reason"]
    assert entries["short.mp4"]["status"] == "failed"
    assert entries["short.mp4"]["reason"] == f"too short: 4 frames at 8 fps, need {CLIP}"
    assert entries["README.txt"]["status"] == "skipped"
    assert entries["takes/test.mp4"]["time_ranges"] == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]
    assert entries["seq"]["status"] == "ok" and entries["seq"]["clips"] == 2
    assert manifest["clips"] == len(ds) == 7


def test_video_frames_are_subsampled_by_timestamp(footage, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(footage / "ramp.mp4", src / "ramp.mp4")
    report = ingest(src, tmp_path / "out", _config(stride=4))
    assert report.exit_code == 0
    ds = datasets.load_from_disk(str(tmp_path / "out")).with_format("numpy")
    # 16 frames at 8 fps, clips of 8 every 4 frames: starts at 0, 4, 8.
    assert len(ds) == 3 and list(ds["start_time"]) == pytest.approx([0.0, 0.5, 1.0])
    for clip in range(3):
        levels = ds[clip]["frames"].reshape(CLIP, -1).mean(axis=1)
        # 24 fps -> 8 fps keeps every third source frame: frame n has level 5n.
        expected = 5 * 3 * (4 * clip + np.arange(CLIP))
        assert np.abs(levels - expected).max() < 2, (clip, levels)


def test_png_sequence_matches_resized_source_images(footage, tmp_path):
    report = ingest(footage, tmp_path / "out", _config())
    assert report.exit_code == 1
    ds = datasets.load_from_disk(str(tmp_path / "out")).with_format("numpy")
    rows = _by_source(ds)["seq"]
    frames = np.concatenate([ds[i]["frames"] for i in rows]).astype(np.float64)
    for n in range(16):
        # 160x128 -> shorter side 128 to 64 halves both sides (80x64); centre crop drops 8 columns each side:
        # the expected frame is the 2x2 block mean of source columns 16..143.
        src = _seq_image(n)[:, 16:144].astype(np.float64)
        expected = src.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
        assert np.abs(frames[n] - expected).max() <= 1.0, n


def test_rerun_is_byte_identical_for_any_worker_count(footage, tmp_path):
    ingest(footage, tmp_path / "a", _config())
    ingest(footage, tmp_path / "b", _config())
    ingest(footage, tmp_path / "c", _config(workers=2))
    first = _files(tmp_path / "a")
    assert "manifest.json" in first and any(name.endswith(".arrow") for name in first)
    assert first == _files(tmp_path / "b") == _files(tmp_path / "c")


def test_action_sidecars_honoured_and_a_mismatch_fails_only_that_file(footage, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # 24 -> 8 fps keeps every third source frame: the three actions a clip step spans agree, except in
    # step 5 (source frames 15-17), whose middle frame differs.
    per_frame = [(7 * (n // 3) + 1) % NUM_ACTIONS for n in range(GRAY_FRAMES)]
    per_frame[16] = 0
    for name in ("ids", "names", "bad", "plain"):
        shutil.copy(footage / "ramp.mp4", src / f"{name}.mp4")
    (src / "ids.actions.csv").write_text("frame,action\n" + "".join(f"{n},{a}\n" for n, a in enumerate(per_frame)))
    (src / "names.actions.json").write_text(json.dumps([ACTION_NAMES[a] for a in per_frame]))
    (src / "bad.actions.json").write_text(json.dumps(per_frame[:-1]))  # one short of the 48 source frames

    report = ingest(src, tmp_path / "out", _config())
    assert report.exit_code == 1
    assert [r.path for r in report.failed] == ["bad.mp4"]
    assert "47 actions for 48 source frames" in report.failed[0].reason
    ds = datasets.load_from_disk(str(tmp_path / "out")).with_format("numpy")
    rows = _by_source(ds)
    assert set(rows) == {"ids.mp4", "names.mp4", "plain.mp4"}
    steps = np.asarray(per_frame)[3 * np.arange(2 * CLIP)]  # the action of each kept frame's three
    steps[5] = NULL_ACTION
    for source in ("ids.mp4", "names.mp4"):
        for clip, row in enumerate(rows[source]):
            assert ds[row]["has_actions"]
            np.testing.assert_array_equal(ds[row]["actions"], steps[clip * CLIP : clip * CLIP + CLIP - 1])
    assert not ds[rows["plain.mp4"][0]]["has_actions"]


def test_forced_failure_leaves_nothing_half_written(footage, tmp_path, monkeypatch):
    from datasets.arrow_writer import ArrowWriter

    out = tmp_path / "out"
    ingest(footage, out, _config())
    before = _files(out)
    real_write, calls = ArrowWriter.write, []

    def failing_write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(ArrowWriter, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        ingest(footage, out, _config(overwrite=True))
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        ingest(footage, tmp_path / "fresh", _config())
    assert _files(out) == before  # the previous dataset is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no fresh/ and no staging folders


def test_existing_out_needs_overwrite(footage, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert _cli(["footage", "ingest", str(footage), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_natural_order():
    names = ["f_10.png", "f_2.png", "F_1.png", "f_0010b.png"]
    assert sorted(names, key=natural_key) == ["F_1.png", "f_2.png", "f_10.png", "f_0010b.png"]


def test_malformed_csv_sidecars_fail_only_their_source_and_a_bom_is_read(footage, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = [f"{n},{n % NUM_ACTIONS}" for n in range(GRAY_FRAMES)]
    sidecars = {
        "extra": ["frame,action", *rows[:5], "5,5,9", *rows[6:]],  # one row with a field beyond the header
        "minus": ["frame,action", "0,--3", *rows[1:]],
        "frame": ["frame,action", "--0,1", *rows[1:]],
        "bom": ["\ufeffframe,action", *rows],  # Excel's "CSV UTF-8"
    }
    for name, lines in sidecars.items():
        shutil.copy(footage / "ramp.mp4", src / f"{name}.mp4")
        (src / f"{name}.actions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = ingest(src, tmp_path / "out", _config())
    reasons = {r.path: r.reason for r in report.failed}
    assert reasons == {"extra.mp4": "extra.actions.csv line 7: 3 fields, the header has 2",
                       "minus.mp4": "minus.actions.csv line 2: unknown action '--3'",
                       "frame.mp4": "frame.actions.csv line 2: frame '--0' is not an integer"}
    ds = datasets.load_from_disk(str(tmp_path / "out")).with_format("numpy")
    assert set(ds["source"]) == {"bom.mp4"} and ds[0]["has_actions"]


def test_an_image_too_large_for_pillow_fails_only_its_sequence(footage, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    src = tmp_path / "src"
    shutil.copytree(footage / "seq", src / "seq")
    shutil.copy(footage / "ramp.mp4", src / "ramp.mp4")
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(src / "seq" / "seq_3.png")
    # Pillow raises DecompressionBombError past twice this many pixels (the real limit is ~179 MP).
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 25_000)
    report = ingest(src, tmp_path / "out", _config())
    assert [r.path for r in report.failed] == ["seq"]
    assert report.failed[0].reason.startswith("image seq_3.png is too large to read: ")
    assert {r.path: r.status for r in report.sources} == {"ramp.mp4": "ok", "seq": "failed"}


def test_hidden_files_and_a_lone_thumbnail_are_not_image_sequences(footage, tmp_path):
    src = tmp_path / "src"
    (src / "takes").mkdir(parents=True)
    shutil.copy(footage / "ramp.mp4", src / "takes" / "ramp.mp4")
    (src / "takes" / "._ramp.mp4").write_bytes(b"\x00\x05\x16\x07")  # macOS resource forks
    (src / "takes" / "._cover.png").write_bytes(b"\x00\x05\x16\x07")
    Image.fromarray(_seq_image(0)).save(src / "takes" / "cover.jpg")
    (src / ".hidden").mkdir()
    for n in range(CLIP):
        Image.fromarray(_seq_image(n)).save(src / ".hidden" / f"f_{n}.png")
    report = ingest(src, tmp_path / "out", _config())
    assert report.exit_code == 0
    assert {r.path: r.status for r in report.sources} == {"takes/cover.jpg": "skipped", "takes/ramp.mp4": "ok"}


def _video_with_gap(path: Path, gap_seconds: float) -> None:
    """96 frames at 24 fps whose frame n is a flat gray of level 2n, with a pause of gap_seconds after frame 47
    (timestamps only: as a variable-frame-rate screen recording stores an idle minute)."""
    import fractions

    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        tick = fractions.Fraction(1, 24)  # (the muxer changes stream.time_base once writing starts)
        stream.time_base = stream.codec_context.time_base = tick
        stream.options = {"qp": "0"}
        for n in range(96):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 2 * n, np.uint8), format="rgb24")
            frame.pts = n + (round(gap_seconds * 24) if n >= 48 else 0)
            frame.time_base = tick
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_a_pause_in_the_timestamps_is_a_break_not_filled_with_copies(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _video_with_gap(src / "idle.mp4", 60.0)
    report = ingest(src, tmp_path / "out", _config())
    assert report.exit_code == 0
    (entry,) = report.sources
    # 2 s before the pause and 2 s after it at 8 fps: 16 + 16 frames, two clips each; none spans the pause.
    assert (entry.gaps, entry.frames, entry.clips) == (1, 32, 4)
    assert entry.time_ranges == [[0.0, 1.0], [1.0, 2.0], [62.0, 63.0], [63.0, 64.0]]
    ds = datasets.load_from_disk(str(tmp_path / "out")).with_format("numpy")
    levels = np.stack([ds[i]["frames"].reshape(CLIP, -1).mean(axis=1) for i in range(4)]).ravel()
    np.testing.assert_allclose(levels, 2 * np.r_[0:48:3, 48:96:3], atol=2)  # every third source frame
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["sources"][0]["gaps"] == 1


def test_a_corrupt_timestamp_far_ahead_neither_fills_nor_shifts_later_frames():
    from posttrain.footage_frames import Timeline

    raw = [n / 24 for n in range(10)]
    raw[5] += 3 * 3600  # one frame's pts three hours ahead
    timeline = Timeline(24.0, 0.5)
    times, breaks = zip(*(timeline(t) for t in raw))
    assert list(times) == pytest.approx([*raw[:5], raw[5], *raw[6:]])
    assert breaks == (False,) * 5 + (True, True) + (False,) * 3 and timeline.gaps == 2
    timeline = Timeline(24.0, 0.5)  # missing and repeated timestamps still fall back to the nominal rate
    assert [timeline(t)[0] for t in (0.0, None, 1 / 24, 1 / 24)] == pytest.approx([0, 1 / 24, 2 / 24, 3 / 24])


def test_a_step_between_copies_of_one_source_frame_has_no_action(footage, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(footage / "seq", src / "seq")
    per_image = [(5 * n + 2) % NUM_ACTIONS for n in range(16)]
    (src / "seq.actions.json").write_text(json.dumps(per_image))
    report = ingest(src, tmp_path / "out", _config(image_fps=4))  # 4 images a second to 8 fps
    assert report.exit_code == 0 and report.sources[0].clips == 3
    ds = datasets.load_from_disk(str(tmp_path / "out")).with_format("numpy")
    # Kept frame k (time k/8) is image ceil(k/2) (a tie goes to the later image): 0, 1, 1, 2, 2, ...
    image = [-(-k // 2) for k in range(3 * CLIP)]
    for row in range(3):
        frames, actions = ds[row]["frames"], ds[row]["actions"]
        for j in range(CLIP - 1):
            a, b = image[row * CLIP + j], image[row * CLIP + j + 1]
            assert np.array_equal(frames[j], frames[j + 1]) == (a == b)
            assert actions[j] == (NULL_ACTION if a == b else per_image[a]), (row, j)


def _upright() -> np.ndarray:
    """A 64-tall, 48-wide portrait picture with one flat colour per quadrant: any turn or mirror moves them."""
    image = np.zeros((64, 48, 3), np.uint8)
    image[:32, :24], image[:32, 24:], image[32:, :24], image[32:, 24:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), 255
    return image


def _quadrant_colours(frame: np.ndarray) -> np.ndarray:
    """Mean colour of each quadrant's inner half (away from the edges the scalers blend), TL TR BL BR."""
    h, w = frame.shape[0] // 2, frame.shape[1] // 2
    quads = [frame[:h, :w], frame[:h, w:], frame[h:, :w], frame[h:, w:]]
    return np.stack([q[h // 4 : -h // 4, w // 4 : -w // 4].reshape(-1, 3).mean(axis=0) for q in quads])


def test_phone_portrait_video_and_photos_are_turned_upright(tmp_path):
    """Phones store portrait footage as landscape frames plus a turn to apply (a display matrix in a video, an
    EXIF orientation in a photo); ingest applies it, so frames come out as the viewer saw them."""
    import av

    src = tmp_path / "src"
    (src / "photos").mkdir(parents=True)
    stored = np.ascontiguousarray(np.rot90(_upright(), 1))  # 48 x 64: the sensor's landscape frame
    with av.open(str(src / "portrait.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        stream.options = {"qp": "0"}
        if not hasattr(stream, "set_display_rotation"):  # writing one needs PyAV 18; reading it, 14.2
            pytest.skip("this PyAV cannot write a display matrix")
        stream.set_display_rotation(-90)  # shown turned a quarter clockwise, as a phone held upright records
        for _ in range(CLIP):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation 6: turn a quarter clockwise to display
    for n in range(CLIP):
        Image.fromarray(stored).save(src / "photos" / f"p_{n}.png", exif=exif)

    report = ingest(src, tmp_path / "out", _config(size=32))
    assert report.exit_code == 0 and len(report.sources) == 2
    ds = datasets.load_from_disk(str(tmp_path / "out")).with_format("numpy")
    # Expected: the upright picture resized to 32 wide (43 tall) and centre-cropped: the quadrants keep their
    # colours and places (TL red, TR green, BL blue, BR white).
    want = _quadrant_colours(_upright())
    for row in range(len(ds)):
        for frame in ds[row]["frames"]:
            np.testing.assert_allclose(_quadrant_colours(frame), want, atol=8, err_msg=ds[row]["source"])
    # Without the turn the same picture would not pass: the check can fail.
    assert np.abs(_quadrant_colours(np.rot90(_upright(), 1)) - want).max() > 100
