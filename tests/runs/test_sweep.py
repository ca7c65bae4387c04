"""Sweeps (tools/sweep.py): points named from the grid, the same command trains only what is not
finished, summarize's table equals the runs' own final evaluations, a SLURM job array whose
preempted element ends bit-identical to its local twin.

The slow tests share one local sweep of the digits (a 2 x 2 grid of a 12-step run, one seed: the
several seeds' mean and std are test_sweep_summary_of_written_metrics'), killed in the middle and
given again; the SLURM array trains two of its points again and compares.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_same_weights, call_tool, final_state, tiny_overrides

GRID = ["--grid", "method.simmatch.temperature=0.05,0.1", "--grid", "method.simmatch.alpha=0.7,0.9"]
NAMES = ["method.simmatch.temperature=0.05,method.simmatch.alpha=0.7",
         "method.simmatch.temperature=0.05,method.simmatch.alpha=0.9",
         "method.simmatch.temperature=0.1,method.simmatch.alpha=0.7",
         "method.simmatch.temperature=0.1,method.simmatch.alpha=0.9"]
ITERS = 12


def common(digits: Path) -> list[str]:
    """The tiny run's overrides but its run directory (the sweep names that)."""
    return [o for o in tiny_overrides(digits, Path("unused"), **{"optim.iters": ITERS, "train.ckpt_every": 2})
            if not o.startswith("train.run_dir=")]


