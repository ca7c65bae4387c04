"""Virtual ranks: W processes computing the run of V ranks (train.virtual_world_size=V).

The same tiny SimMatch run (yaml/in1k_1pct.yaml made tiny: resnet10 at 16 px, synthetic data,
2 + 4 images per rank, 3 steps per epoch, 8 steps: L_in starts at step 3) on 4 real gloo ranks,
in 1 process with V=4 and on 2 processes with V=4, through `Trainer.fit` (metrics every step,
a checkpoint every 3). Compared: every step's losses (the global means metrics.jsonl records)
within 1e-5 relative, and the final student, teacher, bank and DA state within 1e-4 relative
(norm of the difference over the norm), for the authors' shuffle-BN teacher with SimMatch's DA,
with ReMixMatch's DA, and with fixed_global BN groups of 2 ranks. The control: the 4-rank run
against itself with one weight moved by one ulp stays inside the same bounds (the bounds hold
for float noise at this lr, so a run that only sums in another order passes), and a run with a
real difference (BN statistics over 2 ranks' images) does not. The lr is low (5e-4) because at
0.003 ReMixMatch's sharpened targets (mask 1 everywhere) amplify one ulp past 1e-5 in 9 steps;
that the student still trains is checked on its update (final - initial weights, within 1e-2
relative of the real run's), which a gradient scaled by the micro-batches would fail.

Also: the images of each teacher BN batch (by index, in order) are those of the real run's
rank; resume at W = 1 and W = 2 with V = 4 is bit-identical; a 4-rank run resumed on 2
processes with V = 4 ends within the bounds of the uninterrupted 4-rank run; each virtual
rank's data stream is the real rank's (indices and pixels), on DALI and torch backends.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, resume_copy, run_gloo
from conftest_data import data_cfg

pytestmark = pytest.mark.timeout(600)

B, MU, SIZE, CLASSES, SPE, STEPS, V = 2, 2, 16, 10, 3, 8, 4
LOSS_TOL, STATE_TOL, UPDATE_TOL = 1e-5, 1e-4, 1e-2
VARIANTS = {
    "shuffle_bn": [],
    # BN over groups of 2 ranks, with ReMixMatch's DA (its labeled marginal over every rank's labels)
    "bn_groups": ["train.scale=fixed_global", f"train.batch_size={B * V}", "train.bn_group_ranks=2",
                  "method.simmatch.da_target=labeled"],
}


def tiny_config(extra: list[str], virtual: int):
    from simmatch.config import load_config

    n = SPE * V * B * MU
    method = next((e.split("=", 1)[1] for e in extra if e.startswith("method.name=")), "simmatch")
    return load_config(ROOT / "yaml" / "in1k_1pct.yaml", [
        "model.arch=resnet10", "model.small_input=true", "model.proj_dim=16",
        f"data.num_classes={CLASSES}", "data.backend=synthetic", f"data.synthetic_size={n}",
        f"data.crop_size={SIZE}", "data.root=/nonexistent", f"train.batch_per_gpu={B}", f"train.mu={MU}",
        "train.min_bn_images=0", "train.channels_last=false", f"optim.base_batch={V * B}",
        f"method.{method}.tau=0.15", "optim.lr=0.0005", "train.log_every=1", f"train.ckpt_every={SPE}",
        "train.keep_ckpts=10",
        "train.async_ckpt=false", f"optim.iters={STEPS}", f"train.virtual_world_size={virtual}", *extra])


def _row_key(row: torch.Tensor) -> str:
    return hashlib.sha1(row.contiguous().numpy().tobytes()).hexdigest()[:16]


def _spy_teacher_batches(method, log: list) -> None:
    """Per step: the (kind, index) of every teacher input row this process holds before the
    shuffle, and the row keys of each teacher forward (one BN batch each)."""
    targets, forward = method.targets, method.teacher.forward

    def spy_targets(labeled, unlabeled, iteration):
        ids = {}
        for lab, unl in zip(labeled, unlabeled):
            for kind, x, index in (("l", lab["x"], lab["index"]), ("u", unl["weak"], unl["index"])):
                ids.update({_row_key(r): (kind, int(i)) for r, i in zip(x, index)})
        log.append({"ids": ids, "forwards": []})
        return targets(labeled, unlabeled, iteration)

    def spy_forward(x, **kwargs):
        log[-1]["forwards"].append([_row_key(r) for r in x])
        return forward(x, **kwargs)

    method.targets, method.teacher.forward = spy_targets, spy_forward


def train(rank: int, world: int, run_dir: str, extra: list[str], virtual: int,
          perturb: bool = False, spy: bool = False) -> dict:
    """Fit the tiny run in `run_dir` (resuming from its newest checkpoint if it has one)."""
    from simmatch.engine.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several processes on 2 cores
    trainer = Trainer(tiny_config(extra, virtual), Path(run_dir), torch.device("cpu"))
    log: list = []
    try:
        if perturb:
            with torch.no_grad():
                w = trainer.method.student.backbone.fc.weight
                w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
        if spy:
            _spy_teacher_batches(trainer.method, log)
        if rank == 0 and not trainer.run_dir.has_checkpoints():
            torch.save(trainer.method.state_dict(), Path(run_dir) / "initial.pt")
        trainer.fit()
    finally:
        trainer.close()
        torch.set_num_threads(threads)
    return {"teacher_batches": log}


def run(tmp: Path, name: str, processes: int, extra: list[str], virtual: int, perturb: bool = False,
        spy: bool = False) -> tuple[Path, list]:
    run_dir = tmp / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if processes == 1:
        return run_dir, [train(0, 1, str(run_dir), extra, virtual, perturb, spy)]
    out = tmp / f"{name}.ranks"
    out.mkdir(exist_ok=True)
    return run_dir, run_gloo(train, processes, out, str(run_dir), extra, virtual, perturb, spy)


def step_losses(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "train"]


def final(run_dir: Path, iteration: int = STEPS) -> dict:
    from simmatch.run.rundir import RunDir

    path = dict(RunDir(run_dir).list_checkpoints())[iteration]
    return torch.load(path, map_location="cpu", weights_only=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def worst_differences(a: Path, b: Path, kinds_of: tuple[str, ...] = ()) -> dict[str, float]:
    """Largest relative difference per kind: step losses, and the final student, teacher, bank
    and DA state (only the state named by `kinds_of`, when given: runs whose DA differ)."""
    la, lb = step_losses(a), step_losses(b)
    assert [r["iteration"] for r in la] == [r["iteration"] for r in lb] == list(range(1, STEPS + 1))
    worst = {"losses": 0.0}
    for ra, rb in zip(la, lb):
        for key in ("loss", "loss_x", "loss_u", "loss_in", "mask"):
            worst["losses"] = max(worst["losses"], rel(torch.tensor(ra[key]), torch.tensor(rb[key])))
    sa, sb = final(a)["method"], final(b)["method"]
    if kinds_of:
        sa, sb = ({k: v for k, v in st.items() if k.startswith(kinds_of)} for st in (sa, sb))
    assert sa.keys() == sb.keys()
    kinds: dict[str, tuple[list, list]] = {}
    for key in sa:
        if not sa[key].is_floating_point():
            assert torch.equal(sa[key], sb[key]), key  # bank labels, DA pointers, BN batch counts
            continue
        kind = kinds.setdefault(key.split(".")[0], ([], []))  # student, teacher, bank, da
        kind[0].append(sa[key].reshape(-1))
        kind[1].append(sb[key].reshape(-1))
    for kind, (xa, xb) in kinds.items():  # each as one vector: parameters and BN statistics
        worst[kind] = rel(torch.cat(xa), torch.cat(xb))
    # What training moved: at this lr the student moves little in 8 steps, so a wrong gradient
    # (e.g. scaled by the micro-batches) would hide in the final weights; it shows here.
    start = torch.load(b / "initial.pt", weights_only=True)
    moved = [(sa[k] - start[k]).reshape(-1) for k in sa if k.startswith("student.") and sa[k].is_floating_point()]
    ref = [(sb[k] - start[k]).reshape(-1) for k in sb if k.startswith("student.") and sb[k].is_floating_point()]
    worst["student_update"] = rel(torch.cat(moved), torch.cat(ref))
    return worst


def within(worst: dict[str, float]) -> bool:
    return (worst["losses"] <= LOSS_TOL and worst["student_update"] <= UPDATE_TOL
            and all(v <= STATE_TOL for k, v in worst.items() if k not in ("losses", "student_update")))


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """The 4-rank runs, trained once per module: {variant: run dir}."""
    tmp = tmp_path_factory.mktemp("real")
    runs = {}

    def get(variant: str) -> Path:
        if variant not in runs:
            runs[variant] = run(tmp, variant, 4, VARIANTS[variant], 0, spy=variant == "shuffle_bn")
        return runs[variant]

    return get


@pytest.fixture(scope="module")
def virtual_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("virtual")
    runs = {}

    def get(variant: str, processes: int) -> tuple[Path, list]:
        key = (variant, processes)
        if key not in runs:
            runs[key] = run(tmp, f"{variant}_w{processes}", processes, VARIANTS[variant], V,
                            spy=variant == "shuffle_bn")
        return runs[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_virtual_ranks_are_the_real_run(real_runs, virtual_runs, variant):
    real, _ = real_runs(variant)
    for processes in (1, 2):
        got, _ = virtual_runs(variant, processes)
        worst = worst_differences(got, real)
        print(variant, processes, worst)
        assert within(worst), (variant, processes, worst)
        assert set(worst) >= {"losses", "student", "teacher", "bank", "da"}
        each = "" if processes == 1 else f", {V // processes} each"
        procs = f"{processes} process{'es' if processes > 1 else ''}"
        running = f"{procs} running {V} virtual ranks{each} (the {V}-GPU recipe)"
        assert f"run {got}: {running}, " in (got / "log_rank0.txt").read_text()  # the start-up line, as it is
    losses = step_losses(real)
    assert all(r["loss_in"] == 0.0 for r in losses[:SPE]) and all(r["loss_in"] > 0 for r in losses[SPE:])
    assert any(r["mask"] > 0 for r in losses)  # L_u trains on some images


@pytest.mark.slow
def test_virtual_tolerance_control(real_runs, tmp_path):
    """One ulp of one weight is float noise: the 4-rank run against itself so moved stays inside
    the bounds (and is really moved); a real change of the run (BN over groups of 2 ranks) does not."""
    real, _ = real_runs("shuffle_bn")
    moved, _ = run(tmp_path, "ulp", 4, [], 0, perturb=True)
    worst = worst_differences(moved, real)
    print("one ulp", worst)
    assert within(worst) and worst["student"] > 0.0
    other = worst_differences(real_runs("bn_groups")[0], real, ("student.", "teacher.", "bank."))  # BN over 2 ranks
    print("BN groups", other)
    assert not within(other)


@pytest.mark.slow
def test_virtual_teacher_bn_batches_hold_the_real_ranks_images(real_runs, virtual_runs):
    """Shuffle-BN over all V ranks: each virtual rank's teacher forward normalises exactly the
    images (kind, index, in order) that the real run's rank of that number normalises."""

    def batches(logs: list) -> list[list[list]]:
        """Per step, every rank's teacher BN batch as (kind, index) rows, in rank order."""
        out = []
        for step in range(STEPS):
            ids = {k: v for log in logs for k, v in log["teacher_batches"][step]["ids"].items()}
            out.append([[ids[k] for k in fwd] for log in logs for fwd in log["teacher_batches"][step]["forwards"]])
        return out

    real = batches(real_runs("shuffle_bn")[1])
    assert all(len(step) == V and all(len(b) == B * (1 + MU) for b in step) for step in real)
    for step in real:  # the global batch split over the BN batches, each image in exactly one
        rows = [row for batch in step for row in batch]
        assert len(set(rows)) == len(rows) == V * B * (1 + MU)
    for processes in (1, 2):
        assert batches(virtual_runs("shuffle_bn", processes)[1]) == real, processes


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_virtual_exact_resume_is_bit_identical(virtual_runs, tmp_path, processes):
    whole, _ = virtual_runs("shuffle_bn", processes)
    resumed = resume_copy(whole, tmp_path / "resumed", SPE)
    run(tmp_path, "resumed", processes, VARIANTS["shuffle_bn"], V)
    a, b = final(resumed), final(whole)
    different = [k for k in b["method"] if not torch.equal(a["method"][k], b["method"][k])]
    assert not different, different[:5]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["world_size"] == V and a["processes"] == processes and len(a["ranks"]) == V
    assert [r["loss"] for r in step_losses(resumed)] == [r["loss"] for r in step_losses(whole)]


