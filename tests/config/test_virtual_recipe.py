"""Virtual ranks (train.virtual_world_size=V) as the tools show them: the recipe of V ranks on W
processes is the V-GPU recipe (the authors' 8-GPU numbers on 1 or 2 processes), a V the
processes do not divide is refused in one line before anything is written or started, the
pre-flight tells the same run continued on other processes from an elastic resume, and status
names the processes beside the ranks. Everything runs in this process (conftest.call_tool)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, call_tool
from simmatch.checkpoint.elastic import describe
from simmatch.checkpoint.store import save_checkpoint
from simmatch.config import load_config
from simmatch.launch.preflight import check_line, run_checks
from simmatch.run.rundir import RunDir
from simmatch.run.world_sizes import describe as describe_spans
from simmatch.run.world_sizes import spans_from_history, spans_from_metrics, world_sizes_line
from slurm import submissions

CFG = "yaml/in1k_1pct.yaml"
NEW_KEYS = ("virtual_world_size", "micro_batches")


def _recipe(processes: int, *overrides: str) -> tuple[list[str], dict]:
    """tools/train.py --print-config at `processes`: its human lines and its JSON (the last line)."""
    proc = call_tool("tools/train.py", "--cfg", CFG, "--print-config", "--world-size", str(processes), *overrides)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


@pytest.mark.parametrize("processes", [1, 2])
def test_virtual_ranks_recipe_is_the_8_gpu_recipe(processes):
    _, gpus = _recipe(8)
    _, virtual = _recipe(processes, "train.virtual_world_size=8")
    assert (gpus["virtual_world_size"], gpus["micro_batches"]) == (0, 1)
    assert (virtual["virtual_world_size"], virtual["micro_batches"]) == (8, 8 // processes)
    assert set(virtual) == set(gpus)
    assert {k: v for k, v in virtual.items() if k not in NEW_KEYS} == \
        {k: v for k, v in gpus.items() if k not in NEW_KEYS}
    # the authors' numbers (script/train.sh, 8 GPUs), not merely whatever 8 processes give
    assert virtual["world_size"] == 8 and (virtual["global_labeled"], virtual["global_unlabeled"]) == (64, 320)
    assert virtual["lr"] == pytest.approx(0.03, rel=1e-12)
    assert virtual["ema_momentum"] == pytest.approx(0.999, rel=1e-12)
    assert (virtual["steps_per_epoch"], virtual["total_iters"]) == (3963, 1585200)


def test_virtual_ranks_lines_name_processes_not_gpus():
    lines, _ = _recipe(1, "train.virtual_world_size=8")
    # what runs, as it is: one process running the 8 ranks of the 8-GPU recipe, not "world size 8"
    assert lines[0] == ("recipe of in1k_1pct (simmatch) on 1 process running 8 virtual ranks (the 8-GPU recipe), "
                        "train.scale=per_gpu")
    assert ("  ranks        1 process running 8 virtual ranks (the 8-GPU recipe): 8 micro-batches of 8 + 40 "
            "images per process per step (train.virtual_world_size=8)") in lines
    assert ("  batch        8 labeled + 40 unlabeled per rank; 64 + 320 per step over 8 virtual ranks on "
            "1 process") in lines
    assert not any("GPU" in ln.replace("(the 8-GPU recipe)", "") for ln in lines), lines  # no unit "per GPU"
    lines, _ = _recipe(2, "train.virtual_world_size=8")
    assert lines[0].startswith("recipe of in1k_1pct (simmatch) on 2 processes running 8 virtual ranks, 4 each "
                               "(the 8-GPU recipe)"), lines[0]
    lines, _ = _recipe(8)
    assert "  ranks        8 process(es), one rank each (train.virtual_world_size=0)" in lines
    assert "  batch        8 labeled + 40 unlabeled per GPU; 64 + 320 per step over 8 GPU(s)" in lines


REFUSED = [(2, 3), (4, 2)]  # (processes, V): V not a multiple of the processes; V below them


def _refused(proc, virtual: int, processes: int) -> None:
    assert proc.returncode != 0 and proc.stdout == "", proc.stdout
    err = proc.stderr.strip().splitlines()
    why = (f"is fewer than the {processes} processes: each process runs at least one rank" if virtual < processes
           else f"is not a multiple of the {processes} process(es): each process runs the same number of virtual ranks")
    assert err == [f"error: train.virtual_world_size={virtual} {why}"], proc.stderr


@pytest.mark.parametrize("processes,virtual", REFUSED)
def test_virtual_ranks_print_config_refuses_in_one_line(processes, virtual):
    proc = call_tool("tools/train.py", "--cfg", CFG, "--print-config", "--world-size", str(processes),
                     f"train.virtual_world_size={virtual}")
    _refused(proc, virtual, processes)


@pytest.mark.parametrize("processes,virtual", REFUSED)
def test_virtual_ranks_submit_dry_run_refuses_in_one_line(processes, virtual, tmp_path):
    run_dir = tmp_path / "run"
    proc = call_tool("tools/submit.py", "--cfg", CFG, "--dry-run", "--nodes", "1", "--gpus-per-node", str(processes),
                     "--run-dir", str(run_dir), f"train.virtual_world_size={virtual}")
    _refused(proc, virtual, processes)
    assert not run_dir.exists()


def test_virtual_ranks_local_launches_refuse_before_starting(tmp_path):
    run_dir = tmp_path / "run"
    proc = call_tool("tools/submit.py", "--cfg", "yaml/digits.yaml", "--local", "--gpus-per-node", "0",
                     "--tasks-per-node", "2", "--run-dir", str(run_dir), "train.virtual_world_size=3")
    _refused(proc, 3, 2)
    proc = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--nproc", "2",
                     f"train.run_dir={run_dir}", "train.virtual_world_size=3")
    _refused(proc, 3, 2)
    assert not run_dir.exists()


def test_virtual_ranks_submit_dry_run_shows_the_8_rank_recipe(tmp_path):
    proc = call_tool("tools/submit.py", "--cfg", CFG, "--dry-run", "--nodes", "1", "--gpus-per-node", "2",
                     "--run-dir", str(tmp_path / "run"), "train.virtual_world_size=8")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (r["world_size"], r["virtual_world_size"], r["micro_batches"], r["lr"]) == (8, 8, 4, 0.03)


def _checkpoint(run_dir: Path, ranks: int, processes: int | None, iteration: int = 100) -> None:
    """A checkpoint the pre-flight can read: a digest beside it and the fields it looks at."""
    state = {"format": 2, "world_size": ranks, "iteration": iteration, "ranks": [{} for _ in range(ranks)]}
    if processes is not None:
        state["processes"] = processes
    save_checkpoint(state, RunDir(run_dir).checkpoint(iteration))


def _preflight(run_dir: Path, processes: int, virtual: int = 0) -> dict[str, str]:
    cfg = load_config(CFG, ["data.backend=synthetic", f"train.run_dir={run_dir}",
                            f"train.virtual_world_size={virtual}"])
    checks = run_checks(cfg, run_dir, processes)
    assert all(c.ok for c in checks), [check_line(c) for c in checks]
    return {c.name: check_line(c) for c in checks}


def test_virtual_ranks_preflight_continues_an_8_gpu_run_on_4_processes(tmp_path):
    _checkpoint(tmp_path, 8, 8)
    lines = _preflight(tmp_path, 4, virtual=8)
    assert lines["batch at the world size"] == (
        "ok    batch at the world size: 4 tasks running 8 virtual ranks (train.virtual_world_size=8, 2 per task), "
        "64 labeled images per step")
    assert lines["resume"] == (
        "ok    resume: resumes from ckpt_000000100.pt (iteration 100, written by 8 ranks): the same 8-rank run "
        "continued on 4 processes (2 virtual ranks each): the same data positions, batches and recipe, "
        "not re-scaled; equal up to float summation order")


def test_virtual_ranks_preflight_names_the_exact_continuation_of_an_elastic_resume(tmp_path):
    _checkpoint(tmp_path, 8, 8)
    lines = _preflight(tmp_path, 4)
    assert lines["batch at the world size"] == \
        "ok    batch at the world size: 4 tasks, one rank each, 32 labeled images per step"
    assert lines["resume"] == (
        "ok    resume: resumes from ckpt_000000100.pt (iteration 100, written by 8 ranks): elastic resume "
        "8 -> 4 ranks: 64 -> 32 labeled images per step, lr 0.03 -> 0.015, iteration 100 -> 200; "
        "train.virtual_world_size=8 would continue the 8-rank run exactly instead (2 virtual ranks per process)")
    # 3 processes cannot run 8 ranks: no hint
    assert _preflight(tmp_path, 3)["resume"].endswith("iteration 100 -> 267")


def test_virtual_ranks_preflight_resumes_a_virtual_run_exactly(tmp_path):
    _checkpoint(tmp_path, 8, 2)
    assert _preflight(tmp_path, 2, virtual=8)["resume"] == (
        "ok    resume: resumes from ckpt_000000100.pt (iteration 100, written by 8 ranks on 2 processes): "
        "same world size, exact resume")
    assert "the same 8-rank run continued on 8 processes (one rank each)" in _preflight(tmp_path, 8)["resume"]


def test_virtual_ranks_preflight_reads_a_checkpoint_without_processes(tmp_path):
    _checkpoint(tmp_path, 4, None)
    assert _preflight(tmp_path, 4)["resume"].endswith("(iteration 100, written by 4 ranks): same world size, "
                                                      "exact resume")
    assert "the same 4-rank run continued on 2 processes" in _preflight(tmp_path, 2, virtual=4)["resume"]


def test_virtual_ranks_elastic_describe_scales_at_the_runs_ranks():
    """Both sides at their ranks: V=8 in the config does not re-scale the 4-rank side."""
    cfg = load_config(CFG, ["train.virtual_world_size=8"])
    assert describe(cfg, 4, 8, 100) == ("elastic resume 4 -> 8 ranks: 32 -> 64 labeled images per step, "
                                        "lr 0.015 -> 0.03, iteration 100 -> 50")


def test_virtual_ranks_world_sizes_name_the_processes(tmp_path):
    records = [
        {"kind": "train", "iteration": 50, "world_size": 8},  # written before "processes" existed
        {"kind": "resume", "iteration": 100, "world_size": 8, "processes": 4, "from_iteration": 100,
         "from_world_size": 8, "from_processes": 8},
        {"kind": "train", "iteration": 150, "world_size": 8},
        {"kind": "train", "iteration": 200, "world_size": 8, "processes": 4},
        {"kind": "resume", "iteration": 400, "world_size": 4, "processes": 4, "from_iteration": 200,
         "from_world_size": 8, "from_processes": 4},
    ]
    assert describe_spans(spans_from_metrics(records)) == (
        "8 ranks (iterations 0-100), 8 ranks on 4 processes (iterations 100-200), 4 ranks (from iteration 400)")
    history = [{"world_size": 8, "iteration": 0}, {"world_size": 8, "processes": 1, "iteration": 10}]
    assert describe_spans(spans_from_history(history)) == \
        "8 ranks (from iteration 0), 8 ranks on 1 process (from iteration 10)"
    submissions.append_event(tmp_path, submissions.SUBMITTED, job_id="1", nodes=1, tasks_per_node=2,
                             gpus_per_node=2, cfg=str(ROOT / CFG), overrides=["train.virtual_world_size=8"])
    assert world_sizes_line(tmp_path, None, submissions.read_events(tmp_path)) == \
        "world sizes: 8 ranks on 2 processes (as last submitted: 1 node(s) x 2 task(s))"
