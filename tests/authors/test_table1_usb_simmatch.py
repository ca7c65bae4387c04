"""The project's SimMatch CIFAR step (the Table 1 recipe) through its real engine, against USB's code.

The reference is tests/authors/usb_simmatch.py, a transcription of github microsoft/
Semi-supervised-learning (USB; its docstring names the files, functions and commit): its own
network classes, bank, DA queue, mask, losses, SGD with its parameter groups, LambdaLR schedule,
EMA, SyncBatchNorm and DDP. The project side is `Trainer` built from yaml/cifar10_40.yaml made tiny
(resnet10 at 16 px, synthetic backend, the folder format since the archive formats are 32 px only,
10 classes, K = 20 bank slots, L_in from iteration 2, 20 iterations in all), run step by step as
`Trainer.fit` does (the lr from `lr_at` with the recipe's `fixmatch` schedule, `Trainer.step()`,
the student in the trainer's own DDP above one rank), its data streams replaced by fixed batches
that the reference reads too. The reference copies the project's initial student by a name map
(project `backbone.*` = USB `backbone.*`, project `head.*` = USB `mlp_proj.*`), is given the
project's initial bank and labels, and both DA queues are given the same full state. The run is
STEPS = 5 steps: two without L_in and aggregation (USB's epoch 0; the project's
method.simmatch.propagate_after_iters) and three with them. At every step, as the relative
difference per tensor (norm of the difference over the norm of the reference): the lr, the aligned
weak-view probabilities p_w, the targets p_hat and q_hat (once propagation starts), the losses,
the mask, every gradient (as the optimizer receives it), the student's parameters and BN buffers
after the step, the EMA parameters, the bank, its labels (equal) and the DA queue (its pointer
equal). At 1 process and at 3 gloo ranks.

The recipe, checked on the project's side against USB's config/classic_cv/simmatch/
simmatch_cifar10_40_0.yaml (usb_simmatch.RECIPE): tau 0.95, T 0.1, alpha 0.9, lambda_u = lambda_in
= 1, da_len 32, bank momentum 0.7, SGD Nesterov 0.9 at lr 0.03 with weight decay 5e-4 on the same
tensors (none on BN weights and biases), the lr base * cos(7 pi k / 16 K) without warm-up, EMA
0.999, the targets from the student's own weak view, detached, in one forward with the labeled
and strong images.

The bank, DA queue, EMA and BN statistics of each side evolve on their own over the run; the
student does not: before each step the reference's student takes the project's weights and SGD
momenta (after they were compared). The tiny network's trajectory is chaotic at the level of one
ReLU: measured, one ulp of one initial weight of the reference alone, with nothing else resynced,
leaves steps 0-2 at ~1e-6 and moves the gradients of step 3 by ~1e-2 (a unit crossing zero).
Taking the project's weights, the two forwards of the trunk are the same ops on the same tensors,
and what is compared is each step's own arithmetic.

Tolerance: TOL = 1e-5 relative per tensor. Both sides compute in fp32 and do the same arithmetic
in different orders (USB's l2norm as pow-sum-pow against F.normalize, log(softmax) against
log_softmax, the EMA's mul-add against lerp, USB's 1e-6 in the DA, and at 3 ranks the mean of the
gathered rows against the mean of the ranks' means and fp32 SyncBatchNorm statistics against the
project's fp64 group BN): the measured worst over all quantities is ~1e-6 at 1 process and ~2e-6
at 3 ranks (the tests print them). The controls: one weight of the reference's student one ulp up
at every step stays inside (~1e-6); the temperature 1e-4 relative off, or L_in and the aggregation
starting one step early, are caught (~1e-4 and ~1).

FC_SCALE and TAU: with a random network every p_w would be near uniform and the mask all zero, so
the initial classifier is scaled (both sides: before the copy) to make the weak view confident.
Once L_in starts, p_hat = 0.9 p_w + 0.1 q_agg, and with the tiny run's random bank q_agg spreads
over the classes: max p_hat stays under ~0.92 and the recipe's 0.95 would mask every sample. The
run's threshold is TAU = 0.85 on both sides (the yaml's 0.95 = USB's is checked), which some
samples pass and others do not (asserted).

Where the project deliberately differs from USB, and how this test handles it:
- the bank's temporal ensemble: USB's update_bank writes F.normalize(0.7 old + 0.3 new) of the
  [proj, n] matrix mem_bank[:, index] with F.normalize's default dim=1, which normalises each
  feature dimension across the batch's samples, not each sample's embedding; the project
  normalises each sample's row (the paper's unit-norm bank). The reference does the per-sample
  form; test_table1_usb_bank_line_differs shows USB's literal line gives another bank (and
  written rows that are not unit vectors).
- DA: USB divides by (mean of all da_len rows, unwritten zero rows included) + 1e-6, the project by
  the mean of the written rows: after normalisation the same but for the 1e-6. Both sides start
  from the same full queue here; test_table1_usb_da_eps measures the 1e-6 from an empty queue:
  ~1.5e-4 relative with one row written, under 1e-5 from the fifth, ~5e-7 once full.
- the EMA: USB's EMA model takes the student's BN buffers (load_state_dict(model.state_dict())
  then the shadow parameters over it); the project's EMA ("eman") averages them. Compared: the EMA
  parameters; the student's BN buffers are compared as the student's (USB's EMA buffers are
  those). The EMA is only evaluated, so no step depends on it.
- the head before L_in: USB keeps L_in in the graph as in_loss * 0.0, so the head receives a zero
  gradient and SGD applies weight decay and momentum to it through USB's epoch 0 (1,024
  iterations: its weights end at ~0.86 of their initial size, with a momentum buffer). The
  project's `targets=student` path does the same (L_in x 0 before it starts): compared as every
  gradient is, and asserted zero on both sides; test_table1_usb_head_before_lin shows the decay of
  USB's first step. (The ImageNet authors' code leaves the head out of the graph instead, as the
  project's teacher path does: tests/authors/test_authors.py.)
- bank labels: USB's start at zero and are written as labeled batches pass; the project's start at
  the labeled list's labels. The reference is given the project's labels (same state). No effect
  on USB's recipe: the labels are first read at iteration 1,024, when every labeled image has been
  written ~1,600 times.
- BN at several ranks: USB converts every BN to SyncBatchNorm when distributed; the project's
  default is per-rank BN (train.bn_group_ranks=1). Here train.bn_group_ranks = the world size.
- USB's CIFAR configs set use_epass: True since commit 639cfbf (March 2024: three projection heads
  averaged, the later EPASS method); SimMatch and USB's configs before it have one head, as the
  project and the reference.
- a slot twice in a labeled batch (K = 40 < 64 labeled images per step in the recipe): both sides
  write one copy's row; on CPU the later copy's on both (USB's index assignment, the project's
  index_copy_), on CUDA which one is not defined on either. Every step of the fixed batches holds
  one slot twice (the first and the last image of the global batch).
- lr: USB's LambdaLR stepped after each optimizer step against the project's `lr_at`: the same
  values (compared: equal).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_authors import step_batches, watch_targets
from usb_simmatch import (
    RECIPE,
    Backbone,
    SimMatchNet,
    UsbSimMatch,
)

from conftest import ROOT

pytestmark = pytest.mark.timeout(300)

CLASSES, B, MU, SIZE, PROJ, K = 10, 4, 2, 16, 16, 20  # per-rank batches of B labeled + B * MU unlabeled
STEPS, LIN_START, ITERS = 5, 2, 20  # L_in from iteration 2; the cosine's K = 20 iterations
FC_SCALE = 10.0  # a confident classifier: the weak view's confidence straddles TAU (docstring)
TAU = 0.85  # the threshold of the run on both sides (docstring: 0.95 would mask every sample once L_in starts)
TOL = 1e-5  # relative (norm of the difference over the norm of the reference), per tensor
# each reference and the steps it runs: the controls stop once their change has been seen
CONTROLS = {"": STEPS, "ulp": STEPS, "tt": LIN_START + 1, "lin_early": LIN_START}


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def tiny_config(world: int):
    from simmatch.config import load_config

    return load_config(ROOT / "yaml" / "cifar10_40.yaml", [
        "model.arch=resnet10", "model.small_input=true", f"model.proj_dim={PROJ}", "data.format=folder",
        f"data.num_classes={CLASSES}", "data.backend=synthetic", f"data.synthetic_size={K}",
        f"data.crop_size={SIZE}", "data.root=/nonexistent", f"train.batch_size={world * B}", f"train.mu={MU}",
        f"train.bn_group_ranks={world}", "train.channels_last=false", f"optim.base_batch={world * B}",
        f"optim.iters={ITERS}", f"method.simmatch.propagate_after_iters={LIN_START}", f"method.simmatch.tau={TAU}"])


def make_batches(rank: int, world: int, labels: torch.Tensor) -> tuple[list, list]:
    """STEPS fixed batches of this rank (simmatch/data/base.py `pack_batch`'s layout). Each step's
    global labeled batch holds one slot twice: its last image is another view of its first."""
    labeled, unlabeled = [], []
    for s in range(STEPS):
        index = torch.randperm(K, generator=torch.Generator().manual_seed(100 + s))[:world * B]
        index[-1] = index[0]
        index = index[rank * B:(rank + 1) * B]
        u_index = torch.randperm(K, generator=torch.Generator().manual_seed(200 + s))
        u_index = u_index.repeat(-(-world * B * MU // K))[rank * B * MU:(rank + 1) * B * MU]
        lab, unl = step_batches(s, rank, labels, index, u_index, SIZE)
        labeled.append(lab)
        unlabeled.append(unl)
    return labeled, unlabeled


def full_queue() -> tuple[torch.Tensor, int]:
    """A full DA queue (da_len batch means) and the slot written next: both sides start from it."""
    rows = torch.softmax(torch.randn(RECIPE["da_len"], CLASSES, generator=torch.Generator().manual_seed(7)), dim=1)
    return rows, 5


def to_reference(name: str) -> str:
    """The project's student names -> USB's SimMatch_Net."""
    return name.replace("head.", "mlp_proj.", 1) if name.startswith("head.") else name


def reference_from(initial: dict, control: str = "") -> UsbSimMatch:
    """USB's algorithm, initialised by its own code, then set to the project's initial state
    (`initial`: its student's state dict, bank features and labels, DA queue)."""
    torch.manual_seed(1234)
    net = SimMatchNet(Backbone([1, 1, 1, 1], CLASSES), PROJ)
    algo = UsbSimMatch(net, CLASSES, K, ITERS, iters_per_epoch=LIN_START - (control == "lin_early"))
    ones = torch.ones(K)
    # the same law: Gaussian directions, one unit vector per slot (their columns, the project's rows)
    torch.testing.assert_close(algo.mem_bank.norm(dim=0), ones)
    torch.testing.assert_close(initial["bank"].norm(dim=1), ones)
    net.load_state_dict({to_reference(k): v for k, v in initial["student"].items()})
    algo.start(SimMatchNet(Backbone([1, 1, 1, 1], CLASSES), PROJ))
    algo.mem_bank.copy_(initial["bank"].T)
    algo.labels_bank.copy_(initial["labels"])
    rows, ptr = full_queue()
    algo.da.p_model.copy_(rows)
    algo.da.p_model_ptr.fill_(ptr)
    algo.p_cutoff = TAU
    if control == "tt":
        algo.T *= 1.0001
    return algo


def check_recipe(cfg, d, method, opt) -> set[int]:
    """The project's values of the tiny run are USB's CIFAR-10/40 recipe (but for the sizes)."""
    from simmatch.config import load_config

    assert load_config(ROOT / "yaml" / "cifar10_40.yaml", []).method.params.tau == RECIPE["p_cutoff"]
    m = cfg.method.params
    assert (m.tau, m.temperature, m.alpha) == (TAU, RECIPE["T"], RECIPE["smoothing_alpha"])
    assert (m.lambda_u, m.lambda_in, m.bank_momentum) == (RECIPE["ulb_loss_ratio"], RECIPE["in_loss_ratio"],
                                                          RECIPE["ema_bank"])
    assert m.targets == "student" and m.dist_align and m.da_target == "uniform" and cfg.model.teacher == "eman"
    assert method.targets_in_forward and method.propagate_after_iters == LIN_START
    assert d.method_values["da_len"] == RECIPE["da_len"] and method.da.queue.shape == (RECIPE["da_len"], CLASSES)
    assert abs(d.lr - RECIPE["lr"]) < 1e-15 and d.ema_momentum == RECIPE["ema_m"]
    assert (d.warmup_iters, d.total_iters, cfg.optim.schedule) == (RECIPE["num_warmup_iter"], ITERS, "fixmatch")
    assert method.bank.features.shape == (K, PROJ) and method.bank.momentum == RECIPE["ema_bank"]
    assert all((g["momentum"], g["nesterov"]) == (RECIPE["momentum"], RECIPE["nesterov"]) for g in opt.param_groups)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == RECIPE["weight_decay"] for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, RECIPE["weight_decay"]) for g in opt.param_groups)
    return decayed


