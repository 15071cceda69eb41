"""Ingest a studio's own footage (videos, image sequences) into clips as a `datasets` folder.

    posttrain footage ingest SRC --out DIR [--size 64 --fps 8 --clip-frames 16 --stride N --workers 1 --overwrite]

SRC is read recursively. Video files (mp4, mov, webm, mkv, m4v, avi) are decoded with
PyAV one frame at a time; a folder holding png/jpg frames is one image sequence, frames in
natural order (frame_2 before frame_10); a lone image (a thumbnail) is skipped, and hidden files and
folders (names starting with ".", e.g. macOS's ._name files) are ignored. Frames are turned upright (a video's
display rotation, a photo's EXIF orientation: phones store portrait footage as landscape plus a turn), resized
(shorter side to `size`) and
centre-cropped to a square, subsampled to `fps` by timestamp (nearest source frame to each
target time), and cut into clips of `clip_frames` frames every `stride` frames. A jump in a video's
timestamps of more than a few frame periods (an idle pause in a variable-frame-rate recording, a corrupt
timestamp) is a break: it is not filled with copies of a frame, no clip spans it, and the manifest counts
a source's breaks as its "gaps".

Columns: frames (T, H, W, 3) uint8, actions (T-1,) int64, clip_id, source, start_time,
end_time, has_actions. Actions come from an optional sidecar beside the source
(`video.actions.csv` with columns frame,action, or `video.actions.json`, a list; ids or
names from `posttrain.envs3d.actions.ACTION_NAMES`, one per source frame); without one
every action is NULL_ACTION. A clip's action t is the one taken between its frames t and t + 1: between
two copies of the same source frame (--fps above the source's rate) it is NULL_ACTION; where the frames
skip source frames (--fps below the source's rate) it is the skipped frames' action if they all agree, else
NULL_ACTION. `manifest.json` in the output lists every file with its
status ("ok", "partial", "failed", "skipped"), the reason, its clips and their time ranges;
`posttrain_output.json` marks the folder as ingest's, and --overwrite replaces only such a folder.
"partial" is a video that decodes fewer frames than its container declares (e.g. a copy cut
short): its clips are kept, and the command warns.

Each source is written to its own Arrow shard as its clips complete (memory stays bounded
for long videos; a file that fails half-way leaves no clips behind), and the shards are
joined in sorted path order in a staging folder next to --out that is renamed into place
only when complete, so re-runs are byte-identical and a crash leaves no half dataset.

Reading the sources (sidecars, video and image frames) lives in posttrain/footage_frames.py.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from posttrain.envs3d.jobs import (
    OUTPUT_MARKER,
    check_output_folder,
    die_with_parent,
    fault_point,
    replace_folder,
    save_dataset_quietly,
    staging_folder,
    write_output_marker,
)
from posttrain.footage_frames import (
    IMAGE_EXTENSIONS,
    NULL_ACTION,
    SourceError,
    image_frames,
    load_actions,
    natural_key,
    subsample,
    video_frames,
)
from posttrain.logging_utils import progress_bar

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".m4v", ".avi")
SIDECAR_SUFFIXES = (".actions.csv", ".actions.json")

# Rows the Arrow writer buffers before flushing: bounded in bytes so large --size stays bounded too.
_WRITER_BUFFER_BYTES = 2 << 20
# A video is "partial" when it decodes fewer frames than declared by more than this: edit lists and
# rounding of duration x rate legitimately cost a frame or two, a truncated copy loses far more.
_MISSING_FRAMES_TOLERANCE = 2
_MANIFEST_KEYS = ("config", "null_action", "clips", "counts", "sources")
"""The top-level keys of the manifest.json that `ingest` writes."""


@dataclass(frozen=True)
class FootageConfig:
    """How footage is turned into clips."""

    size: int = 64
    """Side of the square output frames in pixels (shorter side resized to this, then centre-cropped)."""
    fps: float = 8.0
    """Frame rate of the clips; sources are subsampled to it by timestamp."""
    clip_frames: int = 16
    """Frames per clip (T)."""
    stride: int | None = None
    """Frames (at `fps`) between the starts of consecutive clips; None means clip_frames (no overlap)."""
    image_fps: float = 8.0
    """Frame rate assumed for image-sequence folders (equal to `fps`: every image is kept)."""
    workers: int = 1
    """Processes decoding sources in parallel (output is identical for any count)."""
    overwrite: bool = False
    """Replace --out if it exists (only once the new dataset is complete)."""
    progress: bool = True
    """Show a progress bar with files done and frames per second."""

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 1024:
            raise ValueError(f"size={self.size} is outside [8, 1024]")
        if not 0 < self.fps <= 240:
            raise ValueError(f"fps={self.fps} is outside (0, 240]")
        if not 0 < self.image_fps <= 240:
            raise ValueError(f"image_fps={self.image_fps} is outside (0, 240]")
        if not 2 <= self.clip_frames <= 4096:
            raise ValueError(f"clip_frames={self.clip_frames} is outside [2, 4096]")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride={self.stride} must be at least 1")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be at least 1")

    @property
    def clip_stride(self) -> int:
        return self.stride or self.clip_frames

    def content_key(self) -> str:
        """The fields that change the written data (not workers, overwrite, progress)."""
        keep = ("size", "fps", "clip_frames", "image_fps")
        data = {k: getattr(self, k) for k in keep}
        data["stride"] = self.clip_stride
        return json.dumps(data, sort_keys=True)


@dataclass
class SourceResult:
    """What happened to one source file or image-sequence folder."""

    path: str
    kind: str
    status: str
    reason: str | None = None
    clips: int = 0
    frames: int = 0
    """Frames kept after subsampling."""
    source_frames: int = 0
    """Frames decoded (videos) or images read (sequences)."""
    expected_frames: int | None = None
    """Frames the video container declares (its frame count, else duration x frame rate); None if unknown."""
    has_actions: bool = False
    gaps: int = 0
    """Breaks in a video's timestamps (jumps of more than MAX_GAP_PERIODS frame periods): no clip spans one."""
    time_ranges: list[list[float]] = field(default_factory=list)
    shard: str | None = None

    def manifest_entry(self) -> dict:
        entry = dataclasses.asdict(self)
        entry.pop("shard")
        return entry


