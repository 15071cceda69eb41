"""Reading footage for `posttrain footage ingest` (posttrain/footage.py): action sidecars, and frames from
video files (PyAV, one frame at a time) or image folders, resized, centre-cropped and resampled to a rate.

Every error a source can cause is a `SourceError` naming what is wrong; only that source fails.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from posttrain.envs3d.actions import ACTION_NAMES, NUM_ACTIONS

NULL_ACTION = NUM_ACTIONS
"""Action id meaning "no action label" (= posttrain.envs3d.actions.NUM_ACTIONS = 35, one past the real ids)."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# Frame times are floats from pts * time_base: compare them with a tolerance far below any frame period.
_TIME_EPS = 1e-6

MAX_GAP_PERIODS = 4
"""A jump between consecutive timestamps of more than this many frame periods (of the source's nominal
rate or of --fps, whichever is slower), forward or back, is a break: nothing fills it and no clip spans it."""


class SourceError(Exception):
    """A source cannot be ingested (corrupt, unreadable, too short, bad sidecar); only that file fails."""


def natural_key(name: str) -> list:
    """Sort key putting 'frame_2' before 'frame_10'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


# --- actions --------------------------------------------------------------------------------


def _integer(text: str) -> int | None:
    """`text` as an integer if it is plain ASCII digits with an optional minus ("12", "-3"), else None."""
    # Not str.isdigit() + int(): "--3".lstrip("-") and "²" pass isdigit, then int() raises.
    text = text.strip()
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else None


def _action_value(raw, where: str) -> int:
    if isinstance(raw, str):
        text = raw.strip()
        if (number := _integer(text)) is not None:
            raw = number
        elif text in ACTION_NAMES:
            return ACTION_NAMES.index(text)
        else:
            raise SourceError(f"{where}: unknown action {text!r}")
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= NULL_ACTION:
        raise SourceError(f"{where}: action {raw!r} is not an id in [0, {NULL_ACTION}] or a known name")
    return int(raw)


def load_actions(path: Path) -> np.ndarray:
    """Per-source-frame action ids from a `.actions.csv` (frame,action) or `.actions.json` (list) sidecar."""
    try:
        # utf-8-sig: Excel's "CSV UTF-8" (and some editors) start the file with a byte-order mark.
        if path.name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if not isinstance(data, list):
                raise SourceError(f"{path.name}: expected a JSON list of actions, got {type(data).__name__}")
            return np.array([_action_value(a, f"{path.name}[{i}]") for i, a in enumerate(data)], dtype=np.int64)
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"frame", "action"} <= {f.strip() for f in reader.fieldnames}:
                raise SourceError(f"{path.name}: needs a header with columns frame,action")
            rows = []
            for row in reader:
                if None in row:  # DictReader puts fields beyond the header under the key None
                    raise SourceError(f"{path.name} line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} "
                                      f"fields, the header has {len(reader.fieldnames)}")
                rows.append((reader.line_num, {k.strip(): v for k, v in row.items()}))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise SourceError(f"{path.name}: unreadable action sidecar: {exc}") from None
    actions = np.empty(len(rows), dtype=np.int64)
    seen = np.zeros(len(rows), dtype=bool)
    for line, row in rows:
        where = f"{path.name} line {line}"
        frame = _integer(row["frame"]) if isinstance(row["frame"], str) else None
        if frame is None:
            raise SourceError(f"{where}: frame {row['frame']!r} is not an integer")
        if not 0 <= frame < len(rows) or seen[frame]:
            raise SourceError(f"{where}: frame {frame} is repeated or outside 0..{len(rows) - 1} "
                              "(one row per source frame)")
        seen[frame] = True
        actions[frame] = _action_value(row["action"], where)
    return actions


# --- frames ---------------------------------------------------------------------------------


def _scaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side equal to size, aspect kept."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def _centre_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    top, left = (rgb.shape[0] - size) // 2, (rgb.shape[1] - size) // 2
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


def open_video(path: Path):
    """An opened PyAV container and its first video stream, decoding with threads (as the benchmark does)."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise SourceError(f"unreadable video: {_short(exc)}") from None
    if not container.streams.video:
        container.close()
        raise SourceError("no video stream")
    stream = container.streams.video[0]
    # Frame threading decodes several frames at once; it changes speed, not pixels.
    stream.thread_type = "AUTO"
    return container, stream


def _short(exc: BaseException) -> str:
    # FFmpeg errors carry an errno and the absolute path; the manifest wants the message alone.
    text = (getattr(exc, "strerror", None) or str(exc)).strip() or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