def initial_state(method) -> dict:
    return {"student": {k: v.clone() for k, v in method.student.state_dict().items()},
            "bank": method.bank.features.clone(), "labels": method.bank.labels.clone()}


def compare(rank: int, world: int, run_dir: str, controls: dict[str, int] | None = None) -> dict:
    """The project's run over STEPS steps on `world` ranks and one reference per control (in
    lockstep, on the same batches, each for its number of steps): per control, the worst relative
    difference per quantity and what check() reads."""
    from simmatch.engine.optim import lr_at, set_lr
    from simmatch.engine.trainer import Trainer

    controls = controls or {"": STEPS}

    threads = torch.get_num_threads()
    if world > 1:
        torch.set_num_threads(1)  # several processes on 2 cores: intra-op threads would oversubscribe them
    cfg = tiny_config(world)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, Path(run_dir), torch.device("cpu"))
    d, method, opt = trainer.derived, trainer.method, trainer.optimizer
    assert (world > 1) == isinstance(trainer.student, torch.nn.parallel.DistributedDataParallel)
    assert d.bn_group_ranks == world and trainer.dtype is None  # fp32, as USB's amp: False
    decayed = check_recipe(cfg, d, method, opt)
    with torch.no_grad():
        method.student.backbone.fc.weight.mul_(FC_SCALE)
        method.teacher.module.load_state_dict(method.student.state_dict())
        rows, ptr = full_queue()
        method.da.queue.copy_(rows)
        method.da.ptr.fill_(ptr)
        method.da.count.fill_(RECIPE["da_len"])
    initial = initial_state(method)
    refs = {c: reference_from(initial, c) for c in controls}
    student = dict(method.student.named_parameters())
    for ref in refs.values():  # the same parameters decayed on both sides
        theirs = dict(ref.module.named_parameters())
        mine = {to_reference(n) for n, p in student.items() if id(p) in decayed}
        assert mine == {n for n, p in theirs.items() if any(p is q for q in ref.optimizer.param_groups[1]["params"])}
    teacher = dict(method.teacher.module.named_parameters())

    labeled, unlabeled = make_batches(rank, world, method.bank.labels)
    streams = trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled
    trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled = iter(labeled), iter(unlabeled)
    out = {c: {"worst": {}, "loss_in": [], "ref_loss_in": [], "mask": [], "propagated": [], "head_unused": [],
               "head_zero": [],
               "momentum_only_theirs": []} for c in controls}
    grads: dict = {}  # the project's gradients as the optimizer receives them (its Nesterov step
    # adds the momentum into the gradients of the tensors without weight decay, in place)
    hook = opt.register_step_pre_hook(lambda *_: grads.update(
        {n: None if p.grad is None else p.grad.clone() for n, p in student.items()}))
    try:
        with watch_targets(method) as seen:
            method.train()
            for it in range(STEPS):
                running = {c: ref for c, ref in refs.items() if it < controls[c]}
                for c, ref in running.items():  # the reference's student steps from the project's (docstring)
                    out[c]["momentum_only_theirs"] += take_student(ref, student, opt, ulp=c == "ulp")
                lr = lr_at(trainer.iteration, d.lr, d.warmup_iters, d.total_iters, cfg.optim.schedule)  # as fit
                set_lr(opt, lr)
                ours = trainer.step()
                trainer.iteration += 1
                mine = seen[-1]
                for c, ref in running.items():
                    record(out[c], it, lr, ours, mine, ref.step(labeled[it], unlabeled[it]), method, ref, grads,
                           teacher)
    finally:
        hook.remove()
        trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled = streams
        trainer.close()
        torch.set_num_threads(threads)
    return out


