"""The FixMatch step of the Table 1 recipes, through the project's real engine, against USB's code.

The reference is tests/authors/usb_fixmatch.py, a transcription of github
microsoft/Semi-supervised-learning (its docstring names the files, functions and commit): its own
network (torchvision's ResNet with its fc), SyncBN, losses, hooks, SGD parameter groups
(bn_wd_skip), LambdaLR schedule, EMA and DDP wrapper. The project side is `Trainer` built from
yaml/cifar10_40.yaml with method.name=fixmatch made tiny (resnet10 at 16 px with the synthetic
backend; data.format=folder, the archive formats taking 32 px images only), run step by step as
`Trainer.fit` does (lr from `lr_at` with the recipe's schedule, `Trainer.step()`, the student in
the trainer's own DDP above one rank), its data streams replaced by fixed batches that the
reference reads too. The reference copies the project's initial student once by a name map
(`backbone.` dropped). At every step, as the relative difference per tensor (norm of the
difference over the norm of the reference): the lr, the logits of the one forward, the weak-view
probabilities (the project's: the softmax of its logits as its method takes it), the losses,
every gradient (the project's as its optimizer receives them), the student's parameters and BN
buffers after the step, the EMA's parameters and BN buffers; pseudo-labels and mask must be
equal, sample by sample. The classifier is made confident (FC_SCALE) so that the recipe's 0.95
passes some samples and not others (asserted: a mask rate strictly between 0 and 1).

The EMA and the BN statistics of each side evolve on their own over the run; the student does
not: before each step the reference's student takes the project's weights and SGD momenta (after
they were compared). The 16-px network's trajectory is chaotic at the level of one ReLU: one ulp of
one weight of layer1, left to evolve, moves some gradient by 1.6e-2 (relative) by step 5.

Tolerance: TOL = 1e-5, relative, per tensor. In one process, float32, the two sides agree bit for
bit but for the EMA (the project's lerp against USB's mul-add: ~1e-7). The 3-rank run is in
float64 (torch.set_default_dtype; the project's losses stay float32, its `.float()`): the sides
pool BN statistics by different arithmetic (the project's float64 sums against SyncBN's Welford
merge of the ranks' statistics), a rounding-level difference of the normalised activations which
in float32 puts one of the ~1e6 ReLU inputs of a step on the other side of zero now and then and
moves the gradients of the layers below it by up to ~7e-4 (seen at 2 of 5 steps); in float64 the
forwards agree to ~1e-15 and what is left is the losses' float32 rounding, ~1e-7. Controls (one
process): one ulp of one weight of the reference's initial student stays inside (~1e-6); weight
decay on BN weights and biases too, lambda_u 1e-4 (relative) off and tau 1e-4 (relative) off
(one sample's mask flips: FC_SCALE puts a confidence there) are caught.

Where the project deliberately differs from USB, and how this test handles it:
- EMA's BN buffers: USB's ema model takes the student's BN buffers at every step (EMA.update
  copies them into the shadow, EMAHook loads the model's state dict first), the project's EMA
  ("eman", the official FixMatch code's EMA of every model variable) averages them with the same
  momentum. The EMA's parameters are compared with USB's; its BN buffers with that average taken of
  the reference student's own buffers (here, not in the transcription), and USB's ema model is
  asserted to hold its student's buffers (and to differ from the project's EMA buffers). The EMA is
  only evaluated on both sides: training is unaffected.
- lr: USB's LambdaLR gives step k the factor k / W during a warm-up of W steps (0 at step 0),
  the project base * (k + 1) / W (one step ahead), then both cos(7 pi (k - W) / (16 (K - W))).
  The recipe has no warm-up (USB's num_warmup_iter 0), where they are equal: compared at every
  step here (over K = ITERS steps, so that the lr moves) and over the whole recipe in
  test_table1_usb_lr_schedule, which also shows the one-step shift with a warm-up.
- base lr: the project scales it by the global batch over optim.base_batch (USB: 0.03 whatever
  the batch); in the recipe both are 64. Here optim.base_batch is the test's global batch, so the
  lr is USB's 0.03 (asserted).
- BN above one rank: USB's distributed runs convert every BN to SyncBatchNorm over the world;
  the recipe's train.bn_group_ranks is 1 (per-rank BN; Table 1 runs on one GPU, where the two
  agree). The 3-rank run sets train.bn_group_ranks=3, the project's BN pooled over all ranks, as
  USB's. The student's BN buffers: USB's DDP does not broadcast them (broadcast_buffers=False),
  each rank's SyncBN computes the same ones; the project averages them over the ranks.
- one process: USB's single-GPU run is DDP over one rank with a SyncBN that falls back to BN;
  the reference runs without DDP there (the same arithmetic: nothing is averaged).
- SGD's parameter groups: USB's are no-decay first (ndim <= 1, names ending in ".bias" or holding
  "bn"), the project's decay first (ndim > 1): the same split for a ResNet (asserted), the order
  of the groups playing no part in SGD.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from usb_fixmatch import RECIPE, ResNet, USBFixMatch, cosine_factor, get_optimizer

from conftest import ROOT

pytestmark = pytest.mark.timeout(300)

CLASSES, B, MU, SIZE = 10, 4, 2, 16
STEPS, ITERS = 5, 8  # steps run; the schedule's K (the lr moves from 0.03 to 0.03 cos(7 pi 4 / 128))
# A confident classifier, so that 0.95 passes some samples and not others; the value puts one weak
# view's confidence at step 0 at 0.95 (1 + 5e-5), which the tau control (1e-4 relative higher) drops.
FC_SCALE = 14.0254
TAU_CONTROL = 1e-4  # the tau control's relative change
TOL = 1e-5  # relative (norm of the difference over the norm of the reference), per tensor
ULP_AT = ("layer1.0.conv1.weight", (0, 0, 0, 0))  # the weight the ulp control moves
CONTROLS = ("ulp", "wd_bn", "lambda_u", "tau")
CHECKED = ("lr", "logits", "p_w", "loss_x", "loss_u", "loss", "grad", "student", "student_bn", "ema", "ema_bn")


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    if a.dtype == b.dtype and torch.equal(a, b):  # most tensors of the one-process run: one op, not six
        return 0.0
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def tiny_config(world: int):
    from simmatch.config import load_config

    return load_config(ROOT / "yaml" / "cifar10_40.yaml", [
        "method.name=fixmatch", "model.arch=resnet10", "model.small_input=true", "data.backend=synthetic",
        "data.root=/nonexistent", "data.format=folder", f"data.num_classes={CLASSES}",
        f"data.synthetic_size={STEPS * world * B * MU}", f"data.crop_size={SIZE}", f"data.val_resize={SIZE}",
        f"train.batch_size={world * B}", f"train.mu={MU}", f"optim.base_batch={world * B}",
        f"optim.iters={ITERS}", "train.channels_last=false", f"train.bn_group_ranks={world}"])


def make_batches(rank: int, world: int) -> tuple[list, list]:
    """STEPS fixed batches of this rank (the dict layout of simmatch/data/base.py `pack_batch`)."""
    labeled, unlabeled = [], []
    for s in range(STEPS):
        g = torch.Generator().manual_seed(1000 * s + rank)
        index = torch.arange(B) + (s * world + rank) * B
        u_index = torch.arange(B * MU) + (s * world + rank) * B * MU
        labeled.append({"x": torch.randn(B, 3, SIZE, SIZE, generator=g),
                        "y": torch.randint(0, CLASSES, (B,), generator=g), "index": index})
        unlabeled.append({"weak": torch.randn(B * MU, 3, SIZE, SIZE, generator=g),
                          "strong": [torch.randn(B * MU, 3, SIZE, SIZE, generator=g)],
                          "y": torch.randint(0, CLASSES, (B * MU,), generator=g), "index": u_index})
    return labeled, unlabeled


def to_reference(name: str) -> str:
    """The project's student names -> the reference's ResNet (the same torchvision names)."""
    assert name.startswith("backbone."), name
    return name[len("backbone."):]


def make_net() -> ResNet:
    return ResNet([1, 1, 1, 1], CLASSES)


def reference(initial: dict, control: str = "") -> USBFixMatch:
    """USB's algorithm from the project's initial student (`initial`: its state dict), with one
    control's change."""
    torch.manual_seed(1234)  # its own initialisation first, then the project's weights
    net = make_net()
    state = {to_reference(k): v.clone() for k, v in initial.items()}
    if control == "ulp":
        name, at = ULP_AT
        state[name][at] = torch.nextafter(state[name][at], torch.full_like(state[name][at], math.inf))
    net.load_state_dict(state)
    kwargs = {"bn_wd_skip": False} if control == "wd_bn" else {}
    if control == "lambda_u":
        kwargs["lambda_u"] = RECIPE["ulb_loss_ratio"] * (1 + 1e-4)
    if control == "tau":
        kwargs["p_cutoff"] = RECIPE["p_cutoff"] * (1 + TAU_CONTROL)
    return USBFixMatch(net, make_net, ITERS, **kwargs)