def declared_frames(container, stream) -> int | None:
    """Frames the container says the stream has: its frame count, else duration x average rate."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and stream.time_base and rate:
        return round(float(stream.duration * stream.time_base * rate))
    if container.duration and rate:  # container.duration is in microseconds
        return round(container.duration / 1_000_000 * float(rate))
    return None


class Timeline:
    """Frame times in seconds from the first frame, from decoded timestamps (None where a frame has none).

    Missing or slightly non-increasing timestamps (some raw streams) fall back to the nominal rate. A jump of
    more than `max_gap` seconds from the previous timestamp, forward (an idle pause in a variable-frame-rate
    recording) or back (after a corrupt timestamp far ahead), is a break: the frame keeps its own time and
    starts a new segment, so the gap is never filled with copies and later frames are not shifted.
    """

    def __init__(self, rate: float, max_gap: float):
        self.period, self.max_gap = 1.0 / rate, max_gap
        self.first = self.last = self.last_raw = None
        self.gaps = 0

    def __call__(self, raw: float | None) -> tuple[float, bool]:
        """(time of this frame, whether a break precedes it)."""
        new_segment = False
        if self.last is None:
            t = 0.0 if raw is None else raw
            self.first = t
        elif raw is not None and self.last_raw is not None and abs(raw - self.last_raw) > self.max_gap:
            t, new_segment = raw, True
            self.gaps += 1
        elif raw is None or raw <= self.last:
            t = self.last + self.period
        else:
            t = raw
        self.last = t
        if raw is not None:
            self.last_raw = raw
        return t - self.first, new_segment


def video_frames(path: Path, size: int, result=None, fps: float | None = None,
                 ) -> Iterator[tuple[float, Callable[[], np.ndarray], bool]]:
    """(time in seconds from the first frame, lazy RGB getter, whether a break precedes it: see `Timeline`)
    per decoded frame; only kept frames get converted.

    Sets `result.expected_frames` to the frame count the container declares, and `result.gaps` to the
    number of breaks; `fps` (the rate it is subsampled to) sets the break threshold with the source rate.
    """
    import av
    from av.video.reformatter import VideoReformatter

    container, stream = open_video(path)
    if result is not None:
        result.expected_frames = declared_frames(container, stream)
    # One reformatter per video keeps swscale's context cached: frame.to_ndarray(width=...) builds
    # a new one per call, which costs 15x the scaling itself.
    reformatter = VideoReformatter()
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    # The guessed rate (FFmpeg's r_frame_rate) is the nominal one: a variable-rate recording with long pauses
    # has an average rate far below it.
    nominal = float(stream.guessed_rate or rate)
    timeline = Timeline(rate, MAX_GAP_PERIODS * max(1.0 / nominal, 1.0 / fps if fps else 0.0))
    index = 0
    try:
        decoded = container.decode(stream)
        while True:
            try:
                frame = next(decoded)
            except StopIteration:
                break
            except (av.FFmpegError, OSError, ValueError) as exc:
                raise SourceError(f"corrupt video after {index} frames: {_short(exc)}") from None
            t, new_segment = timeline(frame.time)
            if result is not None:
                result.gaps = timeline.gaps
            yield t, _frame_getter(frame, size, reformatter), new_segment
            index += 1
    finally:
        container.close()
    if index == 0:
        raise SourceError("no decodable frames")


def quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that show `frame` upright: phones record portrait video as landscape
    frames plus a display matrix (FFmpeg's side data, `VideoFrame.rotation`), which decoders do not apply.
    The rotation is rounded to the nearest quarter turn (a display matrix's mirror flags are not applied)."""
    return round((frame.rotation or 0) / 90) % 4


def _frame_getter(frame, size: int, reformatter) -> Callable[[], np.ndarray]:
    def get() -> np.ndarray:
        width, height = _scaled_size(frame.width, frame.height, size)
        # swscale's area filter averages every source pixel (no aliasing when shrinking 640 -> 64).
        rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24", interpolation="AREA")
        # np.rot90 turns counter-clockwise as displayed, like the display matrix's angle.
        return _centre_crop(np.rot90(rgb.to_ndarray(), quarter_turns(frame)), size)

    return get


def resize_image(image, size: int) -> np.ndarray:
    """A PIL image as (size, size, 3) uint8: turned upright by its EXIF orientation, shorter side to size (box
    filter), centre crop."""
    from PIL import Image, ImageOps

    # Cameras store a photo as shot and say in EXIF which way up it goes (phones: 90 degrees for portrait).
    image = ImageOps.exif_transpose(image).convert("RGB")
    width, height = _scaled_size(image.width, image.height, size)
    return _centre_crop(np.asarray(image.resize((width, height), Image.Resampling.BOX)), size)


def image_frames(folder: Path, size: int, image_fps: float,
                 ) -> Iterator[tuple[float, Callable[[], np.ndarray], bool]]:
    """(time, lazy RGB getter, False: no breaks) for the images of a sequence folder in natural order."""
    names = sorted((f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")),
                   key=natural_key)
    for index, name in enumerate(names):
        yield index / image_fps, _image_getter(folder / name, size), False


def _image_getter(path: Path, size: int) -> Callable[[], np.ndarray]:
    def get() -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                return resize_image(image, size)
        except Image.DecompressionBombError as exc:  # not an OSError: Pillow refuses images over ~179 MP
            raise SourceError(f"image {path.name} is too large to read: {_short(exc)}") from None
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise SourceError(f"unreadable image {path.name}: {_short(exc)}") from None

    return get


def subsample(frames: Iterator[tuple[float, Callable, bool]], fps: float,
              ) -> Iterator[tuple[int, float, Callable, bool]]:
    """(source index, target time, getter, whether a break precedes it) at times k / fps, each taking the
    source frame nearest in time.

    Streams with one frame of look-ahead. A source slower than fps repeats frames; the stream ends at the
    last source frame (no target time past it is filled). After a break the targets restart at the first
    k / fps not before the frame that follows it: the gap gets no frames.
    """
    k = 0
    previous = None
    new_segment = False
    for index, (t, getter, starts_segment) in enumerate(frames):
        if starts_segment:
            k, previous, new_segment = math.ceil(t * fps - _TIME_EPS), None, True
        while k / fps <= t + _TIME_EPS:
            target = k / fps
            if previous is not None and target - previous[1] < t - target - _TIME_EPS:
                yield previous[0], target, previous[2], new_segment
            else:
                yield index, target, getter, new_segment
            new_segment = False
            k += 1
        previous = (index, t, getter)
