"""Per-image statistics inside a network (means, variances, global average pooling) and their streamed form.

BNNPan's binary units re-centre and rescale by the per-image, per-channel mean and std of their input
(:class:`bnnpan.models.pibf.StatBinaryUnit`), CDC pools its input over the image, and the prior's encoder E2
ends in a global average pool. Such a network is not local: every output pixel depends on the whole image.
To fuse a scene larger than memory tile by tile (:mod:`bnnpan.deploy.fuse`) the statistics must be those of
the whole scene, so every such reduction goes through :func:`channel_moments`, which can be fed from outside:

* no context (training, ``evaluate``): the statistics of the tensor it is given;
* :func:`recording`: the same, and each point (module) is recorded in forward order with its statistics;
* :func:`streaming`: statistics of the points already known come from the context (the whole scene's); the
  first unknown point instead adds its input's **core** region (the pixels of the tile this window is for, on
  the point's own grid) to a running total and stops the forward pass (:class:`StopForward`). One pass over
  the tiles per point, in forward order, closes them all (:meth:`SceneStats.close`); the last pass fuses.

**Exactness.** The tiled result equals the single-pass one when each point's statistics are the same numbers.
Without autograd, the moments are computed in float64 and rounded to the input's dtype, both here (one
reduction) and streamed (float64 per-channel moments of each tile, merged with Chan, Golub & LeVeque's
pairwise update ``M = M_A + M_B + d^2 n_A n_B / n``, ``d = mean_B - mean_A``): the two float64 values differ
by ~1e-16 relative, so they round to the same float32 except in a tie (about 1e-8 per value). With autograd
(training) the float32 ``torch.var_mean`` is used, as before: results differ by float rounding only.

**Grid.** A point at ``stat_stride`` f (an attribute of the module; 1 by default: HaarDWT sub-bands 2, E2's
pooled map 16) sees feature ``g`` of the scene for input pixels ``[g f, (g + 1) f)`` when the window starts
on a multiple of f. The tile whose core holds PAN row ``g f`` owns feature row g: rows
``[ceil(C0 / f), ceil(C1 / f))`` for a core ``[C0, C1)``, which partitions the scene's
``ceil(H / f)`` rows among the tiles, as the single pass's padded maps have.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["SceneStats", "StopForward", "Window", "active", "channel_moments", "recording", "streaming"]


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by :func:`channel_moments` in a streaming pass once the pass's point has been accumulated."""


@dataclass(frozen=True)
class Window:
    """Where a network input lies in the scene (input pixels, half-open): its top-left ``origin`` and the ``core``
    ``(r0, r1, c0, c1)`` it is computed for (the rest is halo)."""

    origin: tuple[int, int]
    core: tuple[int, int, int, int]


def _moments(x: Tensor, var: bool) -> tuple[Tensor, Tensor | None]:
    """(mean, population variance or None) over H, W, shaped (B, C, 1, 1)."""
    if torch.is_grad_enabled() and x.requires_grad:
        if var:
            v, m = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
            return m, v
        return x.mean(dim=(2, 3), keepdim=True), None
    xd = x.double()
    m = xd.mean(dim=(2, 3), keepdim=True)
    if not var:
        return m.to(x.dtype), None
    # two passes (the mean, then the norm of the deviations): exact as var_mean's Welford, several times faster
    v = torch.linalg.vector_norm(xd - m, dim=(2, 3), keepdim=True).square_().div_(x.shape[2] * x.shape[3])
    return m.to(x.dtype), v.to(x.dtype)


@dataclass
class _Running:
    """Per-channel count, mean and sum of squared deviations in float64, merged tile by tile (Chan et al.)."""

    var: bool
    n: int = 0
    mean: Tensor | None = None
    m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        c = x.shape[1]
        xd = x.detach().double().transpose(0, 1).reshape(c, -1)
        nb = xd.shape[1]
        if nb == 0:
            return
        mb = xd.mean(dim=1)
        m2b = ((xd - mb[:, None]) ** 2).sum(dim=1) if self.var else torch.zeros_like(mb)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        d = mb - self.mean
        self.mean = self.mean + d * (nb / n)
        self.m2 = self.m2 + m2b + d * d * (self.n * nb / n)
        self.n = n

    def value(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor | None]:
        if self.n == 0:
            raise ValueError("no pixel was accumulated for a per-image statistic (empty cores?)")
        mean = self.mean.to(device=device, dtype=dtype)[None, :, None, None]
        if not self.var:
            return mean, None
        return mean, (self.m2 / self.n).to(device=device, dtype=dtype)[None, :, None, None]