@contextlib.contextmanager
def watch(method):
    """The project's step as its method sees it, one dict per step: the logits of the student's
    forward (a forward hook) and the pseudo-labels and mask (a spy on `pseudo_label_metrics`)."""
    import simmatch.methods.fixmatch.method as project_fixmatch

    seen: list[dict] = []
    hook = method.student.register_forward_hook(
        lambda _m, _i, out: seen.append({"logits": out[0].detach().clone()}))
    metrics = project_fixmatch.pseudo_label_metrics

    def spy(pred, mask, y_u):
        seen[-1].update(pred=pred.clone(), mask=mask.clone())
        return metrics(pred, mask, y_u)

    project_fixmatch.pseudo_label_metrics = spy
    try:
        yield seen
    finally:
        project_fixmatch.pseudo_label_metrics = metrics
        hook.remove()


def compare(rank: int, world: int, run_dir: str, controls: tuple[str, ...] = (),
            dtype: torch.dtype = torch.float32) -> dict:
    """The project's trainer and USB's algorithm (and one reference per control) in lockstep over
    STEPS steps on `world` ranks, networks and images in `dtype`; per reference the worst
    relative difference per quantity."""
    from simmatch.engine.trainer import Trainer

    threads, default_dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)  # several processes on 2 cores: intra-op threads would oversubscribe them
    torch.set_default_dtype(dtype)  # the networks both sides build, and the batches
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        trainer = Trainer(tiny_config(world), Path(run_dir), torch.device("cpu"))
        streams = trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled
        try:
            return lockstep(trainer, rank, world, controls, dtype)
        finally:
            trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled = streams
            trainer.close()
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(default_dtype)


