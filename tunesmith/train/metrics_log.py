"""metrics.jsonl, the run's metrics one JSON object per line, kept consistent with the checkpoint on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunesmith.files import atomic_write_text
from tunesmith.train import distributed


class MetricsLog:
    """metrics.jsonl: one JSON object per line. On resume, lines past the checkpoint are dropped.
    Rank 0 alone writes it; on the other processes this is a no-op. Every record also goes to the
    loggers of train.report_to (`trackers`, train/trackers.py), opened here with the resume step."""

    def __init__(self, path: Path, resume_step: int | None, trackers=None):
        self.path = path if distributed.is_main() else None
        self.trackers = trackers
        if trackers is not None:
            trackers.start(resume_step)
        if self.path is None:
            return
        if resume_step is None:
            atomic_write_text(path, "")
        elif path.exists():
            # Rewritten atomically (files.py): a kill here loses no line.
            kept = [l for l in path.read_text(encoding="utf-8").splitlines() if l and _line_step(l) <= resume_step]
            atomic_write_text(path, "".join(l + "\n" for l in kept))

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record["step"], record)


def _line_step(line: str) -> float:
    """A metrics line's step. A line cut short by a kill mid-write is always past the checkpoint: inf."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