@dataclass
class SceneStats:
    """The statistics of a whole scene, point by point, as streaming passes close them (see the module doc)."""

    known: list[tuple[Tensor, Tensor | None]] = field(default_factory=list)
    _running: _Running | None = None
    _like: tuple[torch.dtype, torch.device] | None = None

    @property
    def closed(self) -> int:
        """How many points (in forward order) are known."""
        return len(self.known)

    def close(self) -> None:
        """End a pass: the point it accumulated becomes known."""
        if self._running is None:
            raise RuntimeError("close(): this pass reached no unknown per-image statistic")
        self.known.append(self._running.value(*self._like))
        self._running, self._like = None, None


class _Context:
    def __init__(self, stats: SceneStats | None, window: Window | None, record: list | None,
                 capture: list | None = None) -> None:
        self.stats, self.window, self.record, self.capture = stats, window, record, capture
        self.index = 0
        self.seen: set[int] = set()

    def moments(self, module: nn.Module, x: Tensor, var: bool) -> tuple[Tensor, Tensor | None]:
        if id(module) in self.seen:
            raise RuntimeError(f"{type(module).__name__}: one module reduced twice in a forward pass; per-image "
                               "statistics cannot be streamed by module")
        self.seen.add(id(module))
        k, self.index = self.index, self.index + 1
        if self.record is not None:
            m, v = _moments(x, var)
            self.record.append((module, m, v, x.detach()))
            return m, v
        st = self.stats
        if k < st.closed:
            m, v = st.known[k]
            if (v is not None) == var and m.shape[1] == x.shape[1]:
                if self.capture is not None:
                    self.capture.append((module, x.detach()))
                return m, v
            raise RuntimeError(f"per-image statistic {k} ({type(module).__name__}) does not match the one streamed")
        if x.shape[0] != 1:
            raise ValueError("streamed per-image statistics need a batch of one image")
        if st._running is None:
            st._running, st._like = _Running(var), (x.dtype, x.device)
        st._running.add(self._core(module, x))
        raise StopForward

    def _core(self, module: nn.Module, x: Tensor) -> Tensor:
        f = int(getattr(module, "stat_stride", 1))
        (y0, x0), (r0, r1, c0, c1) = self.window.origin, self.window.core
        if y0 % f or x0 % f:
            raise ValueError(f"a window at ({y0}, {x0}) is not on the {f}-pixel grid of {type(module).__name__}")

        def span(a: int, b: int, o: int) -> slice:
            return slice(math.ceil(a / f) - o // f, math.ceil(b / f) - o // f)

        return x[..., span(r0, r1, y0), span(c0, c1, x0)]


_CTX: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("bnnpan_image_stats", default=None)


def active() -> bool:
    """Whether a :func:`recording` or :func:`streaming` context is open (the reductions must go through
    :func:`channel_moments`)."""
    return _CTX.get() is not None


def channel_moments(module: nn.Module, x: Tensor, var: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per-image, per-channel ``(mean, population variance or None)`` of ``x`` (B, C, H, W), each (B, C, 1, 1).

    ``module`` names the point (one reduction per module and forward pass); its ``stat_stride`` attribute is the
    input pixels per feature pixel at this point. Inside :func:`streaming` the values are the scene's.
    """
    ctx = _CTX.get()
    if ctx is None:
        return _moments(x, var)
    return ctx.moments(module, x, var)


@contextlib.contextmanager
def _using(ctx: _Context) -> Iterator[_Context]:
    token = _CTX.set(ctx)
    try:
        yield ctx
    finally:
        _CTX.reset(token)


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[nn.Module, Tensor, Tensor | None, Tensor]]]:
    """Record every point of the forward passes inside: ``(module, mean, var, input)`` in forward order."""
    record: list = []
    with _using(_Context(None, None, record)):
        yield record


@contextlib.contextmanager
def streaming(stats: SceneStats, window: Window, capture: list | None = None) -> Iterator[None]:
    """One network input (batch 1) at ``window`` of the scene: known points from ``stats``; the first unknown
    one accumulates its core into ``stats`` and raises :class:`StopForward` (caught here). ``capture``: a list
    that receives ``(module, input)`` of each known point (to see what a change of the input reaches)."""
    with _using(_Context(stats, window, None, capture)), contextlib.suppress(StopForward):
        yield