def lockstep(trainer, rank: int, world: int, controls: tuple[str, ...], dtype: torch.dtype) -> dict:
    from simmatch.engine.optim import lr_at, set_lr

    cfg, d, method, opt = trainer.cfg, trainer.derived, trainer.method, trainer.optimizer
    values = cfg.method.params
    assert (world > 1) == isinstance(trainer.student, torch.nn.parallel.DistributedDataParallel)
    assert d.lr == RECIPE["lr"] and d.ema_momentum == RECIPE["ema_m"] and d.warmup_iters == RECIPE["num_warmup_iter"]
    recipe = (RECIPE["p_cutoff"], RECIPE["ulb_loss_ratio"])
    assert (method.tau, method.lambda_u) == (values.tau, values.lambda_u) == recipe
    assert (d.total_iters, cfg.optim.schedule, d.bn_group_ranks) == (ITERS, "fixmatch", world)
    assert cfg.model.teacher == "eman" and method.teacher.mode == "eman" and trainer.dtype is None  # no autocast
    assert all(p.dtype == dtype for p in method.parameters())
    assert all((g["momentum"], g["nesterov"]) == (RECIPE["momentum"], RECIPE["nesterov"]) for g in opt.param_groups)
    with torch.no_grad():
        method.student.backbone.fc.weight.mul_(FC_SCALE)
        method.teacher.module.load_state_dict(method.student.state_dict())
    initial = {k: v.clone() for k, v in method.student.state_dict().items()}
    refs = {name: reference(initial, name) for name in ("", *controls)}
    ref = refs[""]
    # BN over the world above one rank: the project's group BN, USB's SyncBN (the module docstring)
    assert {type(m).__name__ for m in method.student.modules() if isinstance(m, _BatchNorm)} == \
        {"GroupBatchNorm" if world > 1 else "BatchNorm2d"}
    assert {type(m).__name__ for m in ref.net.modules() if isinstance(m, _BatchNorm)} == \
        {"SyncBatchNorm2d" if world > 1 else "BatchNorm2d"}
    check_groups(method, opt, ref)
    student = dict(method.student.named_parameters())
    # the gradients as the optimizer receives them: SGD's foreach path with Nesterov adds the
    # momentum into the .grad tensors of the no-decay group in place during its step
    grads: dict[str, torch.Tensor] = {}
    pre_step = opt.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in student.items() if p.grad is not None}))
    # the project's EMA buffers against the same average of each reference student's buffers (docstring)
    eman = {name: {n: b.clone() for n, b in r.net.named_buffers()} for name, r in refs.items()}

    labeled, unlabeled = make_batches(rank, world)
    trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled = iter(labeled), iter(unlabeled)
    worst: dict[str, dict[str, float]] = {name: {} for name in refs}
    flips = {name: {"pseudo_label": 0, "mask": 0} for name in refs}
    out: dict = {"mask": [], "near_tau": 0, "ema_bn_usb": 0.0, "ema_holds_student_bn": True}

    def note(name, key, a, b):
        worst[name][key] = max(worst[name].get(key, 0.0), rel(a, b))

    try:
        with watch(method) as seen:
            method.train()
            for it in range(STEPS):
                lr = lr_at(trainer.iteration, d.lr, d.warmup_iters, d.total_iters, cfg.optim.schedule)  # as fit
                set_lr(opt, lr)
                if it > 0:  # each reference's student steps from the project's (module docstring)
                    for r in refs.values():
                        resync(r, student, opt)
                grads.clear()
                ours = trainer.step()
                trainer.iteration += 1
                mine = seen[-1]
                assert len(seen) == it + 1  # one student forward per step
                p_w = torch.softmax(mine["logits"][B:B + B * MU].float(), dim=1)  # as the method takes it
                out["mask"].append(float(ours["mask"]))
                conf = p_w.max(dim=1).values
                out["near_tau"] += int(((conf >= method.tau) & (conf < method.tau * (1 + TAU_CONTROL))).sum())
                for name, r in refs.items():
                    theirs = r.step(labeled[it], unlabeled[it])
                    note(name, "lr", lr, theirs["lr"])
                    note(name, "logits", mine["logits"], theirs["logits"])
                    note(name, "p_w", p_w, theirs["probs"])
                    flips[name]["pseudo_label"] += int((mine["pred"] != theirs["pseudo_label"]).sum())
                    flips[name]["mask"] += int((mine["mask"] != theirs["mask"]).sum())
                    for key, their_key in (("loss_x", "sup_loss"), ("loss_u", "unsup_loss"), ("loss", "total_loss")):
                        note(name, key, ours[key], theirs[their_key])
                    theirs_of = dict(r.net.named_parameters())
                    assert set(theirs["grads"]) == set(theirs_of)  # every parameter has a gradient
                    assert set(grads) == set(student)
                    for n, p in student.items():
                        note(name, "grad", grads[n], theirs["grads"][to_reference(n)])
                        note(name, "student", p, theirs_of[to_reference(n)])
                    their_buffers = dict(r.net.named_buffers())
                    for n, b in method.student.named_buffers():
                        check_buffer(name, note, "student_bn", b, their_buffers[to_reference(n)])
                    ema_params = dict(r.ema_net.named_parameters())
                    for n, p in method.teacher.module.named_parameters():
                        note(name, "ema", p, ema_params[to_reference(n)])
                    m = d.ema_momentum
                    ema_buffers = dict(r.ema_net.named_buffers())
                    for n, b in method.teacher.module.named_buffers():
                        k = to_reference(n)
                        if b.is_floating_point():
                            eman[name][k].mul_(m).add_(their_buffers[k], alpha=1.0 - m)
                        else:
                            eman[name][k].copy_(their_buffers[k])
                        check_buffer(name, note, "ema_bn", b, eman[name][k])
                        if name == "":  # USB's ema model: its student's buffers
                            out["ema_holds_student_bn"] &= torch.equal(ema_buffers[k], their_buffers[k])
                            if b.is_floating_point():
                                out["ema_bn_usb"] = max(out["ema_bn_usb"], rel(b, ema_buffers[k]))
    finally:
        pre_step.remove()
    out["worst"] = {name or "usb": w for name, w in worst.items()}
    out["flips"] = {name or "usb": f for name, f in flips.items()}
    return out


