"""The project's SimMatch training, through its real engine, against the authors' code.

The reference is tests/authors/authors_simmatch.py, a transcription of github mingkai-zheng/SimMatch
(its docstring names the files, functions and commit): its own network classes, bank, DA queue,
EMA update, shuffle-BN, losses, DDP wrapper, SGD and lr schedule; torchvision gives the ResNet
layers (their backbone is torchvision's ResNet without `fc`). The project side is `Trainer`
built from yaml/in1k_1pct.yaml made tiny (resnet10 at 16 px, synthetic backend), run step by
step as `Trainer.fit` does (lr from `lr_at` with the trainer's derived values, `Trainer.step()`,
the student in the trainer's own DDP above one rank), its data streams replaced by fixed batches
that the reference reads too. The reference copies the project's initial student once by a name
map, and its bank (initialised by its own code) is set to the project's initial bank: both start
from the same state. An epoch is SPE steps; the run is epoch 0 and two steps of epoch 1, where L_in
and label propagation start (theirs: start_unlabel = epoch > 0; the project's
method.simmatch.propagate_after_epochs=1). At every step, as the relative difference per tensor (norm of
the difference over the norm of the reference): the lr, the aligned weak-view probabilities p_w,
the targets p_hat and q_hat, the losses, the mask, every gradient, the student's and teacher's
parameters after the step, the bank, its labels and the DA queue.

The teacher, bank, DA queue and BN statistics of each side evolve on their own over the run; the
student does not: before each step the reference's student takes the project's weights and SGD
momenta (after they were compared, within the tolerance). The 16-px network's trajectory is
chaotic at the level of one ReLU: ~1e6 units per forward, and a rounding-level difference of the
weights (the sides' formulas round differently, e.g. the EMA's lerp against their mul-add) puts
one unit on the other side of zero at some step, which moves every gradient below it by ~3e-3
(one unit of a layer's ~5e4). For the same reason train.channels_last=false: the layout changes the
convolutions' summation order, a rounding-level difference in the first forward already.

Where the project deliberately differs, and how this test handles it:
- lr: their cosine is set once per epoch (adjust_learning_rate), the project's per step; the
  warm-up is per step in both, base * (step + 1) / warm-up steps (theirs: curr_step = epoch * len
  + i + 1). The run stays in warm-up, where the reference sets its own lr and it is compared;
  `test_lr_schedules` compares both over the whole recipe.
- base lr, EMA momentum and DA length follow the global batch in the project (per_gpu: x, ** and
  / by global batch / optim.base_batch); optim.base_batch is the test's global batch, so they are
  the authors' 0.03, 0.999 and 256 (asserted).
- DA: the project divides by the sum of the filled rows over their count, theirs by the mean of
  all 256 rows, zeros included: a constant factor that the normalisation removes (p_w compared).
- shuffle-BN: the project's permutation is a function of (seed, iteration), sent by one all_to_all
  each way, the identity in one process; theirs is rank 0's randperm, applied by all-gather and
  index, in one process too. The reference is given the project's permutation (a random one in one
  process: BN's batch statistics do not depend on the order).
- L_in: theirs log(softmax(.)), the project's log_softmax(.): equal where the softmax is not 0 (the
  reference asserts it is not).
- bank labels: theirs start at zero and are written as labeled batches pass (on ImageNet 1% the
  labeled set goes round ~19 times in epoch 0), the project's start at the labeled list's labels:
  the reference is given the project's initial labels with its features (same state; drawn alike,
  checked: unit vectors per slot).
- epoch 0: the head is in no loss on either side: its gradient is None (theirs and the project's,
  DDP leaving a parameter unused on every rank so) and SGD skips it, weight decay and momentum
  included; asserted at every step of epoch 0, and the heads compared like every parameter.
- BN running statistics: theirs are rank 0's (DDP broadcasts buffers at each forward), the
  project averages them over ranks; both train in train mode, where they are not used, so they
  are compared in one process only.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from authors_simmatch import RECIPE, Authors, SimMatch, Trunk, loader_len, schedule

from conftest import ROOT

pytestmark = pytest.mark.timeout(300)

CLASSES, B, MU, SIZE, PROJ = 10, 4, 2, 16, 16  # at 8 px layer4 normalises 1x1 maps: ill-conditioned
SPE, STEPS = 3, 5  # steps per epoch; epoch 0 and two steps of epoch 1
FC_SCALE = 10.0  # a confident classifier, so that the 0.7 threshold passes some samples and not others
TOL = 1e-5  # relative (norm of the difference over the norm of the reference), per tensor


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def tiny_config(world: int, virtual: int = 0):
    from simmatch.config import load_config

    n = SPE * world * B * MU  # labeled and unlabeled images: SPE steps per epoch
    return load_config(ROOT / "yaml" / "in1k_1pct.yaml", [
        "model.arch=resnet10", "model.small_input=true", f"model.proj_dim={PROJ}",
        f"data.num_classes={CLASSES}", "data.backend=synthetic", f"data.synthetic_size={n}",
        f"data.crop_size={SIZE}", "data.root=/nonexistent", f"train.batch_per_gpu={B}", f"train.mu={MU}",
        "train.min_bn_images=0", "train.channels_last=false", f"optim.base_batch={world * B}",
        f"train.virtual_world_size={virtual}"])


def make_batches(rank: int, world: int, labels: torch.Tensor) -> tuple[list, list]:
    """STEPS fixed batches of this rank (the dict layout of simmatch/data/base.py `pack_batch`);
    the labeled indices of a step are distinct over the ranks, as a sampler's are."""
    k = labels.numel()
    per_epoch = k // (world * B)
    labeled, unlabeled = [], []
    for s in range(STEPS):
        e, j = divmod(s, per_epoch)
        index = torch.randperm(k, generator=torch.Generator().manual_seed(100 + e))
        index = index[(j * world + rank) * B:(j * world + rank + 1) * B]
        u_index = torch.randperm(k, generator=torch.Generator().manual_seed(200 + s))[rank * B * MU:][:B * MU]
        lab, unl = step_batches(s, rank, labels, index, u_index, SIZE)
        labeled.append(lab)
        unlabeled.append(unl)
    return labeled, unlabeled