@pytest.mark.slow
def test_virtual_four_ranks_resumed_on_two_processes(real_runs, tmp_path):
    """The 4-rank run's checkpoint at step 3, continued by 2 processes with V = 4: the same run."""
    real, _ = real_runs("shuffle_bn")
    resumed = resume_copy(real, tmp_path / "resumed", SPE)
    run(tmp_path, "resumed", 2, VARIANTS["shuffle_bn"], V)
    worst = worst_differences(resumed, real)
    print(worst)
    assert within(worst), worst
    state = final(resumed)
    assert state["world_size"] == V and state["processes"] == 2
    assert [h.get("processes", h["world_size"]) for h in state["world_history"]] == [4, 2]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_virtual_rank_streams_read_the_real_ranks_batches(digits_root, backend):
    """Process p of W with V = 4 runs ranks p*V/W ...: each reads the indices and pixels (the same
    augmentation draws) of that rank of a 4-rank run."""
    from conftest_data import streams_for

    cpu = torch.device("cpu")
    extra = ["data.num_threads=0"] if backend == "torch" else []
    base = ["train.scale=per_gpu", "train.batch_per_gpu=2", "train.mu=2", *extra]

    def draws(streams, n: int = 2) -> list:
        return [(next(streams.labeled), next(streams.unlabeled)) for _ in range(n)]

    real = [draws(streams_for(data_cfg(digits_root, *base, backend=backend), r, V, cpu)) for r in range(V)]
    got = []
    for p in range(2):
        streams = streams_for(data_cfg(digits_root, *base, f"train.virtual_world_size={V}", backend=backend),
                                p, 2, cpu)
        assert [r.rank for r in streams.train] == [2 * p, 2 * p + 1]
        for r in streams.train:
            got.append([(next(r.labeled), next(r.unlabeled)) for _ in range(2)])
        streams.close()
    for want, have in zip(real, got):
        for (lw, uw), (lh, uh) in zip(want, have):
            assert torch.equal(lw["index"], lh["index"]) and torch.equal(lw["x"], lh["x"])
            assert torch.equal(uw["index"], uh["index"]) and torch.equal(uw["weak"], uh["weak"])
            assert all(torch.equal(a, b) for a, b in zip(uw["strong"], uh["strong"]))
