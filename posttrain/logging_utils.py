"""metrics.jsonl writing and reading shared by every entry point; `progress_bar` is envs3d.jobs' (its one
home: envs3d, the lowest layer, draws one too), re-exported here for the trainers."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from posttrain.envs3d.jobs import progress_bar

__all__ = ["MetricsWriter", "progress_bar", "read_metrics"]


def json_safe(value):
    """`value` with every non-finite float (NaN: a measure with nothing to measure, e.g. no object left
    after erosion) as None, recursively: strict JSON has no NaN token."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


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
        clean = json_safe(record)
        clean.setdefault("time", round(time.time(), 3))
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
