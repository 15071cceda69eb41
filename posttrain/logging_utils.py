"""metrics.jsonl writing and reading shared by every entry point; `progress_bar` is envs3d.jobs' (its one
home: envs3d, the lowest layer, draws one too), re-exported here for the trainers."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from posttrain.envs3d.jobs import progress_bar

__all__ = ["MetricsWriter", "progress_bar", "read_metrics"]


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
