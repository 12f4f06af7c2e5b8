"""One-level orthonormal Haar DWT / IDWT of feature maps as fixed stride-2 depthwise convolutions.

The 2x2 kernels are built from ``pywt.Wavelet("haar")``'s reconstruction filters (the time-reversed analysis
filters, because ``F.conv2d`` is a cross-correlation), so for every channel the four outputs equal
``pywt.dwt2(x, "haar", mode="periodization")`` = (LL, (LH, HL, HH)) exactly (tested):

    LL = (a + b + c + d) / 2        a b    one 2x2 input block
    LH = (a + b - c - d) / 2        c d    (LH: low-pass along the width, high-pass along the height,
    HL = (a - b + c - d) / 2                pywt's "horizontal detail" cH; HL = cV; HH = cD)
    HH = (a - b - c + d) / 2

The four kernels are orthonormal, so the IDWT is the transposed convolution with the same kernels and
IDWT(DWT(x)) = x to float rounding (tested); by Parseval the sub-band energies sum to the input's.
Sub-bands are returned grouped by band, ``(B, 4C, H/2, W/2)`` = [LL (C) | LH (C) | HL (C) | HH (C)], so a
grouped convolution with ``groups=4`` applies one independent unit per sub-band. H and W must be even.
"""

from __future__ import annotations

import pywt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BANDS = ("LL", "LH", "HL", "HH")


def haar_kernels() -> Tensor:
    """(4, 2, 2) float64 kernels [LL, LH, HL, HH] for cross-correlation, from pywavelets' Haar filters."""
    w = pywt.Wavelet("haar")
    lo = torch.tensor(w.rec_lo, dtype=torch.float64)
    hi = torch.tensor(w.rec_hi, dtype=torch.float64)
    # outer(along height, along width)
    return torch.stack([torch.outer(lo, lo), torch.outer(hi, lo), torch.outer(lo, hi), torch.outer(hi, hi)])


class _Haar(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"Haar transform needs >= 1 channel, got {channels}")
        self.channels = channels
        # (4C, 1, 2, 2), channel-major: output 4c + k is band k of input channel c. A buffer, not a
        # parameter: the transform is fixed (and not stored in checkpoints).
        k = haar_kernels().to(torch.float32)
        self.register_buffer("weight", k.repeat(channels, 1, 1).unsqueeze(1), persistent=False)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class HaarDWT(_Haar):
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)`` grouped by band [LL | LH | HL | HH]; H, W even."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if c != self.channels or h % 2 or w % 2:
            raise ValueError(f"HaarDWT({self.channels}) needs (B, {self.channels}, even H, even W), "
                             f"got {tuple(x.shape)}")
        y = F.conv2d(x, self.weight.to(x.dtype), stride=2, groups=c)  # (B, 4C) channel-major
        return y.view(b, c, 4, h // 2, w // 2).transpose(1, 2).reshape(b, 4 * c, h // 2, w // 2)


class HaarIDWT(_Haar):
    """Inverse of :class:`HaarDWT`: ``(B, 4C, h, w)`` grouped by band -> ``(B, C, 2h, 2w)``."""

    def forward(self, y: Tensor) -> Tensor:
        b, c4, h, w = y.shape
        c = self.channels
        if c4 != 4 * c:
            raise ValueError(f"HaarIDWT({c}) needs (B, {4 * c}, h, w), got {tuple(y.shape)}")
        y = y.view(b, 4, c, h, w).transpose(1, 2).reshape(b, 4 * c, h, w)
        return F.conv_transpose2d(y, self.weight.to(y.dtype), stride=2, groups=c)