@torch.no_grad()
def resync(r: USBFixMatch, student: dict, opt) -> None:
    """The reference's student steps from the project's (the module docstring): its weights and SGD
    momenta, after they were compared."""
    theirs_of = dict(r.net.named_parameters())
    for n, p in student.items():
        q = theirs_of[to_reference(n)]
        q.copy_(p)
        r.optimizer.state[q]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()


def check_buffer(name, note, key, mine: torch.Tensor, theirs: torch.Tensor) -> None:
    if mine.is_floating_point():
        note(name, key, mine, theirs)
    else:  # num_batches_tracked: equal
        assert torch.equal(mine, theirs), (key, mine, theirs)


def check_groups(method, opt, ref: USBFixMatch) -> None:
    """The project's decay / no-decay split is USB's bn_wd_skip split (names mapped); and USB's
    without bn_wd_skip decays every parameter (the wd_bn control)."""
    names = {id(p): to_reference(n) for n, p in method.student.named_parameters()}
    ours = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    theirs_names = {id(p): n for n, p in ref.net.named_parameters()}
    theirs = {theirs_names[id(p)]: g["weight_decay"] for g in ref.optimizer.param_groups for p in g["params"]}
    assert ours == theirs and set(ours.values()) == {0.0, RECIPE["weight_decay"]}, (ours, theirs)
    every = get_optimizer(make_net(), 0.03, 0.9, RECIPE["weight_decay"], bn_wd_skip=False)
    assert {g["weight_decay"] for g in every.param_groups} == {RECIPE["weight_decay"]}


