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
    # stdev of (80, 84) = 2.83; best = last here; median of the two evaluations (0, 80) = 40
    assert "| sm | 2 | 82.00 +- 2.83 | 82.00 +- 2.83 | 41.00 +- 1.41 | 71.00 +- 1.41 |" in res.stdout
    assert "| isd (k-NN) | 1 | 60.00 | 60.00 | 30.00 | 61.00 |" in res.stdout
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["sm"]["teacher"] == [80.0, 84.0] and summary["isd"]["metric"] == "knn_top1"


@pytest.mark.slow
def test_unfinished_run_is_one_error_line(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iteration": 1}) + "\n")
    res = run_tool("tools/summarize.py", str(tmp_path / "r"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "no evaluation" in res.stderr


def test_table1_best_and_median_of_the_last_20(tmp_path):
    """25 evaluations of a run (top-1 = 3 * i, then a drop at the end), one repeated by a resume:
    the final, the best and the median of the last 20 (known answers), in the table and the JSON."""
    run = tmp_path / "cifar10_40_s0"
    run.mkdir()
    values = [3.0 * i for i in range(24)] + [10.0]
    rows = [{"kind": "eval", "iteration": 10 * (i + 1), "teacher_top1": v, "student_top1": v - 1}
            for i, v in enumerate(values)]
    rows.insert(4, {"kind": "eval", "iteration": 50, "teacher_top1": 99.0, "student_top1": 0.0})  # the later one counts
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = call_tool("tools/summarize.py", str(run))
    assert res.returncode == 0, res.stderr
    # last 20: 3*5 ... 3*23 and 10 -> sorted: 10, 15, 18, ..., 69; 10th and 11th: (39 + 42) / 2 = 40.5
    assert "| cifar10_40 | 1 | 10.00 | 69.00 | 40.50 | 9.00 |" in res.stdout, res.stdout
    summary = json.loads(res.stdout.strip().splitlines()[-1])["cifar10_40"]
    assert summary["teacher_best"] == [69.0] and summary["teacher_median_last20"] == [40.5]