@torch.no_grad()
def take_student(ref: UsbSimMatch, student: dict, opt, ulp: bool) -> list[str]:
    """The project's student weights and SGD momenta into the reference, and no momentum where the
    project has none; `ulp`: then one weight one ulp up (the control). The names of the tensors
    that had a momentum on the reference's side only (none but in a control: checked)."""
    theirs = dict(ref.module.named_parameters())
    extra = []
    for n, p in student.items():
        q = theirs[to_reference(n)]
        q.copy_(p)
        state = opt.state.get(p)
        if state:
            ref.optimizer.state[q]["momentum_buffer"] = state["momentum_buffer"].clone()
        elif ref.optimizer.state.pop(q, None):
            extra.append(n)
    if ulp:
        w = theirs["backbone.layer2.0.conv1.weight"].view(-1)
        w[17] = torch.nextafter(w[17], torch.tensor(float("inf")))
    return extra


def record(res: dict, it: int, lr: float, ours: dict, mine: dict, theirs: dict, method, ref: UsbSimMatch,
           grads: dict, teacher: dict) -> None:
    worst = res["worst"]

    def note(key, a, b):
        worst[key] = max(worst.get(key, 0.0), rel(a, b))

    res["propagated"].append(("q_hat" in mine, theirs["q_hat"] is not None))
    note("lr", lr, theirs["lr"])
    note("p_w", mine["p_w"], theirs["p_w"])
    note("p_hat", mine.get("p_hat", mine["p_w"]), theirs["p_hat"])
    if "q_hat" in mine and theirs["q_hat"] is not None:
        note("q_hat", mine["q_hat"], theirs["q_hat"])
    for key in ("loss", "loss_x", "loss_u", "mask"):
        note(key, ours[key], theirs[key])
    if theirs["q_hat"] is not None:
        note("loss_in", ours["loss_in"], theirs["loss_in"])
    res["loss_in"].append(float(ours["loss_in"]))
    res["ref_loss_in"].append(float(theirs["loss_in"]))
    res["mask"].append(float(ours["mask"]))
    their_grads = theirs["grads"]
    unused = sorted(n for n, g in grads.items() if g is None or their_grads[to_reference(n)] is None)
    res["head_unused"].append(unused)
    res["head_zero"].append(all(not grads[n].any() and not their_grads[to_reference(n)].any()
                                for n in grads if n.startswith("head.") and grads[n] is not None))
    their_params = dict(ref.module.named_parameters())
    for n, p in method.student.named_parameters():
        if n not in unused:
            note("grad", grads[n], their_grads[to_reference(n)])
        note("student", p, their_params[to_reference(n)])
        note("ema", teacher[n], ref.ema.shadow[to_reference(n)])
    their_buffers = dict(ref.module.named_buffers())
    for n, b in method.student.named_buffers():
        note("bn_buffers", b.double(), their_buffers[to_reference(n)].double())
    note("bank", method.bank.features, ref.mem_bank.T)
    assert torch.equal(method.bank.labels, ref.labels_bank)
    note("da_queue", method.da.queue, ref.da.p_model)
    assert int(method.da.ptr) == int(ref.da.p_model_ptr)


