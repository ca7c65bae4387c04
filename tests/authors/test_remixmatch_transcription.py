"""The ReMixMatch step, through the project's real engine, against its official code.

The reference is tests/authors/official_remixmatch.py, a transcription of google-research/remixmatch
(CTA variant, redux '1st'; its docstring names the files, functions and commit) into PyTorch: its own
network class (the test's architecture with a BN that keeps its moving averages as pending update
ops), guess_label with PData / PMovingAverage, MixMode 'xxy.yxy', interleave, random_rotate, the
losses and ramp, TensorFlow's Adam, the decoupled decay of the kernels, TensorFlow's EMA and
CTAugment's update_rates from the EMA's probe predictions. The project side is `Trainer` built from
yaml/cifar10_40.yaml with method.name=remixmatch (its with_method blocks: Adam, lr 0.002 constant,
decay 0.02, mu 1, the [-1, 1] normalisation, CTAugment; the 40-label w_rot 2) made tiny (resnet10 at
SIZE px with the synthetic backend, K = 2 strong views, the ramp-up over RAMP steps, an EMA of 0.5 so
that it moves), run step by step as `Trainer.fit` does (lr from `lr_at`, `Trainer.step()`, the student
in the trainer's own DDP above one rank), its data streams replaced by fixed batches.

This file holds the lockstep comparison and its tests; the run's set-up (its sizes and config, its
fixed batches and keyed draws, the reference built from the project's initial student, the recipe
checked against the official flags) and the reference's own tests are in
tests/authors/test_remixmatch_reference.py.

What the reference is given, per step and rank:
- the images the project's step used: what `Method.augment_views` returned (a spy wraps the method
  instance's bound method): the labeled training images, their probes and probe policies (decoded
  here from the project's [b, depth, 3] tensor by the official op order, which the project's OPS
  table is asserted to follow), the weak view and the K CTAugment'ed strong views. How CTAugment draws
  and applies a policy is not this step's maths (its own tests); the rates it learns are compared.
- MixMode's draws, re-derived here from the project's spec (docs: the keyed generator
  np.random.Generator(PCG64(SeedSequence([train.seed, rank, iteration, 3]))), beta(a, a, n) as
  float32 then permutation(n)): the official code draws them from np.random.beta and
  tf.random_shuffle, unkeyed. The derived draws are also asserted equal to those the project's step
  carried (`mix_lam` = max(beta, 1 - beta), `mix_index`).

Compared at every step, as the relative difference per tensor (norm of the difference over the norm
of the reference): the lr; the guess forward's logits (weak view); the guess (aligned and sharpened);
the logits of the first strong view's forward, of each of the K + 2 interleaved MixUp forwards (in
their interleaved order) and of the rotation head; the ramp and the losses (loss_x = loss_xe,
loss_u = loss_xeu, loss_u1 = loss_kl, loss_rot, loss); every gradient (the project's as its optimizer
receives them, all-reduced above one rank); the student's parameters, Adam's m and v, and the BN
running statistics after the step; the EMA's parameters and BN statistics; DA's p_model buffer (the
project's ring read from its pointer, oldest first, against the reference's FIFO row by row) and
p_data; the probes' accuracies; CTAugment's rates after the update (the project's flat buffer against
the official arrays in OPS order). Also asserted: every parameter has a gradient, and the ramp is 0,
0.5, then 1 (clipped) over the steps.

Lockstep: before each step the reference's student takes the project's weights (after they were
compared), as the USB tests do (tests/authors/test_table1_usb_fixmatch.py), and its Adam applies the
project's gradients (its own are computed and compared): Adam divides each gradient element by its
running root mean square, so an element near zero (|g| about eps / sqrt(1 - beta2) = 3e-7 at the
first step) turns a rounding-level change of the gradient into a large change of its step (one ulp of
one layer1 weight, with each side's own gradients: the gradients 1e-6 apart, the parameters after the
step 1e-5). From the same gradients the optimizer is checked on its own. Adam's moments, the BN
statistics, the EMA, the DA buffers and the CTAugment rates of each side evolve on their own.

Tolerance: TOL = 1e-5, relative, per tensor; seen: ~2e-6 (the parameters and EMA: Adam's float32
scalars, below), ~1e-6 (the probes' accuracies), else below 3e-7 (the forwards bit for bit). Controls
(one process, a run of their own in the full tier, one reference each beside the official one, for the
steps in CONTROLS): one ulp of one layer1 weight of the reference's student at every step stays inside
(its gradients move by ~1e-6); the temperature 1e-4 (relative) off, lambda_u 1e-4 (relative) off, the
ramp read a step early, the decay applied to every parameter (BN scales and offsets, biases) and BN
statistics moved by every train-mode forward instead of the last interleaved one are caught, each
where it acts and not elsewhere.

Rounding: TensorFlow's ApplyAdam computes in the variable's float32 (1 - beta2 = 1 - float32(0.999) =
0.00099998713; beta1^t, beta2^t float32 variables), the project's DecoupledAdam in float64 (1 - 0.999,
0.999^t). v is linear in 1 - beta2: it differs by the factor 0.99998713 throughout (asserted: 1.2e-5 <
the relative difference < 1.4e-5; `adam_v` compares the project's v times that factor); the bias
correction 1 - beta2^t carries float32's rounding of beta2^t besides (up to 1.4e-5 relative over these
steps, half of it in the step): the parameters differ by ~2e-6 (relative) here. A rounding-level
difference, not a change of the method; the transcription keeps TensorFlow's arithmetic.

Where the project deliberately differs from the official code, and how this test handles it:
- EMA's BN statistics: the official EMA averages the trainable variables only (getter_ema finds no
  average for the moving statistics: the EMA's evaluation, CTAugment's probes included, uses the
  student's); the project's ("eman") averages the BN buffers with the same momentum. The EMA's
  parameters are compared with the official EMA; its BN buffers, and the statistics the reference's
  probe forward uses, with that average taken of the reference student's own statistics (here, not in
  the transcription). The probes through the official getter are computed too and asserted to differ
  from the project's from the second step on (the difference is visible to this test).
- random draws: keyed by (seed, rank, iteration, purpose), above.
- above one process the official code has no counterpart: the reference is its data-parallel form
  (official_remixmatch's docstring): per-rank BN (the recipe's train.bn_group_ranks=1), gradients
  averaged, p_model / p_data / BN statistics moved by the ranks' mean (aggregation MEAN, the project's
  all-reduced means and `average_buffers`), update_rates over every rank's probes in rank order.
- TensorFlow's open orders (official_remixmatch's docstring) are taken as the project takes them:
  the ramp reads the steps done before this one, the probes go through the EMA as it was before this
  step, the kernels decay before the EMA reads them.
- CTAugment's update arithmetic: the project's is NumPy 2's (float32 throughout), the transcription
  the NumPy 1.x of the official code's time (float64 then stored as float32): at most a last-bit
  difference of a rate.
- BN's num_batches_tracked: the project's train-mode forwards that move nothing (momentum 0) still
  count; TensorFlow has no such counter and nothing reads it (the momentum is set): not compared.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from official_remixmatch import FLAGS, OfficialReMixMatch
from test_remixmatch_reference import (
    CLASSES,
    RAMP,
    STEPS,
    B,
    K,
    check_decay,
    check_recipe,
    decode_policies,
    make_batches,
    mixup_draws,
    official_rates,
    reference,
    tiny_config,
    to_reference,
)

pytestmark = pytest.mark.timeout(300)

TOL = 1e-5  # relative (norm of the difference over the norm of the reference), per tensor
TF_ONE_MINUS_BETA2 = float(1 - np.float32(FLAGS["adam"]["beta2"]))  # 0.00099998713: ApplyAdam's T(1) - beta2
ULP_AT = ("layer1.0.conv1.weight", (0, 0, 0, 0))  # the reference's weight the ulp control moves
# control -> the steps its reference runs: the ulp one the whole run; the others until their change
# has shown (the losses weigh the guess's term from step 1, fully from step RAMP)
CONTROLS = {"ulp": STEPS, "temperature": RAMP + 1, "lambda_u": RAMP + 1, "ramp_early": 1, "decay_bn": 1,
            "bn_every": 1}
CHECKED = ("lr", "logits_weak", "guess", "logits_kl", "logits_mix", "rot_logits", "ramp", "loss_x", "loss_u",
           "loss_u1", "loss_rot", "loss", "grad", "student", "adam_m", "adam_v", "student_bn", "ema", "ema_bn",
           "p_model", "p_data", "probe_accuracy", "cta_rates")


def rel(a, b) -> float:
    """|a - b| / |b| (Frobenius norms); float32 pairs in float32 (the difference of two close floats
    is exact, the norms' rounding a 1e-7 relative part of a figure compared with 1e-5)."""
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    if a.dtype == b.dtype and torch.equal(a, b):
        return 0.0
    if not (a.dtype == b.dtype == torch.float32):
        a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@contextlib.contextmanager
def watch(method):
    """The project's step as its method sees it, one dict per step: the views `augment_views`
    returned (a spy on the instance's bound method), the targets, and the student's forwards (the
    guess's, then the one of the losses)."""
    seen: list[dict] = []
    augment_views, targets = method.augment_views, method.targets

    def views_spy(labeled, unlabeled, ranks, iteration):
        lab, unl = augment_views(labeled, unlabeled, ranks, iteration)
        seen.append({"ranks": list(ranks), "iteration": iteration,
                     "labeled": [{k: v.clone() for k, v in x.items()} for x in lab],
                     "unlabeled": [{k: [t.clone() for t in v] if isinstance(v, list) else v.clone()
                                    for k, v in x.items()} for x in unl], "forwards": []})
        return lab, unl

    def targets_spy(labeled, unlabeled, iteration):
        step = targets(labeled, unlabeled, iteration)
        seen[-1]["targets"] = [{k: v.clone() for k, v in r.items()} for r in step.ranks]
        return step

    def forward_hook(_module, _inputs, out):
        if isinstance(out[0], list):
            seen[-1]["forwards"].append({"outs": [o.detach().clone() for o in out[0]],
                                         "rot": out[1].detach().clone()})
        else:
            seen[-1]["forwards"].append({"logits": out[0].detach().clone()})

    method.augment_views, method.targets = views_spy, targets_spy
    hook = method.student.register_forward_hook(forward_hook)
    try:
        yield seen
    finally:
        hook.remove()
        del method.augment_views, method.targets  # the class's methods again


def compare(rank: int, world: int, run_dir: str, controls: dict[str, int] | None = None) -> dict:
    """The project's trainer and the official step (and one reference per control) in lockstep over
    STEPS steps on `world` ranks (a control's reference for its number of steps); per reference the
    worst relative difference per quantity."""
    from simmatch.engine.trainer import Trainer

    threads = torch.get_num_threads()
    # one thread: several processes on 2 cores (and a process beside a busy core) spin-wait otherwise
    torch.set_num_threads(1)
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        trainer = Trainer(tiny_config(world), Path(run_dir), torch.device("cpu"))
        streams = trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled
        try:
            return lockstep(trainer, rank, world, controls)
        finally:
            trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled = streams
            trainer.close()
    finally:
        torch.set_num_threads(threads)


def lockstep(trainer, rank: int, world: int, controls: dict[str, int] | None) -> dict:
    from simmatch.engine.optim import lr_at, set_lr

    cfg, d, method, opt = trainer.cfg, trainer.derived, trainer.method, trainer.optimizer
    assert (world > 1) == isinstance(trainer.student, torch.nn.parallel.DistributedDataParallel)
    assert d.bn_group_ranks == 1 and trainer.dtype is None and trainer.ranks == [rank]
    check_recipe(cfg, d, method, opt)
    initial = {k: v.clone() for k, v in method.student.state_dict().items()}
    steps = {"": STEPS, **(controls or {})}
    refs = {name: reference(initial, name) for name in steps}
    check_decay(method, opt, refs[""])
    student = dict(method.student.named_parameters())
    teacher = dict(method.teacher.module.named_parameters())
    grads: dict[str, torch.Tensor] = {}
    pre_step = opt.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in student.items() if p.grad is not None}))
    # the project's EMA buffers against the same average of each reference student's statistics (docstring)
    eman = {name: {n: b.clone() for n, b in r.net.named_buffers() if b.is_floating_point()}
            for name, r in refs.items()}

    labeled, unlabeled = make_batches(rank, world, cfg.data.mean, cfg.data.std)
    trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled = iter(labeled), iter(unlabeled)
    worst: dict[str, dict[str, float]] = {name: {} for name in refs}
    out: dict = {"official_probe": [], "ramp": [], "unused": []}

    def note(name, key, a, b):
        worst[name][key] = max(worst[name].get(key, 0.0), rel(a, b))

    try:
        with watch(method) as seen:
            method.train()
            for it in range(STEPS):
                lr = lr_at(trainer.iteration, d.lr, d.warmup_iters, d.total_iters, cfg.optim.schedule)  # as fit
                set_lr(opt, lr)
                running = {name: r for name, r in refs.items() if it < steps[name]}
                for name, r in running.items():  # each reference's student steps from the project's (docstring)
                    take_student(r, student, ulp=name == "ulp")
                grads.clear()
                ours = trainer.step()
                trainer.iteration += 1
                mine = seen[-1]
                assert len(seen) == it + 1 and mine["ranks"] == [rank] and mine["iteration"] == it
                lab, unl, tg = mine["labeled"][0], mine["unlabeled"][0], mine["targets"][0]
                guess_forward, losses_forward = mine["forwards"]  # one guess forward, one of the losses
                mix, index = mixup_draws(rank, it, FLAGS["beta"], (K + 2) * B)  # the pool: x, weak, K strong
                assert torch.equal(unl["mix_lam"], torch.maximum(mix, 1 - mix)) and torch.equal(unl["mix_index"], index)
                policy = decode_policies(lab["policy"])
                views = [unl["weak"], *unl["strong"]]
                out["ramp"].append(float(ours["ramp"]))
                for name, r in running.items():
                    if name == "":  # the probes through the official getter: the student's BN statistics
                        p = r.classify_op(lab["probe"])
                        official = 1 - 0.5 * (p - torch.nn.functional.one_hot(lab["y"], CLASSES)).abs().sum(1)
                        out["official_probe"].append(rel(tg["probe_accuracy"], official))
                    theirs = r.step(lab["x"], lab["y"], views, lab["probe"], policy, mix, index,
                                    probe_buffers=eman[name],
                                    applied_grads={to_reference(n): g for n, g in grads.items()})
                    if name == "":
                        out["unused"].append(theirs["unused"])
                    note(name, "lr", lr, r.lr)
                    note(name, "logits_weak", guess_forward["logits"], theirs["logits_weak"])
                    note(name, "guess", tg["guess"], theirs["guess"])
                    outs = losses_forward["outs"]
                    note(name, "logits_kl", outs[0], theirs["logits_kl"])
                    assert len(outs) == K + 3 and len(theirs["interleaved_logits"]) == K + 2
                    for a, b in zip(outs[1:], theirs["interleaved_logits"]):
                        note(name, "logits_mix", a, b)
                    note(name, "rot_logits", losses_forward["rot"], theirs["rot_logits"])
                    for key, their_key in (("ramp", "ramp"), ("loss_x", "loss_xe"), ("loss_u", "loss_xeu"),
                                           ("loss_u1", "loss_kl"), ("loss_rot", "loss_rot"), ("loss", "loss")):
                        note(name, key, ours[key], theirs[their_key])
                    note(name, "probe_accuracy", tg["probe_accuracy"], theirs["accuracy"])
                    record_state(name, note, method, opt, r, grads, theirs, student, teacher, eman[name], d)
    finally:
        pre_step.remove()
    out["worst"] = {name or "official": w for name, w in worst.items()}
    return out


