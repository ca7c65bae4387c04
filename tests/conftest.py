"""Shared test helpers: repository paths, a runner for real multi-process gloo groups, the guard of
the fast tier (a test not marked slow that starts a process fails), tools run in this process
(call_tool), finished tiny runs trained once per test run (trained_run), and the multi-process runs
that several tests read (two_rank_run) or compare theirs with (four_rank_reference)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from conftest_workers import SLURM_FIXTURES, built_once

ROOT = Path(__file__).resolve().parents[1]

# The data and SLURM fixtures live in their own files; registered here, before any test module
# imports them, so that their asserts are rewritten too.
pytest.register_assert_rewrite("conftest_data", "conftest_slurm")
pytest_plugins = ["conftest_data", "conftest_slurm", "conftest_workers"]


def _worker(rank: int, world: int, port: int, fn, args, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        import torch

        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# The ranks are forked from a server process that has imported these once (multiprocessing's
# forkserver, started by the first gloo test) instead of each importing torch afresh (seconds each).
RANK_PRELOAD = ["torch", "torch.distributed", "simmatch.models", "simmatch.methods"]


def run_gloo(fn, world: int, tmp_path: Path, *args) -> list:
    """Run fn(rank, world, *args) in `world` real processes joined by gloo; their results."""
    import multiprocessing

    import torch

    from simmatch.launch.local import free_port

    port = free_port()
    multiprocessing.set_forkserver_preload(RANK_PRELOAD)
    mp.start_processes(_worker, args=(world, port, fn, args, str(tmp_path)), nprocs=world, join=True,
                       start_method="forkserver")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture
def gloo():
    return run_gloo


SLURM_TEST_TIMEOUT_S = 1800  # the first one also installs and starts the local cluster
# Fixtures that start processes (gloo ranks, the SLURM cluster) or train runs: a test using one belongs
# to the slow tier (pyproject.toml's addopts leave it out of a plain `pytest`; `pytest -m "" tests`
# runs everything).
SLOW_FIXTURES = frozenset({"gloo", "trained_run", "four_rank_reference", "two_rank_run"}) | SLURM_FIXTURES
GUARD_MESSAGE = "starts a process: mark it slow"


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects by the marks added here
def pytest_collection_modifyitems(config, items):
    """Tests on SLOW_FIXTURES are marked slow; tests on the local SLURM cluster get a longer timeout
    than pyproject.toml's default."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SLOW_FIXTURES and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
        if "slurm_cluster" in fixtures and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLURM_TEST_TIMEOUT_S))


