"""The backbone shared by every network; only the D -> D body block differs by method.

::

    x0  = conv3x3_fp(cat[lms, pan])      C+1 -> D   (full precision)
    x   = block_N(... block_1(x0))                  (the binary body)
    x   = x + x0                                    (long skip)
    out = conv3x3_fp(x) + lms            D -> C     (full precision, global residual)

**Our choice** (``zero_init_tail``, default on, switch ``model.zero_init_tail``): the tail conv
starts at zero, so every method starts exactly at EXP (``out = lms``) and training can only
move it from there. Without it, the un-normalised ±1 features of BN-free binary bodies swamp
the residual at initialisation (validation PSNR of 2-9 dB after 12 steps on Landsat-8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bnnpan.models.layers import conv3x3


def check_inputs(lms: Tensor, pan: Tensor, in_channels: int) -> None:
    """ValueError unless ``lms`` is (B, in_channels, H, W) and ``pan`` (B, 1, H, W)."""
    if lms.ndim != 4 or pan.ndim != 4 or lms.shape[1] != in_channels or pan.shape[1] != 1 \
            or lms.shape[0] != pan.shape[0] or lms.shape[-2:] != pan.shape[-2:]:
        raise ValueError(f"expected lms (B, {in_channels}, H, W) and pan (B, 1, H, W), "
                         f"got {tuple(lms.shape)} and {tuple(pan.shape)}")


class PanBackbone(nn.Module):
    """``forward(lms (B, C, H, W), pan (B, 1, H, W)) -> (B, C, H, W)``; ``block_factory(width)`` builds one block."""

    def __init__(self, in_channels: int, width: int, depth: int, block_factory: Callable[[int], nn.Module],
                 zero_init_tail: bool = True) -> None:
        super().__init__()
        if in_channels < 1 or width < 1 or depth < 0:
            raise ValueError(f"PanBackbone: bad sizes in_channels={in_channels}, width={width}, depth={depth}")
        self.in_channels, self.width, self.depth = in_channels, width, depth
        self.head = conv3x3(in_channels + 1, width)
        self.body = nn.Sequential(*(block_factory(width) for _ in range(depth)))
        self.tail = conv3x3(width, in_channels)
        if zero_init_tail:
            nn.init.zeros_(self.tail.weight)
            if self.tail.bias is not None:
                nn.init.zeros_(self.tail.bias)

    def forward(self, lms: Tensor, pan: Tensor) -> Tensor:
        check_inputs(lms, pan, self.in_channels)
        x0 = self.head(torch.cat([lms, pan], dim=1))
        x = self.body(x0) + x0
        return self.tail(x) + lms