def check(out: dict) -> None:
    assert any(0.0 < m < 1.0 for m in out["mask"]), out["mask"]  # masked and unmasked samples
    worst = out["worst"]["usb"]
    assert set(worst) == set(CHECKED), worst
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, bad
    assert out["flips"]["usb"] == {"pseudo_label": 0, "mask": 0}, out["flips"]
    # USB's ema model holds its student's BN buffers, the project's EMA their average: not the same
    assert out["ema_holds_student_bn"] and out["ema_bn_usb"] > 100 * TOL, out["ema_bn_usb"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The 1-process run: the project's trainer against USB's step and the controls' references."""
    return compare(0, 1, str(tmp_path_factory.mktemp("usb_fixmatch") / "run"), CONTROLS)


def test_table1_usb_fixmatch_one_process(one_process):
    """One process, float32: every quantity within TOL at every step (module docstring)."""
    print(one_process["worst"]["usb"], one_process["mask"])
    check(one_process)


def test_table1_usb_controls(one_process):
    """One ulp of one initial weight stays inside the tolerance; a small real change does not:
    weight decay on BN weights and biases too (USB without bn_wd_skip), lambda_u 1e-4 (relative)
    off, and tau 1e-4 (relative) higher, which drops the one confidence that FC_SCALE puts between
    the two thresholds (its mask flips)."""
    worst, flips = one_process["worst"], one_process["flips"]
    for name in CONTROLS:
        print(name, worst[name], flips[name])
    assert not {k: v for k, v in worst["ulp"].items() if not v <= TOL}, worst["ulp"]
    assert flips["ulp"] == {"pseudo_label": 0, "mask": 0}
    assert worst["ulp"]["student"] > 0.0  # the control did move the reference
    # the decay acts inside SGD: the gradients are the same, the parameters after the step are not
    assert {"student", "ema"} <= {k for k, v in worst["wd_bn"].items() if v > TOL}, worst["wd_bn"]
    assert worst["wd_bn"]["grad"] <= TOL
    assert {"loss", "grad", "student"} <= {k for k, v in worst["lambda_u"].items() if v > TOL}, worst["lambda_u"]
    assert worst["lambda_u"]["loss_u"] <= TOL  # lambda_u weighs L_u: L_u itself is unchanged
    # the project's confidences that pass 0.95 but not the control's threshold: their masks flip
    assert one_process["near_tau"] >= 1 and flips["tau"]["mask"] == one_process["near_tau"], \
        (one_process["near_tau"], flips["tau"])
    assert flips["tau"]["pseudo_label"] == 0
    assert {"loss_u", "loss", "grad", "student"} <= {k for k, v in worst["tau"].items() if v > TOL}, worst["tau"]


@pytest.mark.slow
def test_table1_usb_fixmatch_three_ranks(gloo, tmp_path):
    """3 gloo ranks, DDP on both sides, BN over the world (the project's train.bn_group_ranks=3,
    USB's SyncBatchNorm)."""
    for out in gloo(compare, 3, tmp_path, str(tmp_path / "run"), (), torch.float64):
        print(out["worst"]["usb"], out["mask"])
        check(out)


def test_table1_usb_lr_schedule():
    """USB's LambdaLR (get_cosine_schedule_with_warmup, num_cycles 7/16) against the engine's
    `lr_at` over the recipe: equal at every step without a warm-up (the recipe's); with one, the
    project's warm-up is one step ahead of USB's (base (k + 1) / W against base k / W) and equal
    from its end on."""
    from simmatch.config import derive, load_config
    from simmatch.engine.optim import lr_at

    cfg = load_config(ROOT / "yaml" / "cifar10_40.yaml", ["method.name=fixmatch", "data.root=/nonexistent"])
    d = derive(cfg, 1, 40, 50000)
    assert (d.lr, d.total_iters, d.warmup_iters) == (RECIPE["lr"], RECIPE["num_train_iter"], RECIPE["num_warmup_iter"])
    assert (d.global_batch, cfg.train.mu, d.ema_momentum) == (RECIPE["batch_size"], RECIPE["uratio"], RECIPE["ema_m"])
    assert (cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.nesterov) == \
        (RECIPE["weight_decay"], RECIPE["momentum"], RECIPE["nesterov"])
    assert not cfg.optim.decay_bn_bias and cfg.optim.schedule == "fixmatch"
    base, total = d.lr, d.total_iters

    def ours(k: int, warm: int = 0) -> float:
        return lr_at(k, base, warm, total, "fixmatch")

    def theirs(k: int, warm: int = 0) -> float:
        return base * cosine_factor(k, total, num_warmup_steps=warm)

    for k in [*range(0, total, 4099), total - 1]:
        assert math.isclose(ours(k), theirs(k), rel_tol=1e-12), (k, ours(k), theirs(k))
    assert math.isclose(ours(total - 1) / base, math.cos(7 * math.pi / 16), rel_tol=1e-5)  # ends near 20 %
    warm = 1000
    assert theirs(0, warm) == 0.0 < ours(0, warm)
    for k in [*range(0, warm - 1, 37), warm - 2]:  # in the warm-up: the project one step ahead
        assert math.isclose(ours(k, warm), theirs(k + 1, warm), rel_tol=1e-12), k
    assert ours(warm - 1, warm) == base and math.isclose(theirs(warm - 1, warm), base * (warm - 1) / warm)
    for k in [warm, *range(warm + 1, total, 4099), total - 1]:  # after it: equal
        assert math.isclose(ours(k, warm), theirs(k, warm), rel_tol=1e-12), k