def step_batches(step: int, rank: int, labels: torch.Tensor, index: torch.Tensor, u_index: torch.Tensor,
                 size: int) -> tuple[dict, dict]:
    """One rank's fixed batches of a step: random images (seeded by step and rank) for the labeled
    `index` and the unlabeled `u_index`, with their labels (the dict layout of pack_batch)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    b, bu = index.numel(), u_index.numel()
    return ({"x": torch.randn(b, 3, size, size, generator=g), "y": labels[index], "index": index},
            {"weak": torch.randn(bu, 3, size, size, generator=g),
             "strong": [torch.randn(bu, 3, size, size, generator=g)], "y": labels[u_index], "index": u_index})


def to_reference(name: str) -> str:
    """The project's student names -> the authors' `ResNet` (their fc sits beside the trunk)."""
    return name.replace("backbone.fc.", "fc.", 1)


def reference_from(initial: dict, d, world: int) -> Authors:
    """The authors' model, initialised by its own code, then set to the project's initial state
    (`initial`: its student's state dict, bank features and labels)."""
    torch.manual_seed(1234)
    ref = SimMatch(lambda: Trunk([1, 1, 1, 1], small_input=True), CLASSES, PROJ, d.num_labeled)
    ones = torch.ones(d.num_labeled)
    # the same law: Gaussian directions, one unit vector per slot (their columns, the project's rows)
    torch.testing.assert_close(ref.bank.norm(dim=0), ones)
    torch.testing.assert_close(initial["bank"].norm(dim=1), ones)
    ref.main.load_state_dict({to_reference(k): v for k, v in initial["student"].items()})
    ref.init_ema()  # their init: the ema's parameters copied from main
    with torch.no_grad():  # both start from the same state: the project's bank and labels (docstring)
        ref.bank.copy_(initial["bank"].T)
        ref.labels.copy_(initial["labels"])
    steps = loader_len(d.num_unlabeled, world, B * MU)
    assert steps == d.steps_per_epoch == SPE
    return Authors(ref, RECIPE["lr"], steps)


@contextlib.contextmanager
def watch_targets(method):
    """The project's targets of each step, in a list: a forward hook on its DA (p_w) and a spy
    on `pseudo_labels` (p_hat, q_hat, from epoch 1)."""
    import simmatch.methods.simmatch.method as project_simmatch

    seen: list[dict] = []
    hook = method.da.register_forward_hook(lambda _m, _i, out: seen.append({"p_w": out.clone()}))
    propagate = project_simmatch.pseudo_labels

    def spy(*args, **kwargs):
        p_hat, q_hat = propagate(*args, **kwargs)
        seen[-1].update(p_hat=p_hat.clone(), q_hat=q_hat.clone())
        return p_hat, q_hat

    project_simmatch.pseudo_labels = spy
    try:
        yield seen
    finally:
        project_simmatch.pseudo_labels = propagate
        hook.remove()


def initial_state(method) -> dict:
    return {"student": {k: v.clone() for k, v in method.student.state_dict().items()},
            "bank": method.bank.features.clone(),
            "labels": method.bank.labels.clone()}


def compare(rank: int, world: int, run_dir: str, control: str = "") -> dict:
    """Both sides over STEPS steps on `world` ranks; the worst relative difference per quantity."""
    from simmatch import distributed as sdist
    from simmatch.engine.optim import lr_at, set_lr
    from simmatch.engine.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several processes on 2 cores: intra-op threads would oversubscribe them
    cfg = tiny_config(world)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, Path(run_dir), torch.device("cpu"))
    d, method, opt = trainer.derived, trainer.method, trainer.optimizer
    assert (world > 1) == isinstance(trainer.student, torch.nn.parallel.DistributedDataParallel)
    values = d.method_values
    assert abs(d.lr - RECIPE["lr"]) < 1e-15 and d.ema_momentum == RECIPE["ema_m"]
    assert values["da_len"] == RECIPE["DA_len"]
    assert values["propagate_after_epochs"] == SPE and d.warmup_iters == RECIPE["warmup_epoch"] * SPE > STEPS
    assert cfg.model.teacher == "ema_shuffle_bn" and trainer.dtype is None  # fp32, as theirs
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(method.student.parameters()))
    assert all((g["weight_decay"], g["momentum"], g["nesterov"]) ==
               (RECIPE["weight_decay"], RECIPE["momentum"], RECIPE["nesterov"]) for g in opt.param_groups)
    with torch.no_grad():
        method.student.backbone.fc.weight.mul_(FC_SCALE)
        method.teacher.module.load_state_dict(method.student.state_dict())
    authors = reference_from(initial_state(method), d, world)
    ref = authors.module
    ref.lin_from_epoch = 0 if control == "lin_early" else 1
    ref.tt *= 1.0001 if control == "tt" else 1.0
    assert all(torch.equal(p, q) for p, q in zip(method.teacher.module.parameters(), ref.ema.parameters()))

    watching = watch_targets(method)
    seen = watching.__enter__()
    labeled, unlabeled = make_batches(rank, world, method.bank.labels)
    streams = trainer.streams.labeled, trainer.streams.unlabeled
    trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled = iter(labeled), iter(unlabeled)
    student = dict(method.student.named_parameters())
    theirs_of = {n: dict(ref.main.named_parameters())[to_reference(n)] for n in student}
    worst: dict[str, float] = {}
    out: dict = {"loss_in": [], "ref_loss_in": [], "mask": [], "propagated": [], "head_unused": []}

    def note(key, a, b):
        worst[key] = max(worst.get(key, 0.0), rel(a, b))

    try:
        method.train()
        for it in range(STEPS):
            with torch.no_grad():  # the reference's student steps from the project's (docstring)
                for n, p in student.items():
                    theirs_of[n].copy_(p)
                    if opt.state.get(p):
                        authors.optimizer.state[theirs_of[n]]["momentum_buffer"] = \
                            opt.state[p]["momentum_buffer"].clone()
            lr = lr_at(trainer.iteration, d.lr, d.warmup_iters, d.total_iters)  # as Trainer.fit
            set_lr(opt, lr)
            ours = trainer.step()
            trainer.iteration += 1
            if world > 1:
                perm = sdist.shuffle_permutation(B * (1 + MU) * world, cfg.train.seed, it)
            else:
                perm = torch.randperm(B * (1 + MU), generator=torch.Generator().manual_seed(it))
            theirs = authors.step(*divmod(it, SPE), labeled[it], unlabeled[it], perm)
            mine = seen[-1]
            out["propagated"].append(("q_hat" in mine, theirs["q_hat"] is not None))
            note("lr", lr, theirs["lr"])
            note("p_w", mine["p_w"], theirs["p_w"])
            note("p_hat", mine.get("p_hat", mine["p_w"]), theirs["p_hat"])
            if "q_hat" in mine and theirs["q_hat"] is not None:
                note("q_hat", mine["q_hat"], theirs["q_hat"])
            for key in ("loss", "loss_x", "loss_u", "loss_in", "mask"):
                note(key, ours[key], theirs[key])
            out["loss_in"].append(float(ours["loss_in"]))
            out["ref_loss_in"].append(float(theirs["loss_in"]))
            out["mask"].append(float(ours["mask"]))
            unused = [n for n, p in student.items() if p.grad is None or theirs_of[n].grad is None]
            out["head_unused"].append(sorted(unused))
            for n, p in student.items():
                if n not in unused:
                    note("grad", p.grad, theirs_of[n].grad)
                note("student", p, theirs_of[n])
            for p, q in zip(method.teacher.module.parameters(), ref.ema.parameters()):
                note("teacher", p, q)
            if world == 1:  # BN running statistics (see the module docstring)
                for mine_net, their_net in ((method.student, ref.main), (method.teacher.module, ref.ema)):
                    buffers = {to_reference(n): b for n, b in their_net.named_buffers()}
                    for n, b in mine_net.named_buffers():
                        note("bn_buffers", b.float(), buffers[to_reference(n)].float())
            note("bank", method.bank.features, ref.bank.T)
            assert torch.equal(method.bank.labels, ref.labels)
            note("da_queue", method.da.queue, ref.DA_queue)
            assert int(method.da.ptr) == int(ref.DA_ptr)
    finally:
        watching.__exit__(None, None, None)
        trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled = streams
        trainer.close()
        torch.set_num_threads(threads)
    out["worst"] = worst
    if world >= 3:
        out["shuffle"] = shuffle_roundtrip(rank, world, 5)
    return out


