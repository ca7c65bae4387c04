"""tools/summarize.py groups runs over seeds and computes mean +- std (known answers); in this
process (conftest.call_tool) but for one test of its command line."""
from __future__ import annotations

import json

import pytest

from conftest import call_tool, run_tool


def _run(path, **final):
    path.mkdir(parents=True)
    rows = [{"kind": "train", "iteration": 1, "loss": 1.0},
            {"kind": "eval", "iteration": 1, **{k: 0.0 for k in final}},
            {"kind": "eval", "iteration": 2, **final}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_groups_seeds_and_averages(tmp_path):
    _run(tmp_path / "sm_s0", teacher_top1=80.0, student_top1=70.0)
    _run(tmp_path / "sm_s1", teacher_top1=84.0, student_top1=72.0)
    _run(tmp_path / "isd_s0", teacher_knn_top1=60.0, student_knn_top1=61.0)
    res = call_tool("tools/summarize.py", str(tmp_path / "sm_s0"), str(tmp_path / "sm_s1"), str(tmp_path / "isd_s0"))
    assert res.returncode == 0, res.stderr
    assert "| sm | 2 | 82.0 +- 2.8 | 71.0 +- 1.4 |" in res.stdout  # stdev of (80, 84) = 2.83
    assert "| isd (k-NN) | 1 | 60.0 | 61.0 |" in res.stdout
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["sm"]["teacher"] == [80.0, 84.0] and summary["isd"]["metric"] == "knn_top1"


@pytest.mark.slow
def test_unfinished_run_is_one_error_line(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iteration": 1}) + "\n")
    res = run_tool("tools/summarize.py", str(tmp_path / "r"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "no evaluation" in res.stderr
