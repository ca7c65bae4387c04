"""tools/status.py on runs it did not see SLURM run, and on hand-edited logs: a finished run says
`finished (iteration N of N, top-1 ...)` from metrics.jsonl's `finished` record and its final
evaluation, SLURM or not; a local run without one is running (a process holds its lock) or
stopped; any JSON value in metrics.jsonl or submissions.jsonl prints without a traceback."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from conftest import call_tool
from simmatch.checkpoint.store import save_checkpoint
from slurm import submissions


@pytest.fixture(autouse=True)
def _no_scontrol(monkeypatch):
    """No SLURM client: a logged job's state comes from the submissions log, in this process."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))


def _run(tmp_path: Path, *records: dict, lines: list[str] | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in lines or [])
    (run / "metrics.jsonl").write_text(text)
    return run


def _train(it: int) -> dict:
    return {"kind": "train", "iteration": it, "loss": 2.0 / it, "lr": 0.03, "time": 1.7e9 + it}


FINAL_EVAL = {"kind": "eval", "iteration": 400, "student_top1": 86.84, "teacher_top1": 85.0625,
              "student_top5": 99.1, "teacher_top5": 100.0, "time": 1.7e9 + 401}
FINISHED = {"kind": "finished", "iteration": 400, "total_iters": 400, "time": 1.7e9 + 402}


def _status(run: Path, *args: str) -> tuple[int, str, list[str]]:
    res = call_tool("tools/status.py", str(run), *args)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, res.stderr, res.stdout.splitlines()


def _state(lines: list[str]) -> str:
    (line,) = [ln for ln in lines if ln.startswith("state:")]
    return line


def test_a_finished_local_run_says_finished_with_its_final_evaluation(tmp_path):
    """An earlier evaluation at 200 and the final one at 400: the line carries the final one's
    figures (85.0625 shown to two decimals), teacher first; --wait exits 0 at once."""
    run = _run(tmp_path, _train(200), {**FINAL_EVAL, "iteration": 200, "teacher_top1": 50.0}, _train(400),
               FINAL_EVAL, FINISHED)
    code, _, lines = _status(run)
    assert code == 0
    assert _state(lines) == "state:      finished (iteration 400 of 400, top-1 teacher 85.06% / student 86.84%)"
    code, _, lines = _status(run, "--wait")
    assert code == 0 and _state(lines).startswith("state:      finished (")


def test_a_finished_run_without_a_classifier_gives_its_knn_top1(tmp_path):
    run = _run(tmp_path, _train(50), {"kind": "eval", "iteration": 50, "student_knn_top1": 40.0,
                                      "teacher_knn_top1": 42.5}, {"kind": "finished", "iteration": 50,
                                                                  "total_iters": 50})
    assert _state(_status(run)[2]) == \
        "state:      finished (iteration 50 of 50, k-NN top-1 teacher 42.50% / student 40.00%)"


def test_a_slurm_run_keeps_its_job_state_and_adds_finished(tmp_path):
    run = _run(tmp_path, _train(400), FINAL_EVAL, FINISHED)
    submissions.append_event(run, submissions.SUBMITTED, job_id="42", nodes=1)
    submissions.append_event(run, submissions.STARTED, job_id="42", restart=0)
    submissions.append_event(run, submissions.FINISHED, job_id="42", iteration=400)
    code, _, lines = _status(run)
    assert code == 0
    assert _state(lines) == ("state:      COMPLETED (job 42, from the submissions log: finished); "
                             "finished (iteration 400 of 400, top-1 teacher 85.06% / student 86.84%)")


