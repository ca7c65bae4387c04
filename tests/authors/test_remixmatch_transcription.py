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
from official_remixmatch import (
    FLAGS,
    OPS,
    Classifier,
    OfficialReMixMatch,
    interleave,
    interleave_offsets,
    random_rotate,
)

from conftest import ROOT

pytestmark = pytest.mark.timeout(300)

# per-rank batch B (a multiple of 4: the rotation's quarters); SIZE 16 px: at 8 px layer4's BN batch
# is 4 values a channel, so ill-conditioned that one ulp of a layer1 weight moves the gradients by 1e-5
CLASSES, B, K, SIZE = 10, 4, 2, 16
STEPS, RAMP, ITERS = 5, 2, 8  # steps run; the ramp-up (0, 0.5, then 1 from step RAMP on); the schedule's K
SEED, EMA = 7, 0.5  # train.seed (the keyed draws); model.ema_momentum
W_ROT = 2.0  # runs/ssl/cifar10.sh at 40 labels: --w_rot=2 (yaml/cifar10_40.yaml's with_method)
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


def tiny_config(world: int):
    from simmatch.config import load_config

    return load_config(ROOT / "yaml" / "cifar10_40.yaml", [
        "method.name=remixmatch", "model.arch=resnet10", "model.small_input=true", "data.backend=synthetic",
        "data.root=/nonexistent", "data.format=folder", f"data.num_classes={CLASSES}",
        f"data.synthetic_size={STEPS * world * B}", f"data.crop_size={SIZE}", f"data.val_resize={SIZE}",
        f"data.num_strong={K}", f"train.batch_size={world * B}", f"optim.base_batch={world * B}",
        f"optim.iters={ITERS}", "train.channels_last=false", "train.bn_group_ranks=1", f"train.seed={SEED}",
        f"model.ema_momentum={EMA}", f"method.remixmatch.rampup_iters={RAMP}"])


def draws(rank: int, iteration: int, purpose: int) -> np.random.Generator:
    """The spec's generator of one rank's draws of one kind at one step (purpose 3: MixUp)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([SEED, rank, iteration, purpose])))


def mixup_draws(rank: int, iteration: int, alpha: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """np_beta's draws (float32) and the shuffle, from the keyed generator, in that order."""
    gen = draws(rank, iteration, 3)
    mix = gen.beta(alpha, alpha, n).astype("f")
    return torch.from_numpy(mix), torch.from_numpy(gen.permutation(n))


def make_batches(rank: int, world: int, mean: list[float], std: list[float]) -> tuple[list, list]:
    """STEPS fixed batches of this rank (the layout of simmatch/data/base.py `pack_batch`): images
    normalised from uint8 (what CTAugment takes back to uint8 exactly), a weak view and K strong ones."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def images(g):
        return (torch.randint(0, 256, (B, 3, SIZE, SIZE), generator=g).float() / 255 - m) / s

    labeled, unlabeled = [], []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * step + rank)
        index = torch.arange(B) + (step * world + rank) * B
        labeled.append({"x": images(g), "y": torch.randint(0, CLASSES, (B,), generator=g), "index": index})
        unlabeled.append({"weak": images(g), "strong": [images(g) for _ in range(K)],
                          "y": torch.randint(0, CLASSES, (B,), generator=g), "index": index})
    return labeled, unlabeled


def to_reference(name: str) -> str:
    """The project's student names -> the reference's Classifier."""
    if name.startswith("rotation."):
        return "classify_rot." + name[len("rotation."):]
    assert name.startswith("backbone."), name
    return name[len("backbone."):]


def decode_policies(policy: torch.Tensor) -> list:
    """The project's [b, depth, 1 + values] policy rows as official policies: (op name, values)."""
    names = list(OPS)
    out = []
    for row in policy.double().tolist():
        ops = []
        for entry in row:
            name = names[int(entry[0])]
            values = entry[1:1 + len(OPS[name])]
            assert not any(math.isnan(v) for v in values) and all(math.isnan(v) for v in entry[1 + len(OPS[name]):])
            ops.append((name, values))
        out.append(ops)
    return out


def official_rates(ref: OfficialReMixMatch) -> torch.Tensor:
    """The reference's rate arrays, op after op in OPS order, array after array."""
    return torch.from_numpy(np.concatenate([r for k in OPS for r in ref.augmenter.rates[k]]))


def reference(initial: dict, control: str = "") -> OfficialReMixMatch:
    """The official step from the project's initial student (`initial`: its state dict), with one
    control's change."""
    torch.manual_seed(1234)  # its own initialisation first, then the project's weights
    net = Classifier([1, 1, 1, 1], CLASSES)
    net.load_state_dict({to_reference(k): v.clone() for k, v in initial.items()})
    kwargs = {}
    if control == "temperature":
        kwargs["T"] = FLAGS["T"] * (1 + 1e-4)
    if control == "lambda_u":
        kwargs["w_match"] = FLAGS["w_match"] * (1 + 1e-4)
    return OfficialReMixMatch(net, CLASSES, B, K, w_rot=W_ROT, warmup_steps=RAMP, ema_decay=EMA,
                              ramp_ahead=int(control == "ramp_early"), decay_all=control == "decay_bn",
                              bn_every_forward=control == "bn_every", **kwargs)