def check(result: dict) -> None:
    assert any(0.0 < m < 1.0 for m in result["mask"]), result["mask"]  # L_u: masked and unmasked samples
    # label propagation and L_in start with epoch 1 on both sides
    assert result["propagated"] == [(it >= SPE, it >= SPE) for it in range(STEPS)], result["propagated"]
    for key in ("loss_in", "ref_loss_in"):
        assert all(v == 0.0 for v in result[key][:SPE]) and all(v > 0.0 for v in result[key][SPE:]), result
    worst = result["worst"]
    assert set(worst) >= {"lr", "p_w", "p_hat", "q_hat", "loss_in", "grad", "student", "teacher", "bank"}
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, bad
    # epoch 0: the head (and nothing else) has no gradient, on both sides (checked per parameter)
    head = result["head_unused"][0]
    assert head and all(n.startswith("head.") for n in head), head
    assert all(result["head_unused"][it] == head for it in range(SPE)), result["head_unused"]
    assert all(u == [] for u in result["head_unused"][SPE:]), result["head_unused"]


def test_authors_one_process(tmp_path):
    result = compare(0, 1, str(tmp_path / "run"))
    print(result["worst"])
    check(result)
    assert "bn_buffers" in result["worst"]


@pytest.mark.parametrize("control, caught", [
    ("lin_early", {"p_hat", "q_hat", "loss_in", "grad", "student"}),  # L_in one epoch early: gross
    ("tt", {"q_hat", "loss_in", "grad", "student"}),  # the teacher temperature 1e-4 (relative) off
], ids=["lin_early", "tt"])
def test_the_tolerance_catches_a_control(tmp_path, control, caught):
    """The same comparison against a reference with one small change does not pass: the
    tolerance is tight enough to see a 1e-4 change of one hyperparameter."""
    result = compare(0, 1, str(tmp_path / "run"), control)
    print(control, result["worst"])
    assert caught <= {k for k, v in result["worst"].items() if not v <= TOL}, result["worst"]
    if control == "lin_early":
        assert result["propagated"][0] == (False, True) and result["ref_loss_in"][0] > 0.0
    else:
        assert max(result["worst"][k] for k in caught) > 3 * TOL


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_authors_gloo_ranks(gloo, tmp_path, world):
    """At 3 ranks the same processes also check the project's shuffle-BN on its own."""
    results = gloo(compare, world, tmp_path, str(tmp_path / "run"))
    for result in results:
        print(result["worst"])
        check(result)
    if world >= 3:
        check_shuffle([r["shuffle"] for r in results], 5)


