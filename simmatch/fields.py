"""A config field and its valid range: every numeric key carries its interval on the field itself
(`num(default, Range)`), so a key cannot be added without one. The run's sections
(simmatch/config/schema.py) and each method's own section (its card, simmatch/methods/) are
built from these. No torch, and nothing of the project: the bottom layer.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Range:
    """The valid interval of a numeric field (of each item, for a list); never NaN or inf."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        hi = "inf)" if math.isinf(self.hi) else f"{self.hi:g}{')' if self.hi_open else ']'}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {hi}"


def at_least(lo: float) -> Range:
    return Range(lo)


def above(lo: float) -> Range:
    return Range(lo, lo_open=True)


UNIT = Range(0.0, 1.0)
COUNT = at_least(1)  # a positive integer
NONNEG = at_least(0)


def num(default: Any, valid: Range, factory: typing.Callable[[], Any] | None = None) -> Any:
    """A numeric field (or list of numbers, with `factory`) and its valid range."""
    if factory is not None:
        return field(default_factory=factory, metadata={"range": valid})
    return field(default=default, metadata={"range": valid})