def check(res: dict) -> None:
    # L_u: masked and unmasked samples, before L_in starts and after
    assert any(0.0 < m < 1.0 for m in res["mask"][:LIN_START]), res["mask"]
    assert any(0.0 < m < 1.0 for m in res["mask"][LIN_START:]), res["mask"]
    # label propagation and L_in start at iteration LIN_START on both sides
    assert res["propagated"] == [(it >= LIN_START, it >= LIN_START) for it in range(STEPS)], res["propagated"]
    for key in ("loss_in", "ref_loss_in"):
        assert all(v == 0.0 for v in res[key][:LIN_START]) and all(v > 0.0 for v in res[key][LIN_START:]), res
    worst = res["worst"]
    assert set(worst) >= {"lr", "p_w", "p_hat", "q_hat", "loss_in", "mask", "grad", "student", "ema",
                          "bn_buffers", "bank", "da_queue"}
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, bad
    # every parameter has a gradient at every step, on both sides; before L_in the head's is zero
    assert all(u == [] for u in res["head_unused"]), res["head_unused"]
    assert res["head_zero"] == [it < LIN_START for it in range(STEPS)], res["head_zero"]
    assert res["momentum_only_theirs"] == []  # SGD's state exists for the same tensors on both sides


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The project's 1-process run with a reference per control, in lockstep (one run for all)."""
    return compare(0, 1, str(tmp_path_factory.mktemp("usb") / "run"), CONTROLS)