def last_eval(run: Path) -> dict:
    """The run's final evaluation, read here from metrics.jsonl line by line."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "eval"][-1]


# --------------------------------------------------------------------------- in process


def test_sweep_points_are_named_from_the_grid(tmp_path):
    from simmatch.run.sweep import Sweep, parse_grid, parse_seeds

    sweep = Sweep("yaml/digits.yaml", parse_grid(GRID[1::2]), parse_seeds("0,1"), ["data.root={sweep}/d{seed}"])
    assert [p.rel for p in sweep.points()] == [f"{n}/s{s}" for n in NAMES for s in (0, 1)]
    third = sweep.points()[3]
    assert sweep.train_overrides(third, tmp_path) == [
        f"data.root={tmp_path}/d1", "method.simmatch.temperature=0.05", "method.simmatch.alpha=0.9",
        "train.seed=1", f"train.run_dir={tmp_path}/{NAMES[1]}/s1"]
    files = Sweep("", parse_grid(["cfg=yaml/digits.yaml,yaml/digits_v2.yaml", "data.root=/a/b,[1,2]"]), [3])
    # '/' and ',' (which separates the keys) are escaped in names
    assert [p.rel for p in files.points()] == [f"cfg={c},data.root={v}/s3" for c in ("digits", "digits_v2")
                                               for v in ("%2Fa%2Fb", "[1%2C2]")]
    assert files.cfg_of(files.points()[2]) == "yaml/digits_v2.yaml"


@pytest.mark.parametrize("argv, needle", [
    (["--grid", "method.simmatch.tau"], "is not of the form key=v1,v2"),
    (["--grid", "method.simmatch.tau=0.5,0.5"], "empty or repeated value"),
    (["--grid", "train.seed=1,2"], "the seeds are --seeds"),
    (["--seeds", "0,x"], "--seeds '0,x'"),
    (["--grid", "method.simmatch.taux=0.5"], "method.simmatch.taux"),
    (["--grid", "method.simmatch.tau=0.5", "method.simmatch.tau=0.6"], "also a --grid key"),
    (["--grid", "method.simmatch.tau=0.5", "train.run_dir=x"], "the sweep sets train.run_dir itself"),
    (["--local", "--nodes", "2", "--grid", "method.simmatch.tau=0.5"], "--local trains here"),
])
def test_sweep_bad_input_is_one_line_and_writes_nothing(tmp_path, argv, needle):
    res = call_tool("tools/sweep.py", "--cfg", "yaml/digits.yaml", "--out", str(tmp_path / "s"), *argv)
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and needle in res.stderr, res.stderr
    assert not (tmp_path / "s").exists()


def test_sweep_another_grid_in_the_same_directory_is_refused(tmp_path):
    from simmatch.run.sweep import Sweep, open_sweep

    open_sweep(tmp_path, Sweep("yaml/digits.yaml", {"method.simmatch.tau": ["0.5", "0.7"]}, [0]))
    before = (tmp_path / "sweep.json").read_bytes()
    res = call_tool("tools/sweep.py", "--cfg", "yaml/digits.yaml", "--out", str(tmp_path), "--local",
                    "--grid", "method.simmatch.tau=0.5,0.8")
    assert res.returncode == 2 and "holds another sweep: its grid" in res.stderr, res.stderr
    assert (tmp_path / "sweep.json").read_bytes() == before


def test_sweep_summary_of_written_metrics(tmp_path):
    """Runs whose metrics.jsonl are written here: the table's means and standard deviations are the
    ones computed by hand; an unfinished seed is counted out."""
    from simmatch.run.sweep import Sweep, open_sweep

    sweep = open_sweep(tmp_path, Sweep("yaml/digits.yaml", {"method.simmatch.tau": ["0.5", "0.9"]}, [0, 1, 2]))
    final = {("0.5", 0): 80.0, ("0.5", 1): 84.0, ("0.5", 2): 85.0, ("0.9", 0): 70.0, ("0.9", 1): 71.0}
    for point in sweep.points():
        run = tmp_path / point.rel
        run.mkdir(parents=True)
        value = final.get((point.params["method.simmatch.tau"], point.seed))
        rows = [{"kind": "train", "iteration": 5, "loss": 1.0},
                {"kind": "eval", "iteration": 5, "teacher_top1": 10.0, "student_top1": 11.0}]
        if value is not None:
            rows += [{"kind": "eval", "iteration": 10, "teacher_top1": value, "student_top1": value - 1},
                     {"kind": "finished", "iteration": 10, "total_iters": 10}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = call_tool("tools/summarize.py", str(tmp_path))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[2] == "| 0.5 | 3 of 3 | 83.00 ± 2.65 |"  # (80+84+85)/3; sqrt((9+1+4)/2)
    assert lines[3] == "| 0.9 | 2 of 3 | 70.50 ± 0.71 |"  # the third seed did not finish
    out = json.loads(lines[-1])
    assert out["figure"] == "teacher_top1" and out["points"][0]["values"] == [80.0, 84.0, 85.0]
    assert math.isclose(out["points"][1]["std"], math.sqrt(0.5))
    csv = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv[0] == "method.simmatch.tau,seeds,of,mean,std" and csv[1].startswith("0.5,3,3,83.0,2.645")
    best = json.loads(call_tool("tools/summarize.py", str(tmp_path), "--figure", "best").stdout.splitlines()[-1])
    assert best["points"][1]["values"] == [70.0, 71.0]
    student = json.loads(call_tool("tools/summarize.py", str(tmp_path), "--figure", "student_top1")
                         .stdout.splitlines()[-1])
    assert student["figure"] == "student_top1" and student["points"][0]["mean"] == 82.0


# --------------------------------------------------------------------------- local runs


def sweep_cmd(out: Path, digits: Path, *where: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "sweep.py"), "--cfg", "yaml/digits.yaml", *GRID, "--seeds", "0",
            "--out", str(out), *where, *common(digits)]


def finished_runs(out: Path) -> list[str]:
    from simmatch.run.sweep import run_finished

    return [f"{n}/s0" for n in NAMES if run_finished(out / n / "s0")]


@pytest.fixture(scope="module")
def local_sweep(digits_root, tmp_path_factory) -> tuple[Path, str, dict]:
    """The 4-run sweep, killed (SIGKILL) while its second run trains, then given again. Returns its
    directory, the second command's output, and what the first run held before it."""
    from conftest_slurm import metrics_iteration, wait_for
    from simmatch.run.lock import holder

    out = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as a SLURM task of one CPU: the same float sums
    first = subprocess.Popen(sweep_cmd(out, digits_root, "--local"), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
    try:
        second = out / NAMES[1] / "s0"
        wait_for(lambda: len(finished_runs(out)) == 1 and metrics_iteration(second) >= 1, 300,
                 "the sweep's second run", poll=0.1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = finished_runs(out)
    assert len(done) == 1, done
    before = {rel: (out / rel / "metrics.jsonl").read_bytes() for rel in done}
    # the second run's process saves and stops on the SIGTERM its parent's death sent it
    wait_for(lambda: holder(second) is None, 120, "the second run's process to stop")
    again = subprocess.run(sweep_cmd(out, digits_root, "--local"), cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    return out, again.stdout, before


@pytest.mark.slow
def test_sweep_killed_then_given_again_trains_only_the_rest(local_sweep, digits_root):
    out, second, before = local_sweep
    assert f"{len(NAMES)} run(s), 1 finished, 3 to train" in second
    assert "finished, not trained again: " + ", ".join(before) in second
    assert second.count(": training (output:") == 3 and second.count(": finished in") == 3
    assert finished_runs(out) == [f"{n}/s0" for n in NAMES]
    assert {rel: (out / rel / "metrics.jsonl").read_bytes() for rel in before} == before  # never trained again
    resumed = (out / NAMES[1] / "s0" / "log_rank0.txt").read_text()
    assert "resumed from" in resumed  # the killed run went on from the checkpoint its SIGTERM saved
    saved = json.loads((out / "sweep.json").read_text())
    assert [p["run_dir"] for p in saved["points"]] == finished_runs(out)
    third = call_tool("tools/sweep.py", *sweep_cmd(out, digits_root, "--local")[2:])
    assert third.returncode == 0 and '"trained": 0' in third.stdout, third.stdout


@pytest.mark.slow
def test_sweep_summarize_status_and_plot(local_sweep):
    out, _, _ = local_sweep
    res = call_tool("tools/summarize.py", str(out))
    assert res.returncode == 0, res.stderr
    table = [ln for ln in res.stdout.splitlines() if ln.startswith("| 0.")]
    assert len(table) == 4
    values = [float(last_eval(out / name / "s0")["teacher_top1"]) for name in NAMES]
    assert [line.split(" | ", 2)[2] for line in table] == [f"1 of 1 | {v:.2f} |" for v in values]
    assert json.loads(res.stdout.splitlines()[-1])["points"][3]["values"] == [values[3]]
    status = call_tool("tools/status.py", str(out), "--wait", "--timeout", "10")
    assert status.returncode == 0 and "finished:   4 of 4" in status.stdout, status.stdout
    plot = call_tool("tools/plot.py", str(out), "--x", "method.simmatch.temperature", "--hue",
                     "method.simmatch.alpha")
    assert plot.returncode == 0 and (out / "sweep.png").stat().st_size > 0, plot.stderr
    assert [ln.split(":")[0].strip() for ln in plot.stdout.splitlines()[1:]] == \
        ["method.simmatch.alpha=0.7", "method.simmatch.alpha=0.9"]


# --------------------------------------------------------------------------- SLURM


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sweep_slurm_array_preempted_element_ends_bit_identical(local_sweep, slurm_env, digits_root, tmp_path):
    """Two points as one job array on the local cluster, one element at a time (--parallel 1); element 0
    preempted (SIGTERM + USR2) after its first checkpoint: it requeues, resumes and ends bit-identical
    to the local sweep's run (and element 1 to the local run that the kill stopped and the second
    command resumed)."""
    from conftest_slurm import events, job_log_tail, metrics_iteration, run_tool, wait_for
    from slurm.launcher import load_job

    twin, _, _ = local_sweep
    out = tmp_path / "array"
    args = ["--cfg", "yaml/digits.yaml", "--grid", "method.simmatch.temperature=0.05", "--grid",
            "method.simmatch.alpha=0.7,0.9", "--seeds", "0", "--out", str(out), "--nodes", "1", "--gpus-per-node",
            "0", "--tasks-per-node", "1", "--timeout", "30", "--parallel", "1", *common(digits_root)]
    proc = run_tool("sweep.py", *args, env=slurm_env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    submitted = json.loads(proc.stdout.splitlines()[-1])["submitted"]
    assert "submitted job array " in proc.stdout and proc.stdout.count("pre-flight ") == 2
    ids = [submitted[f"{n}/s0"] for n in NAMES[:2]]
    assert ids[0].split("_")[0] == ids[1].split("_")[0] and ids[0] != ids[1]  # one array, two elements
    runs = [out / n / "s0" for n in NAMES[:2]]
    jobs = [load_job(run, job_id, num_tasks=1) for run, job_id in zip(runs, ids)]
    try:
        seen = wait_for(lambda: metrics_iteration(runs[0]) >= 2 and metrics_iteration(runs[0]), 300,
                        "the first element's first checkpoint", poll=0.2)
        assert seen < ITERS - 1, "trained too far before it could be interrupted"
        jobs[0]._interrupt()  # what a preemption sends: SIGTERM, then USR2
        for job in jobs:
            job.wait_until_ended(timeout_s=600)
    except BaseException:
        subprocess.run(["scancel", *ids])
        print(job_log_tail(out))
        raise
    assert [e["event"] for e in events(runs[0])] == ["submitted", "started", "requeued", "started", "finished"], \
        job_log_tail(out)
    assert events(runs[0])[2]["reason"] == "preemption" and events(runs[0])[2]["job_id"] == ids[0]
    assert [e["event"] for e in events(runs[1])] == ["submitted", "started", "finished"]
    # --parallel 1: one element at a time; the second started only once the first was requeued
    assert "#SBATCH --array=0-1%1" in (out / "slurm" / f"{ids[0].split('_')[0]}_submission.sh").read_text()
    assert events(runs[1])[1]["unix"] >= events(runs[0])[2]["unix"]
    for run, name in zip(runs, NAMES[:2]):
        assert_same_weights(final_state(run), final_state(twin / name / "s0"))
    status = run_tool("status.py", str(out), env=slurm_env)
    assert status.returncode == 0 and "finished:   2 of 2" in status.stdout, status.stdout
    again = run_tool("sweep.py", *args, env=slurm_env, timeout=300)
    assert again.returncode == 0 and "2 finished, 0 to train" in again.stdout and "submitted" not in again.stdout
