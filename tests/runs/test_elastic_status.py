"""tools/status.py shows every world size a run has trained at, from hand-written run directories:
metrics.jsonl with (and before) the elastic-resume fields, else the checkpoint, else the log."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from simmatch.checkpoint.store import save_checkpoint
from slurm import submissions

pytestmark = pytest.mark.timeout(120)


def _status(run: Path, capsys, monkeypatch) -> str:
    """status.py's 'world sizes:' line (no scontrol on PATH: the log decides the state)."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    spec = importlib.util.spec_from_file_location("tool_status", ROOT / "tools" / "status.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(run)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("world sizes:")]
    assert len(lines) == 1, lines
    return lines[0]


def _metrics(run: Path, *records: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _train(it: int, world: int | None) -> dict:
    rec = {"kind": "train", "iteration": it, "loss": 1.0, "time": 1.7e9 + it}
    if world is not None:
        rec["world_size"] = world
    return rec


def _resume(old_it: int, old_world: int, it: int, world: int) -> dict:
    return {"kind": "resume", "iteration": it, "world_size": world, "from_iteration": old_it,
            "from_world_size": old_world, "time": 1.7e9}


def test_elastic_status_two_ranks_then_one(tmp_path, capsys, monkeypatch):
    # 2 ranks logged up to 50 but checkpointed at 40; resumed on 1 rank, where 40 steps of the
    # 2-rank batch are 80 steps of the halved one; an eval record names no world size
    _metrics(tmp_path, _train(20, 2), _train(40, 2), _train(50, 2), _resume(40, 2, 80, 1), _train(100, 1),
             {"kind": "eval", "iteration": 100, "student_top1": 50.0})
    assert _status(tmp_path, capsys, monkeypatch) == \
        "world sizes: 2 ranks (iterations 0-40), 1 rank (from iteration 80)"


def test_elastic_status_records_before_world_size_and_same_size_resumes(tmp_path, capsys, monkeypatch):
    # train records written before they carried world_size; a same-size resume is no new entry
    _metrics(tmp_path, _train(10, None), _train(20, None), _resume(20, 1, 10, 2), _train(20, 2),
             _resume(20, 2, 20, 2), _train(30, 2), _resume(30, 2, 60, 1), _train(70, 1))
    assert _status(tmp_path, capsys, monkeypatch) == \
        "world sizes: 1 rank (iterations 0-20), 2 ranks (iterations 10-30), 1 rank (from iteration 60)"


def test_elastic_status_one_world_size(tmp_path, capsys, monkeypatch):
    _metrics(tmp_path, _train(5, 4), _train(10, 4), _resume(10, 4, 10, 4), _train(15, 4))
    assert _status(tmp_path, capsys, monkeypatch) == "world sizes: 4 ranks (from iteration 0)"


def test_elastic_status_falls_back_to_the_checkpoint_then_the_log(tmp_path, capsys, monkeypatch):
    run = tmp_path / "r"
    _metrics(run, _train(10, None))  # an older run: its metrics name no world size
    submissions.append_event(run, submissions.SUBMITTED, job_id="7", nodes=2, tasks_per_node=4, gpus_per_node=4)
    assert _status(run, capsys, monkeypatch) == \
        "world sizes: 8 ranks (as last submitted: 2 node(s) x 4 task(s))"
    (run / "checkpoints").mkdir()
    save_checkpoint({"format": 2, "iteration": 10, "world_size": 3}, run / "checkpoints" / "ckpt_000000010.pt")
    assert _status(run, capsys, monkeypatch) == "world sizes: 3 ranks (wrote ckpt_000000010.pt)"
    save_checkpoint({"format": 2, "iteration": 90, "world_size": 1,
                     "world_history": [{"world_size": 2, "iteration": 0}, {"world_size": 1, "iteration": 80}]},
                    run / "checkpoints" / "ckpt_000000090.pt")
    assert _status(run, capsys, monkeypatch) == \
        "world sizes: 2 ranks (from iteration 0), 1 rank (from iteration 80) (checkpoint ckpt_000000090.pt)"


def test_status_reads_metrics_past_a_line_cut_by_a_crash(tmp_path, capsys, monkeypatch):
    """A process killed mid-append leaves a torn line that the resumed run writes after: status
    still shows the records around it (it used to stop with pandas' ValueError)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "iteration": 1, "world_size": 2, "loss": 2.5}) + "\n"
        + '{"kind": "train", "iteration": 2, "lo\n'
        + json.dumps({"kind": "eval", "iteration": 2, "teacher_top1": 40.0}) + "\n")
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    spec = importlib.util.spec_from_file_location("tool_status", ROOT / "tools" / "status.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = tool.report(run, 5)
    assert "world sizes: 2 ranks (from iteration 0)" in text
    assert "teacher_top1" in text and "40.0" in text and "2.5" in text
