"""Reading the append-only JSON-lines logs of a run (metrics.jsonl, submissions.jsonl)."""
from __future__ import annotations

import json
from pathlib import Path


def read_records(path: str | Path) -> list[dict]:
    """Every JSON object of the file, oldest first ([] without the file). A line cut by a crash,
    being written right now, or not an object is skipped, never fatal."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
