"""`tools/submit.py --selftest`: one short job on the requested nodes, every task a rank of the
self-test, its report printed by the submitting command (the real local SLURM cluster, 2 of its nodes); the
dry run and a bad option in this process (conftest.call_tool)."""
from __future__ import annotations

import pytest

pytest.register_assert_rewrite("conftest_slurm")

from conftest import call_tool  # noqa: E402
from conftest_slurm import run_tool  # noqa: E402


def test_selftest_job_on_two_nodes(slurm_env, tmp_path):
    proc = run_tool("submit.py", "--selftest", "--slurm", "--nodes", "2", "--gpus-per-node", "0",
                    "--tasks-per-node", "1", "--output-root", str(tmp_path),
                    "--selftest-args=--skip throughput,train-streams,val-stream",
                    env=slurm_env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("submitted self-test job ") and "2 node(s) x 1 task(s)" in out
    lines = {ln[6:22].strip(): ln for ln in out.splitlines() if ln[:4] in ("PASS", "FAIL", "SKIP")}
    assert lines["collectives"].startswith("PASS") and "gloo, 2 rank(s)" in lines["collectives"]
    assert lines["bank all-gather"].startswith("PASS") and lines["cpu decode"].startswith("PASS")
    assert "2 rank(s)" in lines["train step"] and lines["train step"].startswith("PASS")
    assert "0 failed" in out.splitlines()[-1]
    assert list((tmp_path / "selftest").glob("*/slurm/*_0_log.out"))  # the job's logs are kept


def test_selftest_dry_run_and_bad_option(tmp_path):
    proc = call_tool("tools/submit.py", "--selftest", "--nodes", "3", "--dry-run", "--output-root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=3" in proc.stdout and "#SBATCH --gpus-per-node=8" in proc.stdout
    assert "#SBATCH --time=20" in proc.stdout and "#SBATCH --job-name=simmatch-selftest" in proc.stdout
    bad = call_tool("tools/submit.py", "--selftest", "--dry-run", "--selftest-args=--skip speed")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --skip speed: no such check")
