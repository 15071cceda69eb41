"""Who owns a run folder: refuse to clobber, lock for the run's life, and resume honestly.

Rules (docs/reliability.md states them for users):
- a run writes into an empty or new `out`; a non-empty `out` needs `--resume` (continue it) or
  `--overwrite` (replace it), and `--overwrite` deletes only a folder that holds this toolkit's
  run marker (`.posttrain-run`), never anything else; a marked folder left by a start that failed on
  bad input (nothing but the marker, lock, config.json and empty logs: `FAILED_START`) is reused as if empty;
- `out` may not be, contain, or lie inside an input (the model folder, and every recipe value under a key
  named `path` or `*_path`: datasets, held-out sets, pair files, a learned reward; see `input_paths`);
- one process (rank 0) holds an exclusive lock on `out/.lock` while the run lives; a second run on
  the same folder is refused with a message naming the first (its pid, host and start time). The
  lock is an OS-level `flock`, so it disappears with its process, even after SIGKILL;
- on `--resume`, the recipe must match the run's `config.json` except for fields that cannot
  change the trained weights (`RESUMABLE_CHANGES`), and `metrics.jsonl` is cut back to the
  checkpoint's step so that no step appears twice.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from posttrain.envs3d.jobs import read_json_object

MARKER = ".posttrain-run"
LOCK = ".lock"

RESUMABLE_CHANGES = ("resume", "overwrite", "out", "steps", "eval", "eval_temperatures", "reward_workers",
                     "data.workers", "data.cache_dir",
                     "train.threads", "train.tensorboard", "train.eval_at_end", "train.video_every",
                     "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.rollout_batch_size", "train.max_nonfinite_steps", "train.max_minutes")
"""Recipe fields a resumed run may change: they do not alter what the restored state trains (`out` is the
folder being resumed however it is spelled; workers and the cache folder only say how episodes are made)."""

FAILED_START = {LOCK, MARKER, "config.json", "tensorboard", "metrics.jsonl"}
"""What a run writes before its first step. A marked folder holding no more than this (and an empty
metrics.jsonl) is a start that failed on bad input: nothing in it is worth keeping, so a corrected rerun
reuses it without --overwrite."""


def input_paths(recipe: dict, prefix: str = "") -> dict[str, str]:
    """{recipe key: path} for every non-empty value of a key named `path` or ending in `_path` (data.path,
    eval.data.path, pairs.path, a learned reward's params.path, pairs_path, ...): inputs a run must not
    write over."""
    found: dict[str, str] = {}
    items = recipe.items() if isinstance(recipe, dict) else enumerate(recipe)
    for key, value in items:
        name = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list, tuple)):
            found.update(input_paths(value, name))
        elif isinstance(key, str) and (key == "path" or key.endswith("_path")) and value:
            found[name] = str(value)
    return found


def _failed_start(out: Path, contents: list[Path]) -> bool:
    if not (out / MARKER).is_file() or any(p.name not in FAILED_START for p in contents):
        return False
    metrics = out / "metrics.jsonl"  # (tensorboard's event files hold nothing until a step logs)
    return not metrics.exists() or metrics.stat().st_size == 0


def check_not_overlapping(out: Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output folder that is, contains, or lies inside one of `inputs` ({what: path})."""
    from posttrain.envs3d.jobs import overlap

    for what, path in inputs.items():
        how = overlap(out, path) if path else None
        if how:
            raise ValueError(f"output {out} {how} the {what} {path}: an output may not be, contain "
                             f"or lie inside an input (nothing was written)")


def prepare_run_folder(out: str | Path, *, resume: bool, overwrite: bool, main_process: bool = True,
                       inputs: dict[str, str | Path | None] | None = None) -> None:
    """Check (all ranks) and, on the main process, clear a run folder before anything is written."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    check_not_overlapping(out, inputs or {})
    if out.exists() and not out.is_dir():
        raise ValueError(f"run folder {out} is a file, not a folder")
    contents = [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if not contents or resume:
        return
    if _failed_start(out, contents):
        overwrite = True  # our own marker and nothing a step wrote: clear it as --overwrite would
    if not overwrite:
        raise FileExistsError(f"run folder {out} is not empty: pass --resume to continue it, --overwrite to "
                              f"replace it, or choose another out=")
    if not (out / MARKER).is_file():
        raise FileExistsError(f"--overwrite: {out} holds no {MARKER} marker, so it was not written by a posttrain "
                              f"run; refusing to delete it")
    if main_process:
        holder = _lock_holder(out)
        if holder:
            raise FileExistsError(f"run folder {out} is in use by another run ({holder}); not overwriting it")
        for path in contents:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


class RunLock:
    """An exclusive `flock` on `out/.lock`, held until `release()` or process exit."""

    def __init__(self, out: str | Path, method: str):
        import fcntl

        self.path = Path(out) / LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise FileExistsError(f"run folder {out} is in use by another run ({_lock_holder(out) or 'unknown'}); "
                                  f"wait for it to finish or choose another out=") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "method": method,
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        self._file.flush()
        (Path(out) / MARKER).write_text(json.dumps({"method": method}) + "\n")

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing drops the flock


def _lock_holder(out: Path) -> str | None:
    """'pid 123 on host, grpo, started ...' when another process holds the lock, else None."""
    import fcntl

    path = Path(out) / LOCK
    if not path.is_file():
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                info = json.loads(handle.read() or "{}")
            except json.JSONDecodeError:
                info = {}
            return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, {info.get('method', '?')}, "
                    f"started {info.get('started', '?')}")
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def resume_changes(saved: dict, current: dict) -> list[str]:
    """Fields that differ between the run's saved config and the resumed recipe (besides resumable ones)."""
    old, new = _flatten(saved), _flatten(current)
    changed = []
    for key in sorted(set(old) | set(new)):
        if any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_CHANGES):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            changed.append(f"{key} ({old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r})")
    return changed