@pytest.mark.slow
def test_authors_two_ranks_against_one_process_with_two_virtual_ranks(gloo, tmp_path):
    """The authors' step on 2 real ranks against the project's 2 virtual ranks in one process
    (tests/authors/authors_virtual.py says how): the same quantities and tolerance as above."""
    from authors_virtual import V, authors_ranks, project_two_virtual_ranks

    record = project_two_virtual_ranks(tmp_path / "run")
    record_file = tmp_path / "record.pt"
    torch.save(record, record_file)
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    for result in gloo(authors_ranks, V, ranks, str(record_file)):
        print(result["worst"])
        check(result)


def test_lr_schedules():
    """Theirs (warm-up per step, then the cosine set at each epoch's first step) against the
    engine's `lr_at` over the 1% recipe on 8 GPUs: equal through the warm-up, no step apart
    (both base * (step + 1) / warm-up steps), and at every epoch's first step; inside an epoch the
    project's per-step cosine lies between their value for the epoch and for the next one."""
    from simmatch.config import derive, load_config
    from simmatch.engine.optim import lr_at

    cfg = load_config(ROOT / "yaml" / "in1k_1pct.yaml", ["data.root=/nonexistent"])
    n_u = 1281167 - 13000  # the authors' unlabeled set
    d = derive(cfg, 8, 13000, n_u)
    steps = loader_len(n_u, 8, cfg.train.batch_per_gpu * cfg.train.mu)
    warm, epochs = RECIPE["warmup_epoch"], RECIPE["epochs"]
    assert steps == d.steps_per_epoch == 3963 and d.lr == RECIPE["lr"]
    assert (d.warmup_iters, d.total_iters) == (warm * steps, epochs * steps)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], 1.0)
    base = RECIPE["lr"]

    def theirs(epoch: int, i: int) -> float:
        return schedule(opt, epoch, i, steps, base, warm, epochs)

    first = base / d.warmup_iters  # step 0 trains at 1/warm-up of the base lr on both sides, not 0
    assert math.isclose(theirs(0, 0), first) and math.isclose(lr_at(0, d.lr, d.warmup_iters, d.total_iters), first)
    gap = 0.0
    for epoch in range(epochs):
        for i in (range(steps) if epoch < warm else (0, 1, steps // 2, steps - 1)):  # in order
            it = epoch * steps + i
            ours, their = lr_at(it, d.lr, d.warmup_iters, d.total_iters), theirs(epoch, i)
            if epoch < warm or i == 0:
                assert math.isclose(ours, their, rel_tol=1e-12, abs_tol=1e-18), (epoch, i, ours, their)
            else:
                following = base * 0.5 * (1 + math.cos(math.pi * (epoch + 1 - warm) / (epochs - warm)))
                assert following <= ours <= their, (epoch, i)
                gap = max(gap, (their - ours) / base)
    assert theirs(warm - 1, steps - 1) == base  # the warm-up ends on the base lr in both
    assert 0 < gap <= math.pi / (2 * (epochs - warm))  # at most the cosine's slope over one epoch


# --------------------------------------------------------------------------- shuffle-BN itself

def shuffle_roundtrip(rank: int, world: int, n: int) -> dict:
    from simmatch import distributed as sdist

    x = (torch.arange(n) + rank * n).float().unsqueeze(1).repeat(1, 3)  # row = global sample id
    perm = sdist.shuffle_permutation(world * n, seed=3, step=7)
    plan = sdist.shuffle_plan(perm, rank, world)
    shuffled = sdist.batch_shuffle(x, plan)
    back = sdist.batch_unshuffle(shuffled * 2, plan)
    return {"perm": perm, "shuffled": shuffled[:, 0].long(), "back": back, "x": x}


def check_shuffle(out: list[dict], n: int) -> None:
    """The project's shuffle is a cross-rank permutation, the same on every rank, undone exactly."""
    world, perm = len(out), out[0]["perm"]
    assert all(torch.equal(o["perm"], perm) for o in out)
    assert sorted(perm.tolist()) == list(range(world * n))
    moved = 0
    for r, o in enumerate(out):
        # loop reference: rank r holds global samples perm[r*n], ..., perm[r*n + n - 1], in order
        expect = [int(perm[r * n + j]) for j in range(n)]
        assert o["shuffled"].tolist() == expect
        moved += sum(1 for s in expect if s // n != r)
        torch.testing.assert_close(o["back"], 2 * o["x"], rtol=0, atol=0)  # outputs come home
    assert moved > 0  # samples really change rank


def test_shuffle_is_the_identity_in_one_process(tmp_path):
    from simmatch import distributed as sdist
    from simmatch.engine.trainer import Trainer

    trainer = Trainer(tiny_config(1), tmp_path, torch.device("cpu"))
    try:
        method = trainer.method
        method.train()
        assert method.teacher.module.training and method.teacher.shuffle_bn and sdist.world_size() == 1
        x = torch.randn(6, 3, SIZE, SIZE)
        [(logits, emb)] = method.teacher_forward([x], iteration=0)
        ref_logits, ref_emb = method.teacher.module(x)
        assert torch.equal(logits, ref_logits) and torch.equal(emb, ref_emb)
        method.eval()
        assert not method.teacher.module.training  # evaluation uses its running statistics
    finally:
        trainer.close()
