"""Methods by name: `method.name` (a Literal in simmatch/config.py) -> the class that builds it."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")
METHODS: dict[str, type] = {}


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a Method subclass buildable as `method.name=<name>`."""
    def add(cls: T) -> T:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = cls
        return cls
    return add