@torch.no_grad()
def take_student(r: OfficialReMixMatch, student: dict, ulp: bool) -> None:
    """The project's student weights into the reference (the docstring); `ulp`: then one weight one
    ulp up (the control)."""
    theirs = dict(r.net.named_parameters())
    for n, p in student.items():
        theirs[to_reference(n)].copy_(p)
    if ulp:
        name, at = ULP_AT
        w = theirs[name]
        w[at] = torch.nextafter(w[at], torch.tensor(math.inf))


@torch.no_grad()
def record_state(name, note, method, opt, r: OfficialReMixMatch, grads, theirs, student, teacher, eman, d) -> None:
    """After the step: gradients, parameters, Adam's moments, BN statistics, EMA, DA, CTAugment."""
    their_params = dict(r.net.named_parameters())
    assert set(grads) == set(student) and set(theirs["grads"]) == set(their_params)
    for n, p in student.items():
        k = to_reference(n)
        note(name, "grad", grads[n], theirs["grads"][k])
        note(name, "student", p, their_params[k])
        q = their_params[k]
        note(name, "adam_m", opt.state[p]["m"], r.optimizer.m[q])
        # v: TensorFlow's 1 - beta2 is float32's (the module docstring); v is linear in it
        beta2 = opt.param_groups[0]["betas"][1]
        note(name, "adam_v", opt.state[p]["v"] * (TF_ONE_MINUS_BETA2 / (1.0 - beta2)), r.optimizer.v[q])
        note(name, "adam_v_raw", opt.state[p]["v"], r.optimizer.v[q])
        note(name, "ema", teacher[n], r.ema.shadow[k])
    their_buffers = dict(r.net.named_buffers())
    m = d.ema_momentum
    for n, b in method.teacher.module.named_buffers():
        if not b.is_floating_point():
            continue  # num_batches_tracked (docstring)
        k = to_reference(n)
        eman[k].mul_(m).add_(their_buffers[k], alpha=1.0 - m)
        note(name, "ema_bn", b, eman[k])
    for n, b in method.student.named_buffers():
        if b.is_floating_point():
            note(name, "student_bn", b, their_buffers[to_reference(n)])
    align = method.align
    rows = torch.roll(align.p_model, -int(align.ptr), dims=0)  # the ring from its oldest entry
    note(name, "p_model", rows, r.p_model.ma)
    note(name, "p_data", align.p_data, r.p_data.p_data)
    note(name, "cta_rates", method.cta.rates, official_rates(r))


