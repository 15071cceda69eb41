"""What every long job shares (scenes generate, footage ingest, adapter export, the training loops).

- `check_output_folder`: --out must not be, contain or lie inside an input, and --overwrite
  replaces only a folder that holds our marker (so a typo never deletes footage or a run).
- `staging_folder`: the `.OUT.partial-*` folder a job writes into before renaming it into place;
  it records its owner process, and staging folders whose owner is provably dead are removed.
- `atomic_write` / `atomic_write_text` / `replace_folder`: the one way a file or folder is put in
  place, by a rename, so a kill mid-write leaves the previous version whole.
- `save_dataset_quietly`: `datasets` save_to_disk without its tqdm bar.
- `read_json_object`: a JSON file that must hold an object, errors naming the file.
- `progress_bar`: the one progress bar (rich, with ETA), silent when disabled or POSTTRAIN_NO_PROGRESS.
- `die_with_parent`: a pool worker's initializer, so workers do not outlive a SIGKILLed parent.
- `fault_point`: deterministic SIGKILLs for tests of killed jobs.

It lives in envs3d because envs3d is the lowest layer (posttrain -> rewards -> envs3d) and
`scenes generate` uses it too; it imports nothing from posttrain.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

OUTPUT_MARKER = "posttrain_output.json"
"""A small JSON file naming the command that wrote an output folder; --overwrite replaces only such folders."""
STAGING_OWNER = ".owner.json"
"""Inside a staging folder: pid, host, boot id and process start time of the job writing it."""
FAULT_ENV = "POSTTRAIN_FAULT"
"""Deterministic fault injection for tests (the trainers use the same variable): see `fault_point`."""


# --- output folders ---------------------------------------------------------------------------


def overlap(out: str | os.PathLike, source: str | os.PathLike) -> str | None:
    """How output folder `out` overlaps input `source` after resolving symlinks: "is", "lies inside",
    "contains", or None when they are apart."""
    resolved_out, resolved_in = Path(out).resolve(), Path(source).resolve()
    if resolved_out == resolved_in:
        return "is"
    if resolved_in in resolved_out.parents:
        return "lies inside"
    if resolved_out in resolved_in.parents:
        return "contains"
    return None


def check_output_folder(out: Path, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                        owned_markers: Iterable[str] = (OUTPUT_MARKER,)) -> None:
    """Refuse an --out that overlaps an input, an existing --out without overwrite, a folder we did not
    write (no file named in `owned_markers`) even with overwrite, and an unwritable parent. Errors name paths."""
    out = Path(out)
    # resolve() follows symlinks, so a link to the footage folder is caught as the footage folder itself.
    resolved_out = out.resolve()
    for source in inputs:
        resolved_in = Path(source).resolve()
        relation = overlap(out, source)
        if relation is None:
            continue
        raise ValueError(f"--out {out} {relation} the input {source} (resolved: {resolved_out} vs {resolved_in}); "
                         "writing there could delete the input, choose a folder outside it")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
        markers = tuple(owned_markers)
        if not out.is_dir() or not any((out / name).is_file() for name in markers):
            raise FileExistsError(f"--overwrite refuses to replace {out}: it holds no {' or '.join(markers)}, so "
                                  "posttrain did not write it; delete it yourself or choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"--out {out}: cannot create parent folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--out {out}: folder {parent} is not writable")


def write_output_marker(folder: Path, command: str) -> None:
    """Mark `folder` as written by `command` (no time or host in it: re-runs stay byte-identical)."""
    (Path(folder) / OUTPUT_MARKER).write_text(json.dumps({"written_by": command}) + "\n")


# --- staging folders --------------------------------------------------------------------------


def staging_folder(out: Path) -> Path:
    """A fresh `.OUT.partial-*` folder beside `out` recording its owner; stale ones of dead owners go first."""
    out = Path(out)
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    (staging / STAGING_OWNER).write_text(json.dumps(_process_identity(os.getpid())))
    return staging


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove `.OUT.partial-*` folders whose owner process is provably dead; returns what was removed.

    A folder without an owner record (an older version, or a job that has not written it yet), of
    another host, or whose owner may still run is left alone. A killed footage ingest may have set
    the previous dataset aside in `previous/` just before renaming the new one in: that is put back.
    """
    out = Path(out)
    removed = []
    for staging in sorted(out.parent.glob(f".{out.name}.partial-*")):
        try:
            owner = json.loads((staging / STAGING_OWNER).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(owner, dict) or not _owner_is_dead(owner):
            continue
        previous = staging / "previous"
        if previous.is_dir() and not out.exists():
            os.replace(previous, out)
        shutil.rmtree(staging, ignore_errors=True)
        removed.append(staging)
    return removed


def _process_identity(pid: int) -> dict:
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start_time": _start_time(pid)}


def _owner_is_dead(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False  # another machine on a shared disk: its processes cannot be seen from here
    if owner.get("boot_id") and _boot_id() and owner["boot_id"] != _boot_id():
        return True  # the machine rebooted since: every process of that boot is gone
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    # A live pid may be a new process that reuses the number: compare start times where /proc has them.
    recorded, current = owner.get("start_time"), _start_time(pid)
    return recorded is not None and current is not None and recorded != current


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc), None elsewhere or if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses, so split after its last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


# --- atomic writes ----------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Put file `path` in place whole: `write(staging)` fills `.NAME.tmp` beside it, which then replaces
    `path` with one rename (os.replace is atomic on POSIX). A kill mid-write leaves the previous file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    write(staging)
    os.replace(staging, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a text file."""
    return atomic_write(path, lambda staging: staging.write_text(text))


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, posttrain_adapter.json, a report): a file that is not
    UTF-8, not JSON or not an object is a ValueError naming it. A missing file stays a FileNotFoundError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def save_dataset_quietly(dataset, path: str | os.PathLike) -> None:
    """`datasets` save_to_disk without its own tqdm bar (ours already shows progress, and --quiet means quiet);
    restores the global setting."""
    from datasets import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        # num_shards=1: with no rows the default would write no data file and the folder would not load.
        dataset.save_to_disk(str(path), num_shards=1 if len(dataset) == 0 else None)
    finally:
        if not was_disabled:
            enable_progress_bars()


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask can only be read by
    setting it, which races other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(folder: str | os.PathLike) -> None:
    """Give the files in `folder` (not below) the mode a plain `open()` would: 0o666 minus the umask.
    safetensors writes its files 0600 (readable by their owner only), which breaks a published model
    or adapter that others on the machine, or a web server, are to read."""
    mask = current_umask()
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def replace_folder(new: str | os.PathLike, out: str | os.PathLike, set_aside: str | os.PathLike | None = None) -> Path:
    """Move the finished folder `new` to `out` with one rename. An existing `out` is deleted first, or,
    with `set_aside` (a path inside the job's staging folder), moved there and put back if the rename
    fails; `remove_stale_staging` also puts it back after a kill between the two renames."""
    new, out = Path(new), Path(out)
    if set_aside is None or not out.exists():
        if out.exists():
            shutil.rmtree(out)
        os.replace(new, out)
        return out
    os.replace(out, set_aside)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(set_aside, out)
        raise
    return out


# --- progress ---------------------------------------------------------------------------------


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "") -> Iterator[Callable]:
    """Yields `update(advance=1, **fields)`; fields (e.g. loss=0.3) show beside the bar. With `unit`
    (e.g. "ep"), the rate shows as "1.2 ep/s". Updates that only change fields (advance=0) redraw at
    most 5 times a second (a caller may report every decoded frame). Silent when disabled or when
    POSTTRAIN_NO_PROGRESS is set."""
    if not enabled or os.environ.get("POSTTRAIN_NO_PROGRESS"):
        yield lambda advance=1, **fields: None
        return
    if not sys.stderr.isatty():  # a log file or a pipe (nohup, CI): rich draws nothing there; plain lines
        yield plain_progress(total, description, unit)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed or 0.0:.1f} {unit}/s")

    rate = [Rate()] if unit else []
    bar = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), *rate, TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                   transient=not sys.stderr.isatty())
    task = bar.add_task(description, total=total, info="")
    last = [0.0]
    with bar:
        def update(advance: int = 1, **fields) -> None:
            now = time.monotonic()
            if not advance and now - last[0] < 0.2:
                return
            last[0] = now
            info = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            bar.update(task, advance=advance, info=info)
        yield update


PLAIN_PROGRESS_SECONDS = 30.0
"""How often `plain_progress` prints a line (besides the first and the last step)."""


def plain_progress(total: int, description: str, unit: str = "", *, every: float | None = None,
                   clock: Callable[[], float] = time.monotonic, stream=None) -> Callable:
    """`progress_bar`'s update for output that is not a terminal: one line such as
    `grpo: 12/24 (50%) 2m10s elapsed, eta 2m10s, reward_mean=0.21` after the first step, after the last,
    and at most every `every` seconds (default PLAIN_PROGRESS_SECONDS) between them."""
    every = PLAIN_PROGRESS_SECONDS if every is None else every
    started, state = clock(), {"done": 0, "printed": None, "fields": {}}

    def minutes(seconds: float) -> str:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    def update(advance: int = 1, **fields) -> None:
        state["done"] += advance
        state["fields"].update(fields)
        now, done = clock(), state["done"]
        due = done >= total or state["printed"] is None or now - state["printed"] >= every
        if not advance or not done or not due:
            return
        state["printed"] = now
        elapsed = now - started
        line = f"{description}: {done}/{total} ({100 * done / max(total, 1):.0f}%) {minutes(elapsed)} elapsed"
        if done < total:
            line += f", eta {minutes(elapsed / done * (total - done))}"
        if unit and elapsed > 0:
            line += f", {done / elapsed:.1f} {unit}/s"
        if state["fields"]:
            line += ", " + " ".join(f"{k}={_fmt(v)}" for k, v in state["fields"].items())
        print(line, file=stream or sys.stderr, flush=True)
    return update


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --- pool workers -----------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_WATCHDOG_SECONDS = 1.0


def die_with_parent(parent_pid: int) -> None:
    """Pool-worker initializer: end this worker when the parent process dies (e.g. SIGKILL).

    A killed parent never tells its pool to stop, and spawn workers keep the call queue's write end
    open themselves, so they would wait on it forever. On Linux the kernel delivers SIGKILL on the
    parent's death (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls os.getppid().
    PR_SET_PDEATHSIG fires when the parent *thread* that started the worker exits: our pools start
    workers from the thread that submits and reads results, which outlives the pool.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            # The parent may have died before prctl ran: then we are already someone else's child.
            if os.getppid() != parent_pid:
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(_WATCHDOG_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def fault_point(name: str, worker_pids: Iterable[int] = ()) -> None:
    """POSTTRAIN_FAULT=NAME SIGKILLs this process here (tests of killed jobs); it first prints the
    worker pids to stderr so a test can check that they die too."""
    if os.environ.get(FAULT_ENV) != name:
        return
    print(f"fault {name}: pid {os.getpid()} workers {sorted(worker_pids)}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
