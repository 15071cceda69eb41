"""Progress bars (rich, with ETA) and metrics.jsonl writing shared by every entry point."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True):
    """Yields `update(advance=1, **fields)`; fields (e.g. loss=0.3) show beside the bar."""
    if not enabled or os.environ.get("POSTTRAIN_NO_PROGRESS"):
        yield lambda advance=1, **fields: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                   transient=not sys.stderr.isatty())
    task = bar.add_task(description, total=total, info="")
    with bar:
        def update(advance: int = 1, **fields) -> None:
            info = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            bar.update(task, advance=advance, info=info)
        yield update


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricsWriter:
    """Appends one JSON object per line to `metrics.jsonl` (flushes each line: nothing lost on a kill)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        clean.setdefault("time", round(time.time(), 3))
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
