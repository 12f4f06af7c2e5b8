"""Test helper: what every BinaryConv2d really passes to ``F.conv2d`` (its +-1 input and its weight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnpan.models.layers import BinaryConv2d


def recorded_binary_convs(model: nn.Module, run, monkeypatch: pytest.MonkeyPatch):
    """Run ``run()`` recording, for every BinaryConv2d call, what it passes to F.conv2d."""
    active: list[nn.Module] = []
    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    real = F.conv2d

    def recording(x, w, *args, **kwargs):
        if active:
            seen.append((active[-1], x.detach().clone(), w.detach().clone()))
        return real(x, w, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording)
    def enter(mod: nn.Module, inp: tuple) -> None:
        active.append(mod)

    def leave(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        active.pop()

    handles = []
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            handles.append(m.register_forward_pre_hook(enter))
            handles.append(m.register_forward_hook(leave))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen
