"""For tests/authors/test_authors.py: the authors' 2-rank step (tests/authors/authors_simmatch.py on 2 gloo
ranks) against ONE project process computing both ranks (train.virtual_world_size=2).

The project side runs first, in this process, through `Trainer.step()` with each virtual rank's
streams replaced by the fixed batches of tests/authors/test_authors.py `make_batches` (rank 0's and
rank 1's), and records each step: the student's weights and SGD momenta before it, the lr, its
losses (the mean over the two ranks), the aligned p_w and the targets p_hat / q_hat of both
ranks' rows, the gradient, and after it the teacher, the bank, its labels and the DA queue.
Then the authors' code runs on 2 real ranks (their DDP, their shuffle-BN by all-gather, their
DA all-reduce, their bank all-gather), each rank on its own batches, its student set to the
recorded weights before each step as in test_authors.py (the trajectory is chaotic at one ReLU),
and compares with the recording, rank r against the recorded rows of rank r, losses as the mean
over the ranks: the same quantities and tolerance as test_authors.py, over epoch 0 and into
epoch 1 where L_in starts.
"""
from __future__ import annotations

from pathlib import Path

import torch
from test_authors import (
    FC_SCALE,
    MU,
    SPE,
    STEPS,
    B,
    initial_state,
    make_batches,
    reference_from,
    rel,
    tiny_config,
    to_reference,
    watch_targets,
)

V = 2


def project_two_virtual_ranks(run_dir: Path) -> dict:
    """The project's run of 2 ranks in this process, recorded step by step (module docstring)."""
    from simmatch.engine.optim import lr_at, set_lr
    from simmatch.engine.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(tiny_config(V, virtual=V), run_dir, torch.device("cpu"))
    d, method, opt = trainer.derived, trainer.method, trainer.optimizer
    assert trainer.processes == 1 and trainer.ranks == [0, 1] and d.world_size == V
    with torch.no_grad():
        method.student.backbone.fc.weight.mul_(FC_SCALE)
        method.teacher.module.load_state_dict(method.student.state_dict())
    record: dict = {"initial": initial_state(method), "steps": [],
                    "derived": {"num_labeled": d.num_labeled, "num_unlabeled": d.num_unlabeled,
                                "steps_per_epoch": d.steps_per_epoch}}
    watching = watch_targets(method)
    seen = watching.__enter__()
    streams = [(rank.labeled, rank.unlabeled) for rank in trainer.streams.train]
    for r, rank in enumerate(trainer.streams.train):
        labeled, unlabeled = make_batches(r, V, method.bank.labels)
        rank.labeled, rank.unlabeled = iter(labeled), iter(unlabeled)
    student = dict(method.student.named_parameters())
    try:
        method.train()
        for _ in range(STEPS):
            before = {n: p.detach().clone() for n, p in student.items()}
            momenta = {n: opt.state[p]["momentum_buffer"].clone() for n, p in student.items() if opt.state.get(p)}
            lr = lr_at(trainer.iteration, d.lr, d.warmup_iters, d.total_iters)
            set_lr(opt, lr)
            ours = trainer.step()
            trainer.iteration += 1
            record["steps"].append({
                "before": before, "momenta": momenta, "lr": lr, "losses": ours, **seen[-1],
                "grads": {n: None if p.grad is None else p.grad.clone() for n, p in student.items()},
                "after": {n: p.detach().clone() for n, p in student.items()},
                "teacher": [p.clone() for p in method.teacher.module.parameters()],
                "bank": method.bank.features.clone(), "labels": method.bank.labels.clone(),
                "da_queue": method.da.queue.clone(), "da_ptr": int(method.da.ptr)})
    finally:
        watching.__exit__(None, None, None)
        for rank, (lab, unl) in zip(trainer.streams.train, streams):
            rank.labeled, rank.unlabeled = lab, unl
        trainer.close()
    return record


def authors_ranks(rank: int, world: int, record_file: str) -> dict:
    """The authors' step on this rank, against the recording (module docstring)."""
    from types import SimpleNamespace

    import torch.distributed as tdist

    from simmatch import distributed as sdist

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    record = torch.load(record_file, weights_only=False)
    d = SimpleNamespace(**record["derived"])
    authors = reference_from(record["initial"], d, world)
    ref = authors.module
    cfg = tiny_config(V, virtual=V)
    labeled, unlabeled = make_batches(rank, world, record["initial"]["labels"])
    theirs_of = {n: dict(ref.main.named_parameters())[to_reference(n)] for n in record["steps"][0]["before"]}
    rows = slice(rank * B * MU, (rank + 1) * B * MU)
    worst: dict[str, float] = {}
    out: dict = {"loss_in": [], "ref_loss_in": [], "mask": [], "propagated": [], "head_unused": []}

    def note(key, a, b):
        worst[key] = max(worst.get(key, 0.0), rel(a, b))

    def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone().float()
        tdist.all_reduce(t)
        return t / world

    try:
        for it, mine in enumerate(record["steps"]):
            with torch.no_grad():
                for n, p in mine["before"].items():
                    theirs_of[n].copy_(p)
                    if n in mine["momenta"]:
                        authors.optimizer.state[theirs_of[n]]["momentum_buffer"] = mine["momenta"][n].clone()
            perm = sdist.shuffle_permutation(B * (1 + MU) * world, cfg.train.seed, it)
            theirs = authors.step(*divmod(it, SPE), labeled[it], unlabeled[it], perm)
            out["propagated"].append(("q_hat" in mine, theirs["q_hat"] is not None))
            note("lr", mine["lr"], theirs["lr"])
            note("p_w", mine["p_w"][rows], theirs["p_w"])
            note("p_hat", mine.get("p_hat", mine["p_w"])[rows], theirs["p_hat"])
            if "q_hat" in mine and theirs["q_hat"] is not None:
                note("q_hat", mine["q_hat"][rows], theirs["q_hat"])
            for key in ("loss", "loss_x", "loss_u", "loss_in", "mask"):
                note(key, mine["losses"][key], mean_over_ranks(theirs[key]))
            out["loss_in"].append(float(mine["losses"]["loss_in"]))
            out["ref_loss_in"].append(float(mean_over_ranks(theirs["loss_in"])))
            out["mask"].append(float(mine["losses"]["mask"]))
            unused = [n for n, g in mine["grads"].items() if g is None or theirs_of[n].grad is None]
            out["head_unused"].append(sorted(unused))
            for n, g in mine["grads"].items():
                if n not in unused:
                    note("grad", g, theirs_of[n].grad)
                note("student", mine["after"][n], theirs_of[n])
            for p, q in zip(mine["teacher"], ref.ema.parameters()):
                note("teacher", p, q)
            note("bank", mine["bank"], ref.bank.T)
            assert torch.equal(mine["labels"], ref.labels)
            note("da_queue", mine["da_queue"], ref.DA_queue)
            assert mine["da_ptr"] == int(ref.DA_ptr)
    finally:
        torch.set_num_threads(threads)
    out["worst"] = worst
    return out