def check_resume_config(out: Path, current: dict) -> None:
    path = Path(out) / "config.json"
    if not path.is_file():
        return
    changes = resume_changes(read_json_object(path), current)
    if changes:
        raise ValueError(f"--resume: the recipe differs from {path} in {', '.join(changes)}; the restored "
                         f"optimizer and data order would not follow it. Resume with the original values or "
                         f"start a new run (out=...)")


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop metrics.jsonl records logged after `last_step` (they are replayed on resume); returns how many."""
    from posttrain.envs3d.jobs import atomic_write_text

    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except json.JSONDecodeError:
            dropped += 1  # a line cut by the kill
            continue
        if isinstance(step, int) and step > last_step:
            dropped += 1
        else:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


# Checkpoints of the single-process loops (`adapt_tokenizer`, `pretrain`'s dynamics stage). The Accelerate loop
# (`posttrain.training`) has its own, which also carries every rank's state; these carry tensors only, so
# nothing is ever unpickled on resume.

def optimizer_tensors(optimizer) -> tuple[dict, str]:
    """A torch optimizer's state as flat tensors plus its param groups as JSON (safetensors holds only tensors)."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.contiguous() for index, entry in state["state"].items()
               for key, value in entry.items()}
    return tensors, json.dumps(state["param_groups"])


def load_optimizer(optimizer, tensors: dict, groups: str) -> None:
    """The inverse of `optimizer_tensors`."""
    state: dict = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(groups)})


def write_checkpoint(out: Path, step: int, files: dict[str, tuple[dict, dict]]) -> Path:
    """out/checkpoints/step-N holding one safetensors file per entry of `files` ({name: (tensors, metadata)}),
    written to a temporary folder and renamed, then `latest` (a text file naming it) replaced atomically: a
    kill at any moment leaves the previous checkpoint whole. Older checkpoints are removed after."""
    from safetensors.torch import save_file

    from posttrain.envs3d.jobs import atomic_write_text

    folder = Path(out) / "checkpoints"
    final, staging = folder / f"step-{step:06d}", folder / f".tmp-step-{step:06d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, (tensors, metadata) in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / f"{name}.safetensors"),
                  metadata={k: str(v) for k, v in metadata.items()})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    atomic_write_text(folder / "latest", final.name)
    for old in folder.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The folder `out/checkpoints/latest` names, or None when the run has none."""
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    if not folder.is_dir():
        raise ValueError(f"--resume: {pointer} names {folder.name}, which is missing; the run folder was changed by "
                         f"hand. Start a new run (out=...)")
    return folder


def read_checkpoint_file(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of one safetensors file of a checkpoint."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
