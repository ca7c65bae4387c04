"""A method's card: everything the rest of the project knows about a method, declared by the method.

The config reads its section (`method.<name>.*`, the card's dataclass: each key with its valid
range) and its earlier flat key names; `derive` its quantities that follow the global batch
(`Scaled`); the recipe, the pre-flight and the memory check its lines and its banks; the engine
its facts (which streams it draws, which forwards normalise with batch statistics, how it is
evaluated). Outside simmatch/methods/ nothing names a method or one of its keys: it asks the
card. A card is torch-free, so the config, the recipe and tools/submit.py stay light; the
method's class (torch) is imported only when a run builds it (`module`).

A method registers its card with `register_card` and its class with `@register(name)`; the
built-in ones are packages of simmatch/methods/ (the card in `__init__.py`, the class in
`method.py`), and a method of one's own can be a single file doing both (CONTRIBUTING.md).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

SHUFFLE_BN = "ema_shuffle_bn"  # the teacher mode that runs in train mode on the batch's statistics

Rule = Literal["steps", "iterations", "momentum", "global_unlabeled_batches", "epochs"]


@dataclass(frozen=True)
class Scaled:
    """A key of the method's section whose value follows the global batch, and how:

    - `steps`: a count of steps of the reference batch (a queue of batch means): / k, rounded,
      at least 1 (k = global labeled batch / optim.base_batch under train.scale=per_gpu, else 1);
    - `iterations`: a point in the run in steps of the reference batch: / k, rounded (0 stays 0);
    - `momentum`: a per-step decay: ** k;
    - `global_unlabeled_batches`: a number of global unlabeled batches held (a bank): x the
      global unlabeled batch, in rows;
    - `epochs`: a number of epochs: x the steps per epoch, in iterations (needs the data).
    """

    key: str
    rule: Rule
    what: str  # how the recipe names it: "DA queue", "unlabeled bank"

    def at(self, value: float, step_scale: float, global_unlabeled: int) -> float | int:
        if self.rule == "steps":
            return max(1, round(value / step_scale))
        if self.rule == "iterations":
            return round(value / step_scale)
        if self.rule == "momentum":
            return value ** step_scale
        if self.rule == "global_unlabeled_batches":
            return int(value) * global_unlabeled
        raise ValueError(f"{self.key}: the {self.rule} rule needs the steps per epoch")


@dataclass(frozen=True)
class MethodCard:
    name: str
    config: type  # the dataclass of its section, method.<name>.*: every key with its range
    module: str | None  # imported to register its class when a run builds it (None: already registered)
    needs_labeled: bool
    needs_unlabeled: bool
    trains_classifier: bool  # False: evaluated by k-NN on the trunk's features
    configured_teacher: bool  # True: model.teacher makes its targets; False: an EMA only evaluated (eman)
    # images in the student's forward and in the teacher's (its BN batch), from the per-rank
    # labeled batch b, unlabeled batch bu and strong views s; None: the teacher makes no targets
    student_images: tuple[int, int, int] = (1, 0, 0)  # b, bu, s*bu multiples
    teacher_images: tuple[int, int] | None = None  # b, bu multiples
    views_apart: bool = False  # strong views after the first forwarded on their own (bu images each)
    scaled: tuple[Scaled, ...] = ()
    renamed: dict[str, str] = field(default_factory=dict)  # its flat keys of earlier versions -> its keys
    # optional hooks, each given the run's config, the method's section and its scaled values
    memory: Callable[[Any, Any, dict, int], dict[str, int]] | None = None  # (cfg, section, values, labeled)
    # -> lines, JSON entries; its values hold `num_labeled` too (None where unknown)
    recipe: Callable[[Any, Any, dict], tuple[list[str], dict]] | None = None
    validate: Callable[[Any, Any], None] | None = None  # relations between its keys and the run's (ConfigError)

    def teacher(self, cfg: Any) -> str:
        """The teacher mode this method trains with under `cfg`."""
        return str(cfg.model.teacher) if self.configured_teacher else "eman"

    def bn_batch(self, b: int, bu: int, strong: int, teacher: str) -> int:
        """Images in the smallest batch whose statistics BN normalises with, per rank: the
        student's forward, and a train-mode (shuffle-BN) teacher's; an eval-mode teacher (eman)
        uses its running statistics and does not count."""
        lab, unl, views = self.student_images
        sizes = [lab * b + unl * bu + views * strong * bu] + ([bu] if self.views_apart and strong > 1 else [])
        if self.teacher_images is not None and self.configured_teacher and teacher == SHUFFLE_BN:
            sizes.append(self.teacher_images[0] * b + self.teacher_images[1] * bu)
        return min(sizes)

    def defaults(self) -> Any:
        return self.config()

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]


CARDS: dict[str, MethodCard] = {}
CLASSES: dict[str, type] = {}


def register_card(card: MethodCard) -> MethodCard:
    """Make `method.name=<card.name>` known to the config, the recipe and the engine."""
    if card.name in CARDS and CARDS[card.name] is not card:
        raise ValueError(f"method {card.name!r} has a card already")
    CARDS[card.name] = card
    return card


def register(name: str) -> Callable[[type], type]:
    """Class decorator: the class that builds method `name` (its card must be registered first);
    the card is attached as `card`."""
    card = card_of(name)

    def add(cls: type) -> type:
        if name in CLASSES and CLASSES[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.card = card  # type: ignore[attr-defined]
        CLASSES[name] = cls
        return cls
    return add


def card_of(name: str) -> MethodCard:
    try:
        return CARDS[name]
    except KeyError:
        raise NotImplementedError(f"method.name={name!r} is not available (known: {', '.join(sorted(CARDS))})") \
            from None


def size_text(n: float) -> str:
    """Bytes in decimal units: '614.4 TB', '3.2 GB', '512 B'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


def labeled_bank_bytes(num_labeled: int, dim: int) -> int:
    """A labeled bank: one fp32 embedding of `dim` and one int64 class per labeled image."""
    return num_labeled * (dim * 4 + 8)
