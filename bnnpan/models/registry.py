"""A tiny explicit registry of fusion methods: name -> factory (no directory-scan magic).

Every method, classical or learned, is built by ``build_method(name, ctx)`` and exposes
``fuse(lms, pan, ms) -> hrms`` on one tile in DN (float64 NumPy arrays):

* ``lms``: (C, H, W) MS interpolated to the PAN grid (23-tap), the EXP image;
* ``pan``: (H, W);
* ``ms``: (C, H/ratio, W/ratio);
* returns (C, H, W).

Classical methods register themselves in :mod:`bnnpan.models.classical` through
:func:`register`; that module is imported explicitly below, so the list is static.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the data: sensor facts, never the ground truth."""

    sensor: str
    ratio: int
    ms_gains: tuple[float, ...]
    pan_gain: float
    scale: float
    bands: tuple[str, ...]


class Fuser(Protocol):
    name: str

    def fuse(self, lms: np.ndarray, pan: np.ndarray, ms: np.ndarray) -> np.ndarray: ...


Factory = Callable[[MethodContext], Fuser]
METHODS: dict[str, Factory] = {}
KIND: dict[str, str] = {}


def register(name: str, kind: str = "classical") -> Callable[[Factory], Factory]:
    """Decorator: register a factory under ``name`` (an error if the name is taken)."""

    def deco(factory: Factory) -> Factory:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = factory
        KIND[name] = kind
        return factory

    return deco


def build_method(name: str, ctx: MethodContext) -> Fuser:
    _load()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](ctx)


def known_methods() -> list[str]:
    _load()
    return sorted(METHODS)


def _load() -> None:
    # The explicit list of modules that register methods.
    from bnnpan.models import classical  # noqa: F401
