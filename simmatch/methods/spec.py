"""What each method is, in one place: the facts the config, the recipe, the pre-flight and the
engine read about it, without building it (no torch here).

A method's facts: which streams it draws, whether it trains the classifier (else it is scored
by k-NN), which teacher it makes targets with (FixMatch's and the supervised baseline's EMA is
only evaluated: always `eman`, whatever model.teacher says), whether it aligns the distribution
and keeps a labeled bank, and how many images its forwards normalise with batch statistics
(the BN batch `train.min_bn_images` is held against). Adding a method: a spec here, a
`Literal` entry in config/schema.py, a module that registers the class (CONTRIBUTING.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SHUFFLE_BN = "ema_shuffle_bn"  # the teacher mode that runs in train mode on the batch's statistics


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: str  # imported to register the method's class (simmatch/methods/registry.py)
    needs_labeled: bool
    needs_unlabeled: bool
    trains_classifier: bool  # False: evaluated by k-NN on the trunk's features
    configured_teacher: bool  # True: model.teacher; False: an EMA that only evaluates (eman)
    aligns: bool  # distribution alignment when method.dist_align (method.da_target picks whose)
    has_bank: bool  # the labeled bank and L_in when method.use_bank
    # images in the student's forward and in the teacher's (its BN batch), from the per-rank
    # labeled batch b, unlabeled batch bu and strong views s; None: the network does not run
    student_images: tuple[int, int, int] = (1, 0, 0)  # b, bu, s*bu multiples
    teacher_images: tuple[int, int] | None = None  # b, bu multiples (a target-making teacher)
    unlabeled_bank: bool = False  # a ring of method.v2_k global unlabeled batches (SimMatchV2)
    views_apart: bool = False  # strong views after the first forwarded on their own (bu images each)

    def teacher(self, cfg: Any) -> str:
        """The teacher mode this method trains with under `cfg`."""
        return str(cfg.model.teacher) if self.configured_teacher else "eman"

    def uses_da(self, cfg: Any) -> bool:
        return self.aligns and bool(cfg.method.dist_align)

    def uses_bank(self, cfg: Any) -> bool:
        return self.has_bank and bool(cfg.method.use_bank)

    def bn_batch(self, b: int, bu: int, strong: int, teacher: str) -> int:
        """Images in the smallest batch whose statistics BN normalises with, per rank: the
        student's forward, and a train-mode (shuffle-BN) teacher's; an eval-mode teacher (eman)
        uses its running statistics and does not count."""
        lab, unl, views = self.student_images
        sizes = [lab * b + unl * bu + views * strong * bu] + ([bu] if self.views_apart and strong > 1 else [])
        if self.teacher_images is not None and self.configured_teacher and teacher == SHUFFLE_BN:
            sizes.append(self.teacher_images[0] * b + self.teacher_images[1] * bu)
        return min(sizes)


def bank_bytes(cfg: Any, spec: MethodSpec, unlabeled_bank: int, num_labeled: int) -> dict[str, int]:
    """The memory every rank allocates for a method's banks and queues, by name: fp32 rows
    (model.proj_dim wide; SimMatchV2's unlabeled bank also a probability row of data.num_classes),
    int64 labels. Each is drawn at random and normalised when it is built, which holds about twice
    its rows for a moment; counted once here."""
    dim, out = cfg.model.proj_dim, {}
    if spec.uses_bank(cfg) or spec.unlabeled_bank:
        out["labeled bank"] = num_labeled * (dim * 4 + 8)
    if spec.unlabeled_bank:
        out["unlabeled bank"] = unlabeled_bank * (dim + cfg.data.num_classes) * 4
    if spec.name == "isd":
        out["queue"] = cfg.method.queue_size * dim * 4
    return out


def size_text(n: float) -> str:
    """Bytes in decimal units: '614.4 TB', '3.2 GB', '512 B'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    # student: cat(labeled, strong views); teacher: cat(labeled, weak)
    MethodSpec("simmatch", "simmatch.methods.simmatch", needs_labeled=True, needs_unlabeled=True,
               trains_classifier=True, configured_teacher=True, aligns=True, has_bank=True,
               student_images=(1, 0, 1), teacher_images=(1, 1)),
    # Sohn et al.: one student forward over cat(labeled, weak, strong views); the EMA only evaluates
    MethodSpec("fixmatch", "simmatch.methods.fixmatch", needs_labeled=True, needs_unlabeled=True,
               trains_classifier=True, configured_teacher=False, aligns=False, has_bank=False,
               student_images=(1, 1, 1)),
    MethodSpec("supervised", "simmatch.methods.supervised", needs_labeled=True, needs_unlabeled=False,
               trains_classifier=True, configured_teacher=False, aligns=False, has_bank=False,
               student_images=(1, 0, 0)),
    # SimMatchV2: student cat(labeled, first strong view), then each further view on its own;
    # teacher: cat(labeled, weak); its own DA (a running mean) and labeled + unlabeled banks
    MethodSpec("simmatchv2", "simmatch.methods.simmatchv2", needs_labeled=True, needs_unlabeled=True,
               trains_classifier=True, configured_teacher=True, aligns=False, has_bank=False,
               student_images=(1, 1, 0), teacher_images=(1, 1), unlabeled_bank=True, views_apart=True),
    # student: the first strong view; teacher: the weak view
    MethodSpec("isd", "simmatch.methods.isd", needs_labeled=False, needs_unlabeled=True,
               trains_classifier=False, configured_teacher=True, aligns=False, has_bank=False,
               student_images=(0, 1, 0), teacher_images=(0, 1)),
)}


def spec_of(name: str) -> MethodSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise NotImplementedError(f"method.name={name!r} is not available") from None
