"""tools/submit.py and tools/status.py without a cluster: the sbatch script, bad input, the log.

These need no SLURM and run in this process (conftest.call_tool) but for the two that start one;
tests/cluster/test_slurm_cluster.py runs jobs and the command lines.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conftest_slurm")

from conftest import call_tool  # noqa: E402
from conftest_slurm import ROOT, FakeResult  # noqa: E402
from slurm import submissions  # noqa: E402
from slurm.jobstate import ScontrolSlurmJob, is_ended, query_job  # noqa: E402
from slurm.launcher import JobSpec, TrainJob, sbatch_script  # noqa: E402


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


submit_tool = _load_tool("submit")
status_tool = _load_tool("status")


def _error_of(capsys, argv: list[str]) -> str:
    """Run submit.py's main in-process; assert exit 2 with exactly one `error:` line."""
    with pytest.raises(SystemExit) as exc:
        submit_tool.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_dry_run_4_nodes_x_8_gpus(tmp_path):
    proc = call_tool("tools/submit.py", "--nodes", "4", "--cfg", "yaml/in1k_1pct.yaml", "--dry-run",
                    "--output-root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR2@90", "--requeue",
                 "--open-mode=append", "--time=1440", "--cpus-per-task=10", "--job-name=simmatch-in1k_1pct"):
        assert f"#SBATCH {flag}" in lines, flag
    folder = tmp_path / "in1k_1pct" / "slurm"
    assert f"#SBATCH --output={folder}/%j_0_log.out" in lines
    srun = next(ln for ln in lines if ln.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and f"-m submitit.core._submit {folder}" in srun
    assert "export SUBMITIT_EXECUTOR=slurm" in lines
    assert not (tmp_path / "in1k_1pct").exists()  # a dry run writes nothing


def test_dry_run_cpu_tasks_and_options(tmp_path):
    proc = call_tool("tools/submit.py", "--cfg", "yaml/digits.yaml", "--nodes", "2", "--gpus-per-node", "0",
                    "--tasks-per-node", "2", "--partition", "cpu", "--account", "acc", "--qos", "high",
                    "--constraint", "skylake", "--mem", "64G", "--timeout", "120", "--signal-delay", "120",
                    "--job-name", "demo", "--run-dir", str(tmp_path / "r"), "--dry-run", "train.batch_size=8")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for flag in ("--nodes=2", "--ntasks-per-node=2", "--partition=cpu", "--account=acc", "--qos=high",
                 "--constraint=skylake", "--mem=64G", "--time=120", "--signal=USR2@120", "--job-name=demo"):
        assert f"#SBATCH {flag}" in lines, flag
    assert not any("gpus" in ln or "cpus-per-task" in ln for ln in lines)


@pytest.mark.slow
def test_submit_imports_no_torch(tmp_path):
    """Submitting must stay cheap: no torch/CUDA import, a small pickle naming no torch object."""
    code = ("import runpy, sys; sys.argv = ['submit.py', '--cfg', 'yaml/in1k_1pct.yaml', '--dry-run', "
            f"'--output-root', {str(tmp_path)!r}]\n"
            "try:\n    runpy.run_path('tools/submit.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import cloudpickle

    blob = cloudpickle.dumps(TrainJob("yaml/x.yaml", ["a=1"], "/runs/x"))
    assert len(blob) < 1000 and b"torch" not in blob
    job = pickle.loads(blob)
    assert (job.cfg_path, job.overrides, job.run_dir, job.entry) == ("yaml/x.yaml", ["a=1"], "/runs/x",
                                                                     "simmatch.train:run")


@pytest.mark.parametrize("argv, needle", [
    (["--nodes", "0", "--cfg", "yaml/digits.yaml"], "--nodes must be at least 1"),
    (["--cfg", "yaml/nope.yaml"], "config file not found"),
    ([], "either --cfg"),
    (["--cfg", "yaml/digits.yaml", "--resume", "/tmp"], "either --cfg"),
    (["--cfg", "yaml/digits.yaml", "train.no_such_key=1"], "unknown config key 'train.no_such_key'"),
    (["--cfg", "yaml/digits.yaml", "justaword"], "not of the form key=value"),
    (["--cfg", "yaml/digits.yaml", "--gpus-per-node", "8", "--tasks-per-node", "2"], "one task per GPU"),
    (["--cfg", "yaml/digits.yaml", "--gpus-per-node", "0", "--tasks-per-node", "3"], "does not divide"),
    (["--cfg", "yaml/digits.yaml", "--mem", "lots"], "--mem"),
    (["--cfg", "yaml/digits.yaml", "--timeout", "1", "--signal-delay", "90"], "--signal-delay"),
    (["--cfg", "yaml/digits.yaml", "--max-requeues", "-1"], "--max-requeues"),
    (["--resume", "/no/such/run"], "no such directory"),
])
def test_bad_input_is_one_error_line(capsys, argv, needle):
    assert needle in _error_of(capsys, [*argv, "--dry-run"])


def test_slurm_forced_without_sbatch(tmp_path):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))
    proc = call_tool("tools/submit.py", "--slurm", "--cfg", "yaml/digits.yaml", "--run-dir", str(tmp_path / "r"),
                     env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --slurm: no SLURM here (no sbatch on PATH)"


def test_existing_run_needs_resume(capsys, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\n")
    assert "--resume" in _error_of(capsys, ["--cfg", "yaml/digits.yaml", "--run-dir", str(run), "--local"])
    assert "no config.yaml and no submission" in _error_of(capsys, ["--resume", str(tmp_path), "--local"])


def test_resume_uses_saved_config(capsys, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("name: saved\ntrain:\n  batch_size: 6\n")
    assert submit_tool.main(["--resume", str(run), "--gpus-per-node", "0", "--tasks-per-node", "3",
                             "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "--job-name=simmatch-saved" in script and f"--output={run}/slurm/%j_0_log.out" in script


def test_local_run_without_slurm(tmp_path, monkeypatch, capsys):
    """No sbatch: submit.py says so and trains here (a stand-in trainer keeps this fast)."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    calls = []
    monkeypatch.setattr(submit_tool.TrainJob, "__call__",
                        lambda self: calls.append(self) or FakeResult("finished", 3))
    assert submit_tool.main(["--cfg", "yaml/digits.yaml", "--gpus-per-node", "0",
                             "--run-dir", str(tmp_path / "r"), "optim.iters=3"]) == 0
    out = capsys.readouterr().out
    assert "no SLURM found (no sbatch on PATH): running locally: 1 process(es)" in out
    assert calls[0].run_dir == str(tmp_path / "r") and calls[0].overrides == ["optim.iters=3"]
    assert calls[0].train_overrides()[-1] == f"train.run_dir={tmp_path / 'r'}"


def test_job_spec_parameters():
    spec = JobSpec(nodes=4, gpus_per_node=8, cpus_per_task=10, max_requeues=5)
    assert spec.world_size == 32
    p = spec.slurm_parameters()
    assert p["ntasks_per_node"] == 8 and p["gpus_per_node"] == 8 and p["additional_parameters"] == {"requeue": True}
    cpu = JobSpec(nodes=2, gpus_per_node=0, tasks_per_node=3)
    assert cpu.world_size == 6 and "gpus_per_node" not in cpu.slurm_parameters()
    assert "#SBATCH --ntasks-per-node=3" in sbatch_script(cpu, "/runs/x")


def _fake_scontrol(tmp_path: Path, monkeypatch, stdout: str, rc: int = 0, stderr: str = "") -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nprintf '%s' '{stderr}' >&2\nexit {rc}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.slow
def test_states_come_from_scontrol(tmp_path, monkeypatch):
    line = "JobId=7 JobName=x JobState=CANCELLED Reason=None Restarts=1 NodeList=n[1-2]\n"
    _fake_scontrol(tmp_path, monkeypatch, line)
    fields = query_job("7")
    assert (fields["JobState"], fields["Restarts"], fields["NodeList"]) == ("CANCELLED", "1", "n[1-2]")
    job = ScontrolSlurmJob(folder=tmp_path / "slurm", job_id="7", tasks=[0, 1])
    assert job.wait_until_ended(timeout_s=10) == "CANCELLED"  # ended: no result is waited for
    _fake_scontrol(tmp_path, monkeypatch, "", rc=1, stderr="slurm_load_jobs error: Invalid job id specified")
    assert query_job("8")["JobState"] == "NOT_FOUND" and is_ended("NOT_FOUND")
    _fake_scontrol(tmp_path, monkeypatch, "", rc=1, stderr="Unable to contact slurm controller")
    assert query_job("9")["JobState"] == "UNKNOWN" and not is_ended("UNKNOWN")


def test_status_reads_run_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no scontrol: the log decides
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    from simmatch.checkpoint.store import save_checkpoint

    for it in (10, 20):
        save_checkpoint({"format": 2, "iteration": it}, run / "checkpoints" / f"ckpt_{it:09d}.pt")
    with open(run / "metrics.jsonl", "w") as f:
        for it in (5, 10, 15, 20):
            f.write(json.dumps({"kind": "train", "iteration": it, "loss": 1.0 / it}) + "\n")
        f.write(json.dumps({"kind": "eval", "iteration": 20, "student_top1": 55.5}) + "\n")
    submissions.append_event(run, submissions.SUBMITTED, job_id="42", nodes=2)
    submissions.append_event(run, submissions.STARTED, job_id="42", restart=0)
    submissions.append_event(run, submissions.REQUEUED, job_id="42", reason="preemption", iteration=12)
    submissions.append_event(run, submissions.STARTED, job_id="42", restart=1)
    submissions.append_event(run, submissions.FINISHED, job_id="42", iteration=20)
    assert status_tool.main([str(run), "--lines", "2"]) == 0
    out = capsys.readouterr().out
    assert "state:      COMPLETED" in out and "checkpoint: iteration 20" in out
    assert "requeued  reason=preemption iteration=12" in out and "55.5" in out
    assert status_tool.main([str(run), "--wait"]) == 0
    capsys.readouterr()
    submissions.append_event(run, submissions.SUBMITTED, job_id="43")
    submissions.append_event(run, submissions.STOPPED, job_id="43", reason="cancelled")
    assert status_tool.main([str(run), "--wait"]) == 1
    assert "state:      STOPPED" in capsys.readouterr().out
