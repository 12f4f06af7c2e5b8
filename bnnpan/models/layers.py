"""The 1-bit conv (:class:`BinaryConv2d`), RPReLU, and one D -> D block per binarization method.

Every block keeps a full-precision identity shortcut around its single 3x3 binary conv; everything but the
conv itself (BatchNorm, RPReLU, scales, thresholds, XNOR's K map) is full precision. BatchNorm appears only
where the method's paper uses it (table "Baseline binarizers" of ``shared/design/method.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnpan.models import packed_runtime as packed
from bnnpan.models.binarizers import WeightBinarizer, make_binarizer


class BinaryConv2d(nn.Conv2d):
    """1-bit conv: ``forward(x) = F.conv2d(self.act(x), self.binary_weight(), self.bias, stride, padding, ...)``.

    ``act`` (activation binarizer) outputs exactly +-1; ``weight_binarizer`` maps the latent real ``weight`` to
    ``scale * sign`` (or ``sign``). ``act`` / ``weight`` are binarizer names (see ``binarizers.BINARIZERS``) or
    modules; ``act_kwargs`` / ``weight_kwargs`` go to their factories. No bias by default.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, bias: bool = False, *, act: str | nn.Module = "sign_ste",
                 weight: str | nn.Module = "mean_abs", act_kwargs: dict | None = None,
                 weight_kwargs: dict | None = None, **conv_kwargs) -> None:
        if padding is None:
            padding = kernel_size // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                         **conv_kwargs)
        self.act = act if isinstance(act, nn.Module) else make_binarizer(act, in_channels, **(act_kwargs or {}))
        wb = weight if isinstance(weight, nn.Module) else make_binarizer(weight, **(weight_kwargs or {}))
        if not isinstance(wb, WeightBinarizer):
            raise TypeError(f"BinaryConv2d: {type(wb).__name__} is not a weight binarizer")
        self.weight_binarizer = wb
        #: a :class:`bnnpan.models.packed_runtime.PackedConv` once converted (plain attribute, not state)
        self.packed_runtime = None

    def binary_weight(self) -> Tensor:
        """The weight used at forward time (``scale * sign(.)`` or ``sign(.)``), with its pseudo-gradient."""
        return self.weight_binarizer(self.weight)

    def weight_sign_and_scale(self) -> tuple[Tensor, Tensor | None]:
        """(sign +-1 shaped like ``weight``, scale (out, 1, 1, 1) or None); ``scale * sign == binary_weight()``."""
        return self.weight_binarizer.sign_and_scale(self.weight)

    def set_progress(self, p: float) -> None:
        """Training progress p in [0, 1], forwarded to the binarizers that use it (IR-Net's EDE)."""
        for m in (self.act, self.weight_binarizer):
            if hasattr(m, "set_progress"):
                m.set_progress(p)

    def forward(self, x: Tensor, binarized: bool = False) -> Tensor:
        """``binarized=True``: ``x`` is already ``act``'s +-1 output (a caller that fused the activation into its
        own pass, e.g. :class:`bnnpan.models.pibf.StatBinaryUnit` in training)."""
        if binarized:
            return self._conv_forward(x, self.binary_weight(), self.bias)
        if packed.can_run(self, x):  # eval-mode packed kernel: the same +-1 products, exact integer sums
            return packed.run_packed(self, x)
        return self._conv_forward(self.act(x), self.binary_weight(), self.bias)


class RPReLU(nn.Module):
    """ReActNet's RPReLU: PReLU_c(v - gamma_c) + zeta_c per channel (slope init 0.25, gamma = zeta = 0)."""

    def __init__(self, channels: int, init: float = 0.25) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.zeta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.prelu = nn.PReLU(channels, init=init)

    def forward(self, v: Tensor) -> Tensor:
        return self.prelu(v - self.gamma) + self.zeta