def check(out: dict) -> None:
    worst = dict(out["worst"]["official"])
    # Adam's v itself: TensorFlow's float32 1 - beta2 against the project's (the module docstring)
    assert 1.2e-5 < worst.pop("adam_v_raw") < 1.4e-5, out["worst"]["official"]
    assert set(worst) == set(CHECKED), set(worst) ^ set(CHECKED)
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, bad
    assert all(u == [] for u in out["unused"]), out["unused"]  # every parameter has a gradient
    # the ramp from 0 by 1 / RAMP a step to its clip at 1 (STEPS > RAMP)
    assert out["ramp"] == [min(1.0, it / RAMP) for it in range(STEPS)], out["ramp"]
    # the project's probes through the "eman" EMA: the official getter's (the student's BN
    # statistics) differ from the second step on (the module docstring)
    assert out["official_probe"][0] <= TOL and min(out["official_probe"][1:]) > 10 * TOL, out["official_probe"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The 1-process run: the project's trainer against the official step, and against the
    controls' references (CONTROLS) beside it in the same lockstep (~6.5 s)."""
    return compare(0, 1, str(tmp_path_factory.mktemp("remixmatch") / "run"), CONTROLS)


@pytest.mark.slow  # a trainer and its references in lockstep (6.5 s): the fast tier keeps the parts
def test_remixmatch_step_one_process(one_process):
    """One process, float32: every quantity within TOL at every step (module docstring)."""
    print(one_process["worst"]["official"], one_process["official_probe"])
    check(one_process)


@pytest.fixture(scope="module")
def controlled(one_process) -> dict:
    """The same run: its controls' references were stepped beside the official one."""
    return one_process


@pytest.mark.slow  # the one-process run's six further references
@pytest.mark.parametrize("control, caught", [
    ("ulp", set()),  # one weight one ulp up at every step: inside
    ("temperature", {"guess", "loss_u", "loss_u1", "grad"}),  # T 1e-4 (relative) off
    ("lambda_u", {"loss", "grad"}),  # lambda_u 1e-4 (relative) off (caught once the ramp is above 0)
    ("ramp_early", {"ramp", "loss", "grad"}),  # the ramp read a step ahead
    ("decay_bn", {"student", "ema"}),  # the decay on BN scales and offsets and biases too
    ("bn_every", {"student_bn", "ema_bn"}),  # every train-mode forward moves the BN statistics
], ids=list(CONTROLS))
def test_remixmatch_controls(controlled, control, caught):
    """The tolerance holds a rounding-level change of the reference's weights and catches a small
    real change of its step, where that change acts and not elsewhere. (The gradients a reference's
    Adam applies are the project's, module docstring: a change of the loss shows in the losses and
    gradients, not in the parameters.)"""
    worst = dict(controlled["worst"][control])
    print(control, worst)
    worst.pop("adam_v_raw")  # TensorFlow's float32 1 - beta2 (check())
    failed = {k for k, v in worst.items() if not v <= TOL}
    if not caught:
        assert not failed, worst
        assert worst["logits_weak"] > 0.0 == controlled["worst"]["official"]["logits_weak"]  # it moved the reference
        return
    assert caught <= failed, worst
    assert max(worst[k] for k in caught) > 3 * TOL, worst
    untouched = {"lambda_u": {"guess", "loss_u", "loss_u1", "student"}, "temperature": {"student"},
                 "ramp_early": {"student"}, "decay_bn": {"grad", "loss"},
                 "bn_every": {"grad", "loss", "student"}}[control]
    assert not untouched & failed, worst


@pytest.mark.slow
def test_remixmatch_step_three_ranks(gloo, tmp_path):
    """3 gloo ranks: the project's DDP, all-reduced DA means, averaged BN statistics and gathered
    CTAugment updates against the official step's data-parallel form (module docstring)."""
    for out in gloo(compare, 3, tmp_path, str(tmp_path / "run")):
        print(out["worst"]["official"], out["official_probe"])
        check(out)