@dataclass
class IngestReport:
    """The outcome of `ingest`: where the dataset went and what happened to every source."""

    out: Path
    sources: list[SourceResult]

    @property
    def clips(self) -> int:
        return sum(s.clips for s in self.sources)

    @property
    def failed(self) -> list[SourceResult]:
        return [s for s in self.sources if s.status == "failed"]

    @property
    def partial(self) -> list[SourceResult]:
        return [s for s in self.sources if s.status == "partial"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


# --- discovery ------------------------------------------------------------------------------


def _sidecar_for(path: Path) -> Path | None:
    base = path.parent / (path.name if path.is_dir() else path.stem)
    found = [Path(f"{base}{suffix}") for suffix in SIDECAR_SUFFIXES if Path(f"{base}{suffix}").is_file()]
    if len(found) > 1:
        raise SourceError(f"two action sidecars: {found[0].name} and {found[1].name}; keep one")
    return found[0] if found else None


def discover(src: Path, exclude: tuple[Path, ...] = ()) -> tuple[list[tuple[str, str, Path]], list[SourceResult]]:
    """(kind, relative path, path) of every video and image-sequence folder under src, sorted; plus skipped files."""
    sources: list[tuple[str, str, Path]] = []
    skipped: list[SourceResult] = []
    excluded = {p.resolve() for p in exclude}
    for root, dirs, files in os.walk(src):
        root_path = Path(root)
        # Hidden folders (.git, our own staging folders) and the output folder are never footage.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (root_path / d).resolve() not in excluded)
        # Hidden files (macOS's ._name resource forks) are never frames; image_frames skips them too.
        images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if len(images) == 1:  # a thumbnail or cover beside the footage: it could never make a clip
            skipped.append(SourceResult(_rel(root_path / images[0], src), "other", "skipped",
                                        "a single image, not an image sequence"))
        elif images:
            sources.append(("images", _rel(root_path, src), root_path))
        for name in files:
            path = root_path / name
            lower = name.lower()
            if name.startswith(".") or lower.endswith(IMAGE_EXTENSIONS):
                continue
            if lower.endswith(VIDEO_EXTENSIONS):
                sources.append(("video", _rel(path, src), path))
            elif lower.endswith(SIDECAR_SUFFIXES):
                stem = name[: -len(next(s for s in SIDECAR_SUFFIXES if lower.endswith(s)))]
                owners = [root_path / stem] + [root_path / (stem + ext) for ext in VIDEO_EXTENSIONS]
                if not any(p.is_dir() or p.is_file() for p in owners):
                    skipped.append(SourceResult(_rel(path, src), "sidecar", "skipped",
                                                "action sidecar without a matching video or image folder"))
            else:
                skipped.append(SourceResult(_rel(path, src), "other", "skipped",
                                            f"not a video or image ({Path(name).suffix or 'no extension'})"))
    sources.sort(key=lambda s: natural_key(s[1]))
    skipped.sort(key=lambda s: natural_key(s.path))
    return sources, skipped


def _rel(path: Path, src: Path) -> str:
    return path.relative_to(src).as_posix() or "."


# --- one source -----------------------------------------------------------------------------


def features(config: FootageConfig):
    """The `datasets.Features` of a footage dataset."""
    from datasets import Array4D, Features, Sequence, Value

    t, size = config.clip_frames, config.size
    return Features({
        "clip_id": Value("string"),
        "source": Value("string"),
        "start_time": Value("float64"),
        "end_time": Value("float64"),
        "has_actions": Value("bool"),
        "frames": Array4D((t, size, size, 3), "uint8"),
        "actions": Sequence(Value("int64"), length=t - 1),
    })


def _writer_batch_size(config: FootageConfig) -> int:
    clip_bytes = config.clip_frames * config.size * config.size * 3
    return max(1, min(64, _WRITER_BUFFER_BYTES // clip_bytes))


def ingest_source(kind: str, rel: str, path: Path, shard: Path, config: FootageConfig,
                  on_frame: Callable[[int], None] | None = None) -> SourceResult:
    """Decode one source into clips written to the Arrow shard `shard`; failures come back in the result.

    SourceError (bad input) fails this source; anything else (e.g. the disk) aborts the run.
    """
    from datasets.arrow_writer import ArrowWriter

    result = SourceResult(rel, kind, "ok")
    written = 0
    try:
        sidecar = _sidecar_for(path)
        actions = load_actions(sidecar) if sidecar else None
        result.has_actions = actions is not None
        frames = (video_frames(path, config.size, result, config.fps) if kind == "video"
                  else image_frames(path, config.size, config.image_fps))
        window: collections.deque = collections.deque(maxlen=config.clip_frames)
        period, stride = 1.0 / config.fps, config.clip_stride
        slot = -1  # frames kept since the source (or its last timestamp break) began, less one
        with ArrowWriter(features=features(config), path=str(shard),
                         writer_batch_size=_writer_batch_size(config)) as writer:
            for index, target, getter, new_segment in subsample(_count(frames, result, on_frame), config.fps):
                if new_segment:
                    window.clear()
                    slot = -1
                slot += 1
                window.append((index, target, getter()))
                result.frames += 1
                start = slot - config.clip_frames + 1
                if start < 0 or start % stride:
                    continue
                indices = [w[0] for w in window]
                clip_actions = (_transition_actions(actions, indices)
                                if actions is not None and indices[-1] < len(actions)
                                else np.full(config.clip_frames - 1, NULL_ACTION, dtype=np.int64))
                start_time, end_time = round(window[0][1], 6), round(window[-1][1] + period, 6)
                writer.write({
                    "clip_id": f"{rel}#{result.clips:04d}",
                    "source": rel,
                    "start_time": start_time,
                    "end_time": end_time,
                    "has_actions": actions is not None,
                    "frames": np.stack([w[2] for w in window]),
                    "actions": clip_actions,
                })
                written += 1
                result.clips += 1
                result.time_ranges.append([start_time, end_time])
            writer.finalize()
        if actions is not None and len(actions) != result.source_frames:
            raise SourceError(f"action sidecar {sidecar.name} has {len(actions)} actions for "
                              f"{result.source_frames} source frames")
        if result.clips == 0:
            split = f" (split by {result.gaps} timestamp gaps)" if result.gaps else ""
            raise SourceError(f"too short: {result.frames} frames at {config.fps:g} fps, need {config.clip_frames}"
                              f"{split}")
        # A cut-short file (a half-copied faststart mp4) decodes cleanly up to where it ends.
        if result.expected_frames and result.source_frames < result.expected_frames - _MISSING_FRAMES_TOLERANCE:
            result.status = "partial"
            result.reason = (f"read {result.source_frames} of the {result.expected_frames} frames the container "
                             "declares (file cut short?)")
    except SourceError as exc:
        result.status, result.reason = "failed", str(exc)
        result.clips, result.time_ranges = 0, []
        shard.unlink(missing_ok=True)
        return result
    result.shard = str(shard) if written else None
    return result


def _transition_actions(actions: np.ndarray, indices: list[int]) -> np.ndarray:
    """The action between each pair of consecutive kept frames (source indices `indices`): the source
    actions from one to the next if they all agree, else NULL_ACTION (also between copies of one frame)."""
    out = np.full(len(indices) - 1, NULL_ACTION, dtype=np.int64)
    for j, (a, b) in enumerate(zip(indices[:-1], indices[1:])):
        span = actions[a:b]
        if len(span) and (span == span[0]).all():
            out[j] = span[0]
    return out


def _count(frames: Iterator, result: SourceResult, on_frame: Callable[[int], None] | None) -> Iterator:
    for item in frames:
        result.source_frames += 1
        if on_frame is not None:
            on_frame(1)
        yield item


def _ingest_one(args) -> SourceResult:
    kind, rel, path, shard, config = args
    return ingest_source(kind, rel, path, shard, config)


def _iter_results(jobs: list[tuple], config: FootageConfig, on_frame) -> Iterator[SourceResult]:
    """Results in job (sorted path) order; with workers > 1 from a spawn process pool."""
    if config.workers <= 1 or len(jobs) <= 1:
        for kind, rel, path, shard, cfg in jobs:
            yield ingest_source(kind, rel, path, shard, cfg, on_frame)
        return
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(config.workers, mp_context=context, initializer=die_with_parent,
                                initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_ingest_one, job) for job in jobs]
        for future in futures:
            result = future.result()
            # Test hook (POSTTRAIN_FAULT): the pool's private pid table is the only list of its workers.
            fault_point("ingest_after_first_source", pool._processes or {})
            on_frame(result.source_frames)
            yield result


# --- the dataset ----------------------------------------------------------------------------


def _file_digest(path: Path, digest) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def ingest(src: str | os.PathLike, out: str | os.PathLike, config: FootageConfig | None = None) -> IngestReport:
    """Ingest every video and image sequence under `src` into a `datasets` folder `out` plus manifest.json."""
    from datasets import Dataset, concatenate_datasets
    from datasets.arrow_writer import ArrowWriter

    config = config or FootageConfig()
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"footage folder {src} does not exist or is not a folder")
    # --out may not overlap the footage (it would be deleted), and only a dataset we wrote may be replaced.
    check_output_folder(out, config.overwrite, inputs=(src,), owned_markers=(OUTPUT_MARKER, "manifest.json"))
    if out.is_dir() and not _written_by_ingest(out):
        raise FileExistsError(f"--overwrite refuses to replace {out}: it holds no {OUTPUT_MARKER} and its "
                              "manifest.json is not one footage ingest writes, so posttrain did not write it; "
                              "delete it yourself or choose another --out")
    sources, skipped = discover(src, exclude=(out,))
    if not sources:
        raise ValueError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) or image-sequence folders under {src}")
    staging = staging_folder(out)
    try:
        shards = staging / "shards"
        shards.mkdir()
        jobs = [(kind, rel, path, shards / f"{i:06d}.arrow", config) for i, (kind, rel, path) in enumerate(sources)]
        results: list[SourceResult] = []
        started, decoded = time.perf_counter(), [0]

        def rate() -> dict:  # shown beside the bar: source frames decoded so far and their rate
            return {"frames": decoded[0], "fps": round(decoded[0] / max(time.perf_counter() - started, 1e-9), 1)}

        with progress_bar(len(jobs), "footage", enabled=config.progress) as update:
            def frames(count: int) -> None:
                decoded[0] += count
                update(advance=0, **rate())

            for result in _iter_results(jobs, config, frames):
                results.append(result)
                update(advance=1, **rate())
        digest = hashlib.sha256(config.content_key().encode())
        parts = []
        for result in results:
            if result.shard:
                _file_digest(Path(result.shard), digest)
                parts.append(Dataset.from_file(result.shard))
        if not parts:  # every source failed: still write an empty dataset with the right columns
            empty = staging / "empty.arrow"
            with ArrowWriter(features=features(config), path=str(empty)) as writer:
                writer.finalize()
            parts.append(Dataset.from_file(str(empty)))
        dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        # A content fingerprint (not the random default) keeps the saved folder identical across runs.
        dataset._fingerprint = digest.hexdigest()[:16]
        final_tmp = staging / "dataset"
        save_dataset_quietly(dataset, final_tmp)
        del dataset, parts
        all_results = sorted(results + skipped, key=lambda r: natural_key(r.path))
        manifest = {
            "config": json.loads(config.content_key()),
            "null_action": NULL_ACTION,
            "clips": sum(r.clips for r in results),
            "counts": {s: sum(r.status == s for r in all_results) for s in ("ok", "partial", "failed", "skipped")},
            "sources": [r.manifest_entry() for r in all_results],
        }
        text = json.dumps(manifest, indent=2)
        # One [start, end] pair per line keeps a long video's manifest readable.
        text = re.sub(r"\[\s+(\S+),\s+(\S+)\s+\]", r"[\1, \2]", text)
        (final_tmp / "manifest.json").write_text(text + "\n")
        write_output_marker(final_tmp, "posttrain footage ingest")
        replace_folder(final_tmp, out, set_aside=staging / "previous")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return IngestReport(out, all_results)