def check_recipe(cfg, d, method, opt) -> None:
    """The project's values of the tiny run are the official flags (but for the sizes, the ramp-up
    and the EMA momentum, which the reference is given as the test sets them)."""
    from simmatch.methods.remixmatch import ctaugment

    m = cfg.method.params
    assert (m.mixup_alpha, m.temperature, m.lambda_u, m.lambda_u1, m.lambda_rot) == \
        (FLAGS["beta"], FLAGS["T"], FLAGS["w_match"], FLAGS["w_kl"], W_ROT)
    assert m.dist_align == FLAGS["use_dm"] and d.method_values == {"rampup_iters": RAMP, "da_len": FLAGS["dbuf"]}
    assert (m.ctaugment, m.cta_depth, m.cta_threshold, m.cta_decay) == \
        (True, FLAGS["adepth"], FLAGS["ath"], FLAGS["adecay"])
    assert (cfg.optim.name, cfg.optim.schedule, cfg.optim.weight_decay) == ("adam", "constant", FLAGS["wd"])
    assert d.lr == FLAGS["lr"] and d.ema_momentum == EMA and cfg.train.mu == 1 and cfg.data.num_strong == K
    assert cfg.model.teacher == "eman" and method.teacher.mode == "eman"
    a = FLAGS["adam"]
    assert all((g["betas"], g["eps"]) == ((a["beta1"], a["beta2"]), a["epsilon"]) for g in opt.param_groups)
    assert (method.alpha, method.temperature, method.lambda_u, method.lambda_u1, method.lambda_rot,
            method.rampup_iters) == (FLAGS["beta"], FLAGS["T"], FLAGS["w_match"], FLAGS["w_kl"], W_ROT, RAMP)
    # the project's ops are the official registrations, in their order (the policies' op indices)
    assert [(op.name, op.bins) for op in ctaugment.OPS] == list(OPS.items())
    assert (method.cta.depth, method.cta.threshold, method.cta.decay) == \
        (FLAGS["adepth"], FLAGS["ath"], FLAGS["adecay"])


def check_decay(method, opt, ref: OfficialReMixMatch) -> None:
    """The parameters the project decays (and at what rate) are the official 'kernel' variables."""
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, FLAGS["wd"]}
    assert all(g["lr"] == FLAGS["lr"] for g in opt.param_groups)
    theirs = dict(ref.net.named_parameters())
    kernels = {id(p) for p in ref.net.kernels()}
    names = {to_reference(n) for n, p in method.student.named_parameters() if id(p) in decayed}
    assert names == {n for n, p in theirs.items() if id(p) in kernels}, names
    assert "classify_rot.weight" in names  # the rotation head's kernel is in the 'classify' scopes


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


def test_remixmatch_reference_interleave():
    """The transcription's interleave on a hand example: 5 rows, 3 batches -> groups of 1, 2, 2 rows;
    batch i swaps its group i with batch 0's; applied twice, the identity."""
    a, b, c = (torch.arange(5) + 10 * k for k in range(3))
    assert interleave_offsets(5, 2) == [0, 1, 3, 5]
    out = interleave([a, b, c], 5)
    assert [o.tolist() for o in out] == [[0, 11, 12, 23, 24], [10, 1, 2, 13, 14], [20, 21, 22, 3, 4]]
    assert all(torch.equal(x, y) for x, y in zip(interleave(out, 5), [a, b, c]))
    assert interleave_offsets(4, 3) == [0, 1, 2, 3, 4] and interleave_offsets(4, 4) == [0, 0, 1, 2, 3, 4]


def test_remixmatch_reference_rotation():
    """The transcription's random_rotate (NCHW) against TensorFlow's NHWC slicing run literally in
    NumPy, and its labels against the rotations: 0 as it is, 1 by 180 degrees, 2 by 90 degrees
    counter-clockwise, 3 by 90 clockwise; on a 2 x 2 hand example too."""
    batch, b4 = 8, 2
    x = np.random.default_rng(0).random((batch, 5, 5, 3)).astype("f")  # NHWC
    xx, xt = x[:2 * b4], np.transpose(x[2 * b4:], [0, 2, 1, 3])
    tf_out = np.concatenate([xx[:b4], xx[b4:, ::-1, ::-1], xt[:b4, ::-1], xt[b4:, :, ::-1]], axis=0)
    mine, labels = random_rotate(torch.from_numpy(x).permute(0, 3, 1, 2), batch)
    assert np.array_equal(mine.permute(0, 2, 3, 1).numpy(), tf_out)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    turns = {0: 0, 1: 2, 2: 1, 3: -1}  # np.rot90's k: counter-clockwise quarter turns
    for i in range(batch):
        assert np.array_equal(tf_out[i], np.rot90(x[i], turns[int(labels[i])], axes=(0, 1)))
    hand = torch.tensor([[1, 2], [3, 4]]).view(1, 1, 2, 2).repeat(4, 1, 1, 1)
    rotated, labels = random_rotate(hand, 4)
    assert [r[0].tolist() for r in rotated] == [[[1, 2], [3, 4]], [[4, 3], [2, 1]], [[2, 4], [1, 3]], [[3, 1], [4, 2]]]
    assert labels.tolist() == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The 1-process run: the project's trainer against the official step (~2.5 s)."""
    return compare(0, 1, str(tmp_path_factory.mktemp("remixmatch") / "run"))


def test_remixmatch_step_one_process(one_process):
    """One process, float32: every quantity within TOL at every step (module docstring)."""
    print(one_process["worst"]["official"], one_process["official_probe"])
    check(one_process)


@pytest.fixture(scope="module")
def controlled(tmp_path_factory) -> dict:
    """A 1-process run with the controls' references (CONTROLS) beside the official one (~6.5 s)."""
    return compare(0, 1, str(tmp_path_factory.mktemp("remixmatch_controls") / "run"), CONTROLS)


@pytest.mark.slow  # a second run of the project's steps, with six more references
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