def pytest_configure(config):
    sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def process_guard(test: str):
    """While on, starting a subprocess or spawning ranks fails `test`: the fast tier runs in this
    process only. Forked DataLoader workers (multiprocessing.Process) are not affected."""

    def refuse(*args, **kwargs):
        pytest.fail(f"{test} {GUARD_MESSAGE} (or keep it in this process)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "_execute_child", refuse)  # run, Popen, check_output, os.popen
        for name in ("system", "posix_spawn", "posix_spawnp"):
            patch.setattr(os, name, refuse)
        for owner in (mp, sys.modules["torch.multiprocessing.spawn"]):
            patch.setattr(owner, "spawn", refuse)
            patch.setattr(owner, "start_processes", refuse)
        yield


def _guarded(item) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if item.get_closest_marker("slow") else process_guard(item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """A test not marked slow fails if it, or a fixture set up for it (of any scope), starts a process."""
    with _guarded(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _guarded(item):
        yield


@pytest.fixture(autouse=True)
def _simmatch_logging_given_back():
    """A test that fails between building a trainer and closing it must not leave the run's handlers
    on the `simmatch` logger: later tests read its records through caplog."""
    yield
    from simmatch.engine.metrics import close_logging

    logger = logging.getLogger("simmatch")
    if logger.handlers or not logger.propagate:
        close_logging(logger)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """scikit-learn's digits as a JPEG tree at 16 px, written once per test run: the runs shared by
    the workers (built_once) name it in their configs, so every worker reads the same path."""
    from simmatch.data.digits import write_digits

    return built_once(tmp_path_factory, "digits16", lambda root: write_digits(root, size=16))


def tiny_overrides(root: Path, run_dir: Path, **extra) -> list[str]:
    """A digits run that takes seconds: resnet10 at 16 px, tiny batches."""
    values = {
        "data.root": str(root), "data.backend": "dali", "data.device": "cpu", "data.num_threads": 1,
        "train.batch_size": 8, "train.mu": 2, "train.log_every": 1, "train.ckpt_every": 1000,
        "train.run_dir": str(run_dir), "optim.iters": 8, "model.proj_dim": 16,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def assert_one_line_error(res, *needles: str) -> None:
    """A refusal as the project gives it: exit 2, one `error: ` line holding each needle, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def rank_losses(method, labeled: dict, unlabeled: dict | None, iteration: int = 0) -> dict:
    """One rank's losses through the engine-facing interface: the step's targets, then the student's
    losses on them (what Trainer.step does for a process that runs one rank)."""
    step = method.targets([labeled], [unlabeled], iteration)
    return method.student_losses(method.student, labeled, unlabeled, step.ranks[0], iteration)


def stop_after_checkpoint(args: list[str], run_dir: Path, iteration: int = 1, signum: int = signal.SIGTERM,
                          timeout: float = 600) -> int:
    """Start the training `python ARGS...` and send it `signum` once it has saved a checkpoint at
    `iteration` or later; it must then save and exit 0. The iteration it stopped at."""
    import time

    from simmatch.run.rundir import RunDir

    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + timeout
        while True:
            assert proc.poll() is None, f"training ended before the signal: {proc.communicate()[1][-3000:]}"
            newest = RunDir(run_dir).newest_checkpoint()
            if newest and newest[0] >= iteration:
                break
            assert time.time() < deadline, "checkpoint never written"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    return int(final_state(run_dir)["iteration"])


def final_state(run_dir: Path) -> dict:
    """The newest checkpoint of a run directory, loaded on the CPU."""
    import torch

    from simmatch.run.rundir import RunDir

    newest = RunDir(run_dir).newest_checkpoint()
    assert newest, f"no checkpoint in {run_dir}"
    return torch.load(newest[1], map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical model-side state and optimizer state (SGD's momenta,
    Adam's moments and step counts)."""
    import torch

    assert a["iteration"] == b["iteration"]
    assert a["method"].keys() == b["method"].keys()
    different = [k for k in a["method"] if not torch.equal(a["method"][k], b["method"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert sa.keys() == sb.keys()
        assert all(sa[k] is None and sb[k] is None or torch.equal(sa[k], sb[k]) for k in sa)


def trained_stopped_resumed(recipe, tmp_path: Path, backend: str, iters: int, copy_at: int) -> tuple[Path, dict, dict]:
    """A recipe's run (`recipe(run_dir)`: the tools/train.py arguments) to its end, then the same run
    interrupted and resumed: with DALI stopped by SIGTERM after its checkpoint of step 2, otherwise
    restarted from a copy of the uninterrupted run's checkpoint of step `copy_at`; the two end
    bit-identical (`assert_same_weights`), and a DALI run exports. (uninterrupted run dir, its final
    state, the resumed run's final state)."""
    ref_dir = tmp_path / "ref"
    ref = call_tool(*recipe(ref_dir))
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = final_state(ref_dir)
    assert reference["iteration"] == iters
    run_dir = tmp_path / "run"
    if backend == "dali":
        assert stop_after_checkpoint(recipe(run_dir), run_dir, iteration=2) < iters
    else:  # the stop itself is the DALI case's: here the run as its checkpoint of `copy_at` left it
        resume_copy(ref_dir, run_dir, copy_at)
    res = call_tool(*recipe(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in (run_dir / "log_rank0.txt").read_text()
    resumed = final_state(run_dir)
    assert_same_weights(resumed, reference)
    if backend == "dali":
        out = call_tool("tools/export.py", str(ref_dir), "--out", str(tmp_path / "exported"))
        assert out.returncode == 0, out.stderr[-3000:]
        assert (tmp_path / "exported.pth").is_file() and (tmp_path / "exported.safetensors").is_file()
    return ref_dir, reference, resumed


def resume_copy(src: Path, dst: Path, at: int) -> Path:
    """`src` as it was when its checkpoint of iteration `at` was written: later checkpoints and
    metrics gone (what an interruption right after that checkpoint leaves)."""
    import json
    import shutil

    from simmatch.run.rundir import RunDir

    shutil.copytree(src, dst, symlinks=True)
    rd = RunDir(dst)
    for it, path in rd.list_checkpoints():
        if it > at:
            path.unlink()
            for side in path.parent.glob(path.name + ".*"):
                side.unlink()
    for link in ("last.pt", "best.pt"):
        (rd.checkpoints / link).unlink(missing_ok=True)
    lines = [ln for ln in (dst / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln).get("iteration", 0) <= at and json.loads(ln).get("kind") == "train"]
    (dst / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    return dst


def save_unchecked(state: dict, path: Path) -> None:
    """A checkpoint file without a digest sidecar, as written before checkpoints carried one."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def run_tool(*args: str, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **popen)


@contextlib.contextmanager
def _like_a_process(out: io.StringIO, err: io.StringIO):
    """What a fresh interpreter gives a command: stdout and stderr (here `out` and `err`), a warning
    logged without a handler printed to stderr (logging.lastResort; pytest's own handlers put aside),
    Python's default warning filters with warnings printed to stderr. Signal handlers that the
    command installs are undone afterwards."""
    import warnings

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    root.handlers[:] = []
    root.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            yield
    finally:
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def call_tool(script: str, *args: str, env: dict[str, str] | None = None,
              timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS...` from the repository root, run in this process: what run_tool returns,
    without a new interpreter (see _like_a_process). The exit status is main()'s return or
    SystemExit's code; an exception escaping main() is a traceback on stderr and status 1. `timeout`
    is run_tool's; here the test's own timeout applies."""
    import importlib.util
    import traceback

    path = ROOT / script
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        patch.setattr(sys, "argv", [str(path), *args])
        patch.setattr(sys, "path", list(sys.path))  # a tool puts the repository on it
        if env is not None:
            for key in set(os.environ) - set(env):
                patch.delenv(key)
            for key, value in env.items():
                patch.setenv(key, value)
        with _like_a_process(out, err):
            try:
                spec = importlib.util.spec_from_file_location(f"_tool_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                code = module.main()
            except SystemExit as exc:
                code = exc.code
            except Exception:
                traceback.print_exc()
                code = 1
    if code is not None and not isinstance(code, int):
        err.write(f"{code}\n")
        code = 1
    return subprocess.CompletedProcess([sys.executable, script, *args], code or 0, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def _trained_runs(digits_root, tmp_path_factory):
    """Finished tiny runs (tiny_overrides plus the given overrides), each trained once per test run
    through tools/train.py (in this process, call_tool); tests get copies of them from `trained_run`."""
    runs: dict[tuple, Path] = {}

    def get(**extra) -> Path:
        key = tuple(sorted((k, str(v)) for k, v in extra.items()))
        if key not in runs:
            def train(folder: Path) -> None:
                overrides = tiny_overrides(digits_root, folder / "run", **extra)
                res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *overrides)
                assert res.returncode == 0, res.stderr[-3000:]

            name = "trained-" + hashlib.sha1(repr(key).encode()).hexdigest()[:12]
            runs[key] = built_once(tmp_path_factory, name, train) / "run"
        return runs[key]

    return get


@pytest.fixture
def trained_run(_trained_runs, tmp_path):
    """trained_run(name, **overrides): this test's own copy, tmp_path / name, of the finished tiny run
    of digits_root with tiny_overrides(..., **overrides), trained once per test run. The copy's saved
    config names the copy as its train.run_dir, as if it had been trained there."""
    import shutil

    def copy(name: str = "run", **extra) -> Path:
        src, dst = _trained_runs(**extra), tmp_path / name
        shutil.copytree(src, dst, symlinks=True)  # checkpoints/last.pt stays a link
        config = dst / "config.yaml"
        text = config.read_text()
        assert text.count(f"run_dir: {src}\n") == 1, text
        config.write_text(text.replace(f"run_dir: {src}\n", f"run_dir: {dst}\n"))
        return dst

    return copy


# The 4-rank run that several tests end bit-identical to, each its own way: stopped by SIGTERM and
# resumed (tests/engine/test_train.py), read from shards (tests/data/test_shards_training.py),
# preempted as a 4-node SLURM job (tests/cluster/test_slurm_four_nodes.py). 4 ranks because with 3+
# the order in which gradients are summed matters; 12 steps of 2 labeled + 4 unlabeled images per
# rank on DALI, logged every step (a test compares its log windows with these rows).
FOUR_RANKS = {"optim.iters": 12, "data.backend": "dali", "data.num_threads": 1, "data.val_batch": 512}


def four_rank_overrides(root: Path, run_dir: Path, **extra) -> list[str]:
    return tiny_overrides(root, run_dir, **{**FOUR_RANKS, **extra})


@pytest.fixture(scope="session")
def four_rank_reference(digits_root, tmp_path_factory) -> Path:
    """The run directory of the uninterrupted `tools/train.py --nproc 4` run of FOUR_RANKS on
    digits_root, trained once per test run; tests only read it."""
    def train(folder: Path) -> None:
        res = run_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--nproc", "4",
                       *four_rank_overrides(digits_root, folder / "run"), timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]

    return built_once(tmp_path_factory, "four_ranks", train) / "run"


# The 2-process run that tests/engine/test_train.py reads for the outputs and tests/config/test_recipe.py
# for the recipe it ran: train.scale=per_gpu with 4 labeled images per rank and a reference batch of
# 4 (k = 2: half of optim.iters=8 at twice the lr), BN pooled over both ranks for the student and
# the authors' train-mode shuffle-BN teacher (an all_to_all under gloo), an evaluation every 2 steps.
TWO_RANKS = {"train.scale": "per_gpu", "train.batch_per_gpu": 4, "optim.base_batch": 4,
             "train.bn_group_ranks": 2, "train.min_bn_images": 24, "train.partial_batch": "drop",
             "data.unlabeled": "complement", "optim.lr": 0.05, "optim.warmup_epochs": 0,
             "model.teacher": "ema_shuffle_bn", "train.eval_every": 4}  # 2 iterations at k = 2


@pytest.fixture(scope="session")
def two_rank_run(digits_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(run directory, finished process) of `tools/train.py --nproc 2` with TWO_RANKS on digits_root,
    trained once per test run; tests only read it."""
    def train(folder: Path) -> None:
        res = run_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--nproc", "2",
                       *tiny_overrides(digits_root, folder / "run", **TWO_RANKS), timeout=600)
        process = {"args": res.args, "returncode": res.returncode, "stdout": res.stdout, "stderr": res.stderr}
        (folder / "process.json").write_text(json.dumps(process))

    folder = built_once(tmp_path_factory, "two_ranks", train)
    process = json.loads((folder / "process.json").read_text())
    return folder / "run", subprocess.CompletedProcess(**process)