def test_table1_usb_one_process(one_process):
    result = one_process[""]
    print(result["worst"], result["mask"])
    check(result)


@pytest.mark.parametrize("control, caught", [
    ("ulp", set()),  # one weight one ulp up at every step: inside the tolerance
    ("tt", {"q_hat", "loss_in", "grad", "student"}),  # the temperature 1e-4 (relative) off
    ("lin_early", {"p_hat", "loss_in", "grad", "student"}),  # L_in and aggregation one step early
], ids=["ulp", "tt", "lin_early"])
def test_table1_usb_controls(one_process, control, caught):
    """The tolerance holds a rounding-level change of the reference's weights and catches a small
    real change of its step."""
    result = one_process[control]
    print(control, result["worst"])
    failed = {k for k, v in result["worst"].items() if not v <= TOL}
    if not caught:
        check(result)
        return
    assert caught <= failed, result["worst"]
    assert max(result["worst"][k] for k in caught) > 3 * TOL
    if control == "lin_early":
        assert result["propagated"][LIN_START - 1] == (False, True) and result["ref_loss_in"][LIN_START - 1] > 0.0


@pytest.mark.slow
def test_table1_usb_gloo_three_ranks(gloo, tmp_path):
    """3 ranks: USB's SyncBatchNorm, all-gathered DA rows and bank rows, DDP-averaged gradients."""
    results = gloo(compare, 3, tmp_path, str(tmp_path / "run"))
    for result in results:
        print(result[""]["worst"], result[""]["mask"])
        check(result[""])