def conv3x3(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    """A full-precision 3x3 conv, padding 1."""
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


# ----------------------------------------------------------------------------------------------------------------
# blocks: D -> D, one binary 3x3 conv, FP identity shortcut
# ----------------------------------------------------------------------------------------------------------------
class FPBlock(nn.Module):
    """Full-precision upper bound, same shape as the binary blocks: x + RPReLU(conv3x3(x)) (no BN)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)
        self.act = RPReLU(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.conv(x))


class BNNBlock(nn.Module):
    """BNN (Hubara 2016): x + hardtanh(BN(binconv(x))), act sign / clipped STE, weights sign(W) (no scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = BinaryConv2d(channels, channels, act="sign_ste", weight="sign")
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.hardtanh(self.bn(self.conv(x)))


class XNORBlock(nn.Module):
    """XNOR-Net (Rastegari 2016): x + BN(K * binconv(x)), act sign / clipped STE, weights alpha sign(W).

    XNOR-Net approximates I * W ~ (sign(I) (*) sign(W)) . K alpha with A = mean_c |I| (B, 1, H, W) and
    K = A (*) k, k a w x h averaging kernel (Sec. 3.2, Fig. 2). So the conv sees exactly +-1 inputs and the per-pixel
    map K multiplies the conv OUTPUT (alpha is inside ``binary_weight()``). Our reading: K = avg_pool(A, window,
    stride 1, padding window//2, count_include_pad=False) (the kernel is the conv's own 3x3 window; borders
    average the valid pixels only); K is a differentiable FP function of x.
    """

    def __init__(self, channels: int, window: int = 3) -> None:
        super().__init__()
        self.window = int(window)
        self.conv = BinaryConv2d(channels, channels, act="sign_ste", weight="mean_abs")
        self.bn = nn.BatchNorm2d(channels)

    def k_map(self, x: Tensor) -> Tensor:
        a = x.abs().mean(1, keepdim=True)
        return F.avg_pool2d(a, self.window, stride=1, padding=self.window // 2, count_include_pad=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bn(self.conv(x) * self.k_map(x))


class BiRealBlock(nn.Module):
    """Bi-Real (Liu 2018): x + BN(binconv(x)), act sign / ApproxSign, weights mean|W| sign(W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = BinaryConv2d(channels, channels, act="approx_sign", weight="mean_abs")
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bn(self.conv(x))


class IRNetBlock(nn.Module):
    """IR-Net (Qin 2020): hardtanh(BN(binconv(x)) + x), act sign / EDE, weights Libra-PB (standardised, 2^s)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = BinaryConv2d(channels, channels, act="ede", weight="irnet_libra")
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.hardtanh(self.bn(self.conv(x)) + x)


class ReActBlock(nn.Module):
    """ReActNet (Liu 2020): RPReLU(BN(binconv(x)) + x), act RSign / ApproxSign, weights mean|W| sign(W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = BinaryConv2d(channels, channels, act="rsign", weight="mean_abs")
        self.bn = nn.BatchNorm2d(channels)
        self.act = RPReLU(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)) + x)


class BTMBlock(nn.Module):
    """BTM (Jiang 2021): RPReLU(x + res_scale * binconv(x)), no BN; act sign(x + b) / clipped STE, weights
    standardised then mean|.| sign. ``res_scale`` = 0.2 (the table's constant)."""

    def __init__(self, channels: int, res_scale: float = 0.2) -> None:
        super().__init__()
        self.res_scale = float(res_scale)
        self.conv = BinaryConv2d(channels, channels, act="learnable_bias_sign", act_kwargs={"backward": "ste"},
                                 weight="btm_standardize")
        self.act = RPReLU(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.res_scale * self.conv(x))


def bbcu_default_k(channels: int) -> float:
    """BBCU's residual-alignment factor: k = 130 at D = 64, scaled with the width (130 * D / 64)."""
    return 130.0 * channels / 64.0


class BBCUBlock(nn.Module):
    """BBCU (Xia 2023): x + RPReLU(binconv(k x)) / k, no BN; act sign(x + b) / ApproxSign, weights mean|W| sign(W).

    Residual alignment. BBCU multiplies the network input by k (~130 at D = 64) and divides the output by k, so
    the FP features h = k x live on the value range of the binary conv outputs and the identity shortcut is not
    swamped by them: h' = h + RPReLU(binconv(h)). Our reading implements it inside each block on the unscaled
    feature x: x' = h' / k = x + RPReLU(binconv(k x)) / k. This is exactly the network-level scheme (the head
    conv's output times k, the tail conv's input divided by k; the head/tail biases are learnable), and keeps the
    block a self-contained D -> D map. The conv input is still exactly +-1: sign(k x + b).
    """

    def __init__(self, channels: int, k: float | None = None) -> None:
        super().__init__()
        self.k = float(bbcu_default_k(channels) if k is None else k)
        if not self.k > 0:
            raise ValueError(f"BBCU residual-alignment factor k must be > 0, got {self.k}")
        self.conv = BinaryConv2d(channels, channels, act="learnable_bias_sign", act_kwargs={"backward": "approx"},
                                 weight="mean_abs")
        self.act = RPReLU(channels)

    def forward(self, x: Tensor) -> Tensor:
        if packed.can_run(self.conv, x):  # one kernel pass: sign(k x + b), XNOR-popcount, alpha, RPReLU, /k, + x
            return packed.run_packed(self.conv, x, pre_mul=self.k, rprelu=self.act, post_div=self.k, residual=x)
        return x + self.act(self.conv(x * self.k)) / self.k

    def extra_repr(self) -> str:
        return f"k={self.k:.4g}"


class BiSRBlock(nn.Module):
    """BiSRNet (Cai 2023): x + RPReLU(binconv(x)), act = redistribution k x + b then sign / d tanh(beta u)/du with
    learnable beta, weights mean|W| sign(W); no BN."""

    def __init__(self, channels: int, beta_init: float = 2.0) -> None:
        super().__init__()
        self.conv = BinaryConv2d(channels, channels, act="bisr_redistribute", act_kwargs={"beta_init": beta_init},
                                 weight="mean_abs")
        self.act = RPReLU(channels)

    def forward(self, x: Tensor) -> Tensor:
        if packed.can_run(self.conv, x):  # one kernel pass: sign(k x + b), XNOR-popcount, alpha, RPReLU, + x
            return packed.run_packed(self.conv, x, rprelu=self.act, residual=x)
        return x + self.act(self.conv(x))
