"""tools/status.py prints times as dates and counts (iteration, steps, world size) as integers."""
from __future__ import annotations

import json
import re
import time

from conftest import call_tool


def test_status_prints_dates_and_integer_counts(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    t = 1_796_300_000.5
    rows = [{"kind": "train", "iteration": 25, "lr": 0.05, "steps": 25, "world_size": 1, "loss": 2.5, "time": t},
            {"kind": "train", "iteration": 50, "lr": 0.05, "steps": 25, "world_size": 3, "loss": 2.0, "time": t + 60},
            {"kind": "eval", "iteration": 50, "teacher_top1": 81.5, "time": t + 61}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = call_tool("tools/status.py", str(run_dir))
    assert res.returncode == 0, res.stderr
    table = res.stdout.split("metrics (last")[1]
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t + 60)) in table
    assert "e+09" not in table and not re.search(r"\b(25|1|3)\.0\b", table), table
    last = [ln.split() for ln in table.splitlines() if ln.strip().startswith("train")][-1]
    assert last[1:2] == ["50"] and "3" in last and "25" in last
