"""The project's SimMatchV2 through its real engine against the authors' step.

The reference is tests/authors/authors_simmatchv2.py (an independent transcription of github
mingkai-zheng/SimMatchV2 at f0e054c: its own network, banks, DA, graph, losses and SGD). The
project side is `Trainer` built from yaml/in1k_1pct_v2.yaml made tiny
(resnet10 at 16 px, synthetic backend, multi-crop strong views of 16 and 12 px, top-8 neighbours, an unlabeled bank of
v2_k = 2 global batches so that the ring wraps twice in 5 steps), stepped as `Trainer.fit` does
with its streams replaced by fixed batches that the reference reads too. Both start from the
project's initial state (the reference copies its student, labeled and unlabeled banks); before
each step the reference's student takes the project's weights and SGD momenta, as in
tests/authors/test_authors.py (one ReLU flip at rounding level moves a gradient by ~1e-3). Compared per
step, relative (norm of the difference over the norm): the lr, the aligned probabilities, the
graph pseudo-labels, the relations to the unlabeled bank, the losses and the mask, every
gradient, the student and teacher after the step, both banks, the ring pointer and the DA mean.
The first step's node-edge term is not finite on both sides (the bank's probabilities start at
zero) and is dropped by both. In one process shuffle-BN is the identity (the reference gets a
random permutation: BN statistics do not depend on the order); on 3 gloo ranks the reference is
given the project's permutation of the step, each rank its own batches.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from authors_simmatch import Trunk
from authors_simmatchv2 import RECIPE_1P, Authors, Net, SimMatchV2

from conftest import ROOT

CLASSES, B, MU, SIZE, PROJ, TOPN, K_STEPS, STEPS, SPE = 10, 4, 2, 16, 16, 8, 2, 5, 3
STRONG = (SIZE, 12)  # multi-crop: the first strong view at the crop size, the second smaller
FC_SCALE = 10.0  # a confident classifier: the 0.7 threshold passes some samples and not others
TOL = 1e-5


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def tiny_config(world: int):
    from simmatch.config import load_config

    n = SPE * B * MU * world
    return load_config(ROOT / "yaml" / "in1k_1pct_v2.yaml", [
        "method.name=simmatchv2", "model.norm_feat=true", "model.arch=resnet10", "model.small_input=true",
        f"model.proj_dim={PROJ}", f"data.num_classes={CLASSES}", "data.backend=synthetic",
        f"data.synthetic_size={n}", f"data.crop_size={SIZE}", "data.root=/nonexistent", "data.num_strong=2",
        f"data.strong_sizes=[{STRONG[0]},{STRONG[1]}]", "data.strong_min_scales=[0.14,0.05]",
        "data.strong_max_scales=[1.0,0.429]",
        f"train.batch_per_gpu={B}", f"train.mu={MU}", "train.min_bn_images=0", "train.channels_last=false",
        f"optim.base_batch={B * world}", f"method.simmatchv2.topn={TOPN}", f"method.simmatchv2.k={K_STEPS}",
        "optim.epochs=300"])


def batches(labels: torch.Tensor, rank: int, world: int) -> tuple[list, list]:
    """This rank's fixed batches; a step's labeled indices are distinct over the ranks."""
    k = labels.numel()
    labeled, unlabeled = [], []
    for s in range(STEPS):
        order = torch.Generator().manual_seed(1000 + s)
        index = torch.randperm(k, generator=order)[rank * B:(rank + 1) * B]
        u_index = torch.randperm(k, generator=order)[rank * B * MU:(rank + 1) * B * MU]
        g = torch.Generator().manual_seed(10_000 * s + rank)
        labeled.append({"x": torch.randn(B, 3, SIZE, SIZE, generator=g), "y": labels[index], "index": index})
        unlabeled.append({"weak": torch.randn(B * MU, 3, SIZE, SIZE, generator=g),
                          "strong": [torch.randn(B * MU, 3, n, n, generator=g) for n in STRONG],
                          "y": labels[u_index], "index": u_index})
    return labeled, unlabeled


def to_reference(name: str) -> str:
    return name.replace("backbone.fc.", "fc.", 1)


def compare(rank: int, world: int, run_dir: str) -> dict:
    """Both sides over STEPS steps on `world` ranks: the worst relative difference per quantity."""
    from simmatch import distributed as sdist
    from simmatch.engine.optim import lr_at, set_lr
    from simmatch.engine.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(tiny_config(world), Path(run_dir), torch.device("cpu"))
    d, method, opt = trainer.derived, trainer.method, trainer.optimizer
    assert d.lr == RECIPE_1P["lr"] and d.ema_momentum == RECIPE_1P["ema_m"] and trainer.dtype is None
    assert d.method_values["k"] == K_STEPS * B * MU * world and method.teacher.shuffle_bn
    with torch.no_grad():
        method.student.backbone.fc.weight.mul_(FC_SCALE)
        method.teacher.module.load_state_dict(method.student.state_dict())
    hp = {**RECIPE_1P, "dim": PROJ, "topn": TOPN, "fp16": False}
    torch.manual_seed(0)
    ref = SimMatchV2(lambda: Trunk([1, 1, 1, 1], small_input=True), CLASSES, method.bank.labels, d.method_values["k"],
                     hp)
    assert isinstance(ref.main, Net)
    ref.main.load_state_dict({to_reference(k): v for k, v in method.student.state_dict().items()})
    ref.ema.load_state_dict(ref.main.state_dict())
    with torch.no_grad():  # the same starting banks (drawn alike: random unit vectors)
        ref.l_bank.copy_(method.bank.features)
        ref.u_bank.copy_(method.unlabeled.features)
    authors = Authors(ref, d.steps_per_epoch)

    seen: list = []
    make_targets = method.targets

    def spy(labeled, unlabeled, iteration):
        out = make_targets(labeled, unlabeled, iteration)
        seen.append({k: torch.cat([t[k] for t in out.ranks]).clone() for k in out.ranks[0]})
        return out

    method.targets = spy
    labeled, unlabeled = batches(method.bank.labels, rank, world)
    saved = trainer.streams.labeled, trainer.streams.unlabeled
    trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled = iter(labeled), iter(unlabeled)
    student = dict(method.student.named_parameters())
    theirs_of = {n: dict(ref.main.named_parameters())[to_reference(n)] for n in student}
    worst: dict[str, float] = {}
    masks, dropped = [], []

    def note(key, a, b):
        worst[key] = max(worst.get(key, 0.0), rel(a, b))

    try:
        method.train()
        for it in range(STEPS):
            with torch.no_grad():
                for n, p in student.items():
                    theirs_of[n].copy_(p)
                    if opt.state.get(p):
                        momentum = opt.state[p]["momentum_buffer"].clone()
                        authors.optimizer.state[theirs_of[n]]["momentum_buffer"] = momentum
            lr = lr_at(trainer.iteration, d.lr, d.warmup_iters, d.total_iters)
            set_lr(opt, lr)
            ours = trainer.step()
            trainer.iteration += 1
            if world > 1:
                perm = sdist.shuffle_permutation(B * (1 + MU) * world, trainer.cfg.train.seed, it)
            else:
                perm = torch.randperm(B * (1 + MU), generator=torch.Generator().manual_seed(it))
            theirs = authors.step(*divmod(it, d.steps_per_epoch), labeled[it], unlabeled[it], perm)
            mine = seen[-1]
            note("lr", lr, theirs["lr"])
            note("p", mine["p"], theirs["prob_ku"])
            note("pseudo", mine["pseudo"], theirs["pseudo_label"])
            note("relation", mine["relation"], theirs["relation_ku"])
            for key, their_key in (("loss", "loss"), ("loss_x", "loss_sup"), ("loss_nn", "loss_nn"),
                                   ("loss_ee", "loss_ee"), ("loss_ne", "loss_ne"), ("mask", "mask")):
                note(key, ours[key], theirs[their_key].reshape(()))
            masks.append(float(ours["mask"]))
            dropped.append((float(ours["nonfinite_ne"]), float(theirs["loss_ne"].reshape(())) == 0.0))
            for n, p in student.items():
                note("grad", p.grad, theirs_of[n].grad)
                note("student", p, theirs_of[n])
            ema = dict(ref.ema.named_parameters())
            for n, p in method.teacher.module.named_parameters():
                note("teacher", p, ema[to_reference(n)])
            note("l_bank", method.bank.features, ref.l_bank)
            note("u_bank", method.unlabeled.features, ref.u_bank)
            note("u_probs", method.unlabeled.probs, ref.u_labels)
            note("da", method.da.mean, ref.da.reshape(-1))
            assert int(method.unlabeled.ptr) == int(ref.ptr[0])
    finally:
        method.targets = make_targets
        trainer.streams.train[0].labeled, trainer.streams.train[0].unlabeled = saved
        trainer.close()
        torch.set_num_threads(threads)
    return {"worst": worst, "masks": masks, "dropped": dropped, "bank": d.method_values["k"]}


def check(result: dict, world: int) -> None:
    print(result)
    dropped, masks = result["dropped"], result["masks"]
    assert dropped[0] == (1.0, True) and all(d == (0.0, False) for d in dropped[1:]), dropped
    assert any(0.0 < m < 1.0 for m in masks), masks
    assert STEPS * B * MU * world >= 2 * result["bank"]  # 5 steps of rows in a 2-step ring: 2 wraps
    bad = {k: v for k, v in result["worst"].items() if not v <= TOL}
    assert not bad, bad


def test_authors_v2_one_process(tmp_path):
    check(compare(0, 1, str(tmp_path / "run")), 1)


@pytest.mark.slow
def test_authors_v2_three_gloo_ranks_with_shuffle_bn(gloo, tmp_path):
    """Their shuffle-BN (all-gather, rank 0's permutation) and all-gathered bank writes against the
    project's all_to_all shuffle and its banks, on 3 real ranks."""
    for result in gloo(compare, 3, tmp_path, str(tmp_path / "run")):
        check(result, 3)


def test_authors_v2_graph_pseudo_labels_equal_theirs():
    """The project's solved graph against the transcription's inverse on random data."""
    from authors_simmatchv2 import graph_pseudo_label

    from simmatch.methods.simmatchv2.method import graph_pseudo_labels

    g = torch.Generator().manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    labels = torch.randint(0, CLASSES, (40,), generator=g)
    p = torch.softmax(torch.randn(6, CLASSES, generator=g), dim=1)
    ours = graph_pseudo_labels(z, p, bank, labels, CLASSES, 8, 0.1, 0.1)
    theirs = graph_pseudo_label(z, p, bank, torch.nn.functional.one_hot(labels, CLASSES).float(), 8, 0.1, 0.1)
    assert rel(ours, theirs) < 1e-6 and torch.allclose(ours.sum(dim=1), torch.ones(6))


def test_authors_v2_unlabeled_bank_at_another_size_keeps_its_newest_entries():
    """K follows the global batch: a ring saved at K = 12 (after 5 writes of 4, wrapped) loaded
    at K = 8 keeps its 8 newest rows oldest first, and at K = 20 all 12 with zero rows after;
    the next write goes after the newest (checked against the rows written, by hand)."""
    from simmatch.methods.simmatchv2.method import UnlabeledBank

    old = UnlabeledBank(12, 3, 2)
    written = []
    for s in range(5):
        feats, probs = torch.full((4, 3), float(s + 1)), torch.full((4, 2), float(s + 1) / 10)
        feats[:, 0] = torch.arange(4) + 10 * s
        written.append(feats)
        old.update(feats, probs)
    rows = torch.cat(written)  # 20 rows in order; the ring holds the last 12
    assert int(old.ptr) == 20 % 12 and int(old.count) == 12
    for size, kept in ((8, 8), (20, 12)):
        new = UnlabeledBank(size, 3, 2)
        new.load_state_dict(old.state_dict())
        torch.testing.assert_close(new.features[:kept], rows[-kept:], rtol=0, atol=0)
        assert torch.equal(new.features[kept:], torch.zeros(size - kept, 3))
        assert (int(new.ptr), int(new.count)) == (kept % size, kept)
        nxt = torch.full((4, 3), -1.0)
        new.update(nxt, torch.zeros(4, 2))
        index = [(kept + i) % size for i in range(4)]
        assert torch.equal(new.features[index], nxt)