def _written_by_ingest(folder: Path) -> bool:
    """Our marker, or (a dataset ingested before the marker existed) a manifest.json with every key ingest writes."""
    if (folder / OUTPUT_MARKER).is_file():
        return True
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(manifest, dict) and set(_MANIFEST_KEYS) <= manifest.keys()
            and isinstance(manifest["sources"], list) and isinstance(manifest["config"], dict))


# --- command line ---------------------------------------------------------------------------


def _footage_ingest(args: argparse.Namespace) -> int:
    try:
        config = FootageConfig(size=args.size, fps=args.fps, clip_frames=args.clip_frames, stride=args.stride,
                               image_fps=args.image_fps, workers=args.workers, overwrite=args.overwrite,
                               progress=not args.quiet)
        report = ingest(args.src, args.out, config)
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError) as exc:
        print(f"posttrain footage: error: {exc}", file=sys.stderr)
        return 2
    for result in report.failed:
        print(f"failed: {result.path}: {result.reason}", file=sys.stderr)
    for result in report.partial:
        print(f"warning: partial: {result.path}: {result.reason}", file=sys.stderr)
    used = sum(r.status in ("ok", "partial") for r in report.sources)
    skipped = sum(r.status == "skipped" for r in report.sources)
    print(f"wrote {report.clips} clips from {used} sources to {report.out} ({len(report.failed)} failed, "
          f"{len(report.partial)} partial, {skipped} skipped; see {report.out / 'manifest.json'})")
    return report.exit_code


