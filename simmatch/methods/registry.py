"""Methods by name: `method.name` -> the class that builds it, with its facts (spec.py) attached."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from simmatch.methods.spec import spec_of

T = TypeVar("T")
METHODS: dict[str, type] = {}


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a Method subclass buildable as `method.name=<name>`; the class's
    `spec` (streams, teacher, evaluation) is the one of simmatch/methods/spec.py."""
    spec = spec_of(name)  # a method without facts is refused at import

    def add(cls: T) -> T:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.spec = spec  # type: ignore[attr-defined]
        METHODS[name] = cls
        return cls
    return add