def test_a_local_run_without_the_finished_record_is_stopped_or_running(tmp_path, monkeypatch):
    """Killed after its checkpoint at 20 (no finished record): stopped, resumable from 20. A run
    resumed after it had finished (more iterations) is no longer finished. While a process holds
    the run's lock it is running; --wait returns when the lock is let go, 0 once it finished."""
    from simmatch.run.lock import RunLock

    run = _run(tmp_path, _train(10), _train(20), _train(30))
    for it in (10, 20):
        save_checkpoint({"format": 2, "iteration": it}, run / "checkpoints" / f"ckpt_{it:09d}.pt")
    code, _, lines = _status(run)
    assert code == 0 and _state(lines) == \
        "state:      stopped (local run; iteration 20, the newest checkpoint; the same command resumes it)"
    assert _status(run, "--wait")[0] == 1

    resumed = [_train(400), FINAL_EVAL, FINISHED, {"kind": "resume", "iteration": 400, "world_size": 1,
                                                   "from_iteration": 400, "from_world_size": 1}, _train(410)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in resumed))
    assert _state(_status(run)[2]).startswith("state:      stopped (local run; iteration 20,")

    lock = RunLock(run).acquire()  # this process writes the run
    try:
        assert _state(_status(run)[2]) == f"state:      running (local, pid {os.getpid()} on {socket.gethostname()})"

        def training_ends(seconds: float) -> None:  # --wait's poll: the run finishes meanwhile
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({**FINAL_EVAL, "iteration": 420}) + "\n")
                f.write(json.dumps({**FINISHED, "iteration": 420, "total_iters": 420}) + "\n")
            lock.release()

        monkeypatch.setattr(time, "sleep", training_ends)
        code, _, lines = _status(run, "--wait")
    finally:
        lock.release()
    assert code == 0 and _state(lines).startswith("state:      finished (iteration 420 of 420, top-1")


def test_a_run_from_before_the_finished_record_or_not_started(tmp_path):
    run = _run(tmp_path, _train(10), FINAL_EVAL)  # no checkpoint, no finished record
    assert _state(_status(run)[2]) == \
        "state:      stopped (local run; no checkpoint yet: the same command starts it again)"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _state(_status(empty)[2]) == "state:      not started (no metrics, no checkpoint, no SLURM submission)"


# A hand edit: (records, what the metrics table shows of it)
HAND_EDITS = {
    "a list in a field": ([{**_train(10), "loss": [1, 2]}], ["[1, 2]"]),
    "an object in a field": ([{**_train(10), "loss": {"a": [1]}}], ['{"a": [1]}']),
    "text in a number column": ([{**_train(10), "iteration": "ten", "steps": "x", "world_size": "two"}],
                                ["ten", "two"]),
    "an iteration of 1e308": ([_train(10), {**_train(20), "iteration": 1e308, "world_size": 1e308}], ["1e+308"]),
    "an integer beyond 64 bits": ([{**_train(10), "iteration": 10 ** 30}], [str(10 ** 30)]),
    "booleans": ([{**_train(10), "iteration": True, "loss": False}], ["true", "false"]),
    "a time no clock has": ([{**_train(10), "time": 1e308}, {**_train(20), "time": [1]}], ["1e+308", "[1]"]),
    "a list or null as the kind": ([{"kind": ["a"], "iteration": 3}, {"kind": None, "iteration": 4}],
                                   ['["a"]:', "null:"]),
    "a finished record of text": ([_train(10), {"kind": "finished", "iteration": [10], "total_iters": "ten"}],
                                  ["[10]"]),
}


@pytest.mark.parametrize("edit", list(HAND_EDITS))
def test_any_json_value_in_metrics_prints_without_a_traceback(tmp_path, edit):
    records, shown = HAND_EDITS[edit]
    run = _run(tmp_path, *records, lines=['{"kind": "train", "iteration": NaN, "loss": Infinity}'])
    code, err, lines = _status(run)
    assert code == 0 and err == ""
    table = "\n".join(lines[lines.index("metrics (last 5):"):])
    for text in shown:
        assert text in table, (text, table)
    assert "nan" in table and "inf" in table  # JSON's NaN and Infinity, as written


def test_any_json_value_in_the_submissions_log_prints_without_a_traceback(tmp_path):
    run = _run(tmp_path, _train(10))
    events = [{"event": "submitted", "job_id": [42], "time": {"a": 1}},
              {"event": ["finished"], "job_id": [42], "reason": [1], "iteration": 1e308},
              {"event": None, "job_id": {"a": 1}, "restart": [1]}]
    (run / "submissions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    code, err, lines = _status(run)
    assert code == 0 and err == ""
    history = lines[lines.index("submissions:") + 1:lines.index("metrics (last 5):")]
    assert history[1].split() == ["?", "job", "[42]", '["finished"]', "reason=[1]", "iteration=1e+308"], history


def test_a_finished_tiny_run_says_finished_with_its_eval_record(trained_run):
    """A real finished run (tools/train.py, 8 iterations): the state line carries the figures of
    the eval record its metrics.jsonl ends with."""
    run = trained_run("run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert records[-1]["kind"] == "finished" and records[-1]["iteration"] == final["iteration"] == 8
    assert _state(_status(run)[2]) == (
        f"state:      finished (iteration 8 of 8, top-1 teacher {final['teacher_top1']:.2f}% / "
        f"student {final['student_top1']:.2f}%)")