def add_footage_parser(subparsers) -> argparse.ArgumentParser:
    """Register `footage ingest` on an argparse subparsers object; the handler (args.func) returns the exit code."""
    footage = subparsers.add_parser("footage", help="ingest your own video and image sequences as clips")
    footage_sub = footage.add_subparsers(dest="footage_command", metavar="SUBCOMMAND", required=True)
    ing = footage_sub.add_parser("ingest", help="videos and image folders -> a `datasets` folder of clips",
                                 description=__doc__.splitlines()[0])
    defaults = FootageConfig()
    ing.add_argument("src", help="folder read recursively for videos and image-sequence folders")
    ing.add_argument("--out", required=True, help="output folder (written atomically, with manifest.json)")
    ing.add_argument("--size", type=int, default=defaults.size, help=f"frame side in pixels (default {defaults.size})")
    ing.add_argument("--fps", type=float, default=defaults.fps, help=f"clip frame rate (default {defaults.fps:g})")
    ing.add_argument("--clip-frames", type=int, default=defaults.clip_frames,
                     help=f"frames per clip (default {defaults.clip_frames})")
    ing.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: --clip-frames)")
    ing.add_argument("--image-fps", type=float, default=defaults.image_fps,
                     help=f"frame rate of image sequences (default {defaults.image_fps:g})")
    ing.add_argument("--workers", type=int, default=defaults.workers, help="decoding processes (default 1)")
    ing.add_argument("--overwrite", action="store_true",
                     help="replace --out if it exists (only a folder footage ingest wrote)")
    ing.add_argument("--quiet", action="store_true", help="no progress bar")
    ing.set_defaults(func=_footage_ingest)
    return footage
