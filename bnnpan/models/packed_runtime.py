"""Packed 1-bit inference runtime: binary convs as XOR + popcount on 64-bit words (a C++ extension).

Why: a binarized network is only cheaper to run if its binary convs are run as bit operations; the float
simulation (``F.conv2d`` on +-1 tensors) costs as much as a full-precision conv plus the binarizers' elementwise
work. Here, in eval mode, every :class:`~bnnpan.models.layers.BinaryConv2d` converted by
:func:`to_packed_runtime` runs on :file:`csrc/binconv.cpp`:

* activations: the extension reads the FP input x and takes the sign of the binarizer's own pre-activation
  ``u = x * m_c + a_c`` (:func:`activation_affine`; the same IEEE operations in the same order, sign(0) = +1 as
  :func:`bnnpan.models.binarizers.sign`), packing 64 channels per word (bit 1 = -1);
* weights: ``weight_sign_and_scale()`` packed once (:class:`PackedConv`), repacked only if the weight changes
  (its ``_version`` counter);
* accumulation: ``dot = K - 2 popcount(a XOR w)``, exact integers; zero padding reproduced exactly (padded
  pixels are the all-zero word and each padded tap's ``popcount(w_tap) - ...`` is taken back out, see the C++
  file's header), so ``dot == F.conv2d(sign(u), sign(W), padding=p)`` bit for bit;
* epilogue in float: ``alpha_o * dot (+ bias_o)``, optionally RPReLU, a divisor and a residual add on the same
  output pass (BBCU and BiSRNet blocks use it: :func:`fused_block`).

The extension is JIT-compiled on first use (``torch.utils.cpp_extension.load`` with ninja, ``-O3 -march=native``)
into a per-user cache folder (``$BNNPAN_EXT_DIR``, else ``$XDG_CACHE_HOME/bnnpan/ext`` or ``~/.cache/bnnpan/ext``),
one sub-folder per torch version and CPU, so a shared home across machines does not mix ``-march=native`` builds.
When it cannot be built (no compiler, ...) or ``BNNPAN_PACKED=0``, :func:`available` is False, one warning is
logged, and every layer keeps the float path (the results agree to rounding).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnnpan.models import binarizers as B

log = logging.getLogger(__name__)

ENV_DISABLE = "BNNPAN_PACKED"  #: "0" / "false" / "off": never use the extension (the float fallback)
ENV_DIR = "BNNPAN_EXT_DIR"  #: where the compiled extension is cached
#: non-Python code this module runs (relative to it): the stages that import it depend on it (bnnpan/codedeps.py)
CODE_FILES = ("csrc/binconv.cpp",)
_SOURCE = Path(__file__).with_name("csrc") / "binconv.cpp"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]

_lock = threading.Lock()
_ext: Any = None
_failed: str | None = None
_suspended = threading.local()  # float_only(): per thread, so one thread's cost count does not slow another


def disabled_by_env() -> bool:
    """True when ``$BNNPAN_PACKED`` turns the extension off."""
    return os.environ.get(ENV_DISABLE, "1").strip().lower() in ("0", "false", "off", "no")


def _cpu_tag() -> str:
    """A short digest naming this CPU (model + flags) so that ``-march=native`` builds are never shared."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        text += "".join(lines)
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def build_dir() -> Path:
    """The per-user cache folder of the compiled extension (created)."""
    root = os.environ.get(ENV_DIR)
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bnnpan" / "ext"
    src = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:10]
    tag = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}-{_cpu_tag()}-{src}"
    d = base / tag
    d.mkdir(parents=True, exist_ok=True)
    return d


def _ninja_on_path() -> None:
    """torch's JIT build runs ``ninja`` from PATH; a venv used without activation has the ``ninja`` package's
    binary (a dependency) outside PATH, so put its folder there (only when no ninja is found)."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # the PyPI package: the binary and its folder
    except ImportError:
        return
    os.environ["PATH"] = str(ninja.BIN_DIR) + os.pathsep + os.environ.get("PATH", "")


def extension() -> Any | None:
    """The compiled extension, building it on first use; None when disabled or when it cannot be built."""
    global _ext, _failed
    if disabled_by_env():
        return None
    if _ext is not None or _failed is not None:
        return _ext
    with _lock:
        if _ext is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load

                _ninja_on_path()
                _ext = load(name="bnnpan_binconv", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                            extra_ldflags=["-fopenmp"], build_directory=str(build_dir()), verbose=False)
            except Exception as e:  # noqa: BLE001 - any build failure means: use the float path
                _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                log.warning("packed 1-bit kernels unavailable (%s); binary layers run as float convs", _failed)
    return _ext


def available() -> bool:
    """Whether binary layers can run on the packed kernels here (builds the extension on first call)."""
    return extension() is not None


# ----------------------------------------------------------------------------------------------------------------
# what the kernel needs from the modules
# ----------------------------------------------------------------------------------------------------------------
def _vec(t: Tensor, n: int) -> Tensor:
    return t.detach().reshape(-1).to(torch.float32).expand(n).contiguous()


def activation_affine(act: nn.Module, channels: int) -> tuple[Tensor | None, Tensor | None] | None:
    """The binarizer's pre-activation as ``u = x * mul (optional) + add (optional)``, or None if unknown.

    Each form repeats the binarizer's own float operations in its order (so sign(u) is bit-identical):
    sign_ste / approx_sign / ede: ``u = x``; rsign: ``x - a`` (= ``x + (-a)``: negation is exact);
    learnable_bias_sign: ``x + b``; bisr_redistribute: ``k * x + b`` (two roundings; the C++ never fuses them).
    """
    if isinstance(act, (B.SignSTE, B.ApproxSign, B.EDE)):
        return None, None
    if isinstance(act, B.RSign):
        return None, _vec(-act.a, channels)
    if isinstance(act, B.LearnableBiasSign):
        return None, _vec(act.b, channels)
    if isinstance(act, B.BiSRRedistribute):
        return _vec(act.k, channels), _vec(act.b, channels)
    return None


def pack_weight_signs(sign: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """``sign`` (O, Cg, kh, kw) exactly +-1 -> (words int64 (G, kh*kw, CWg, OgP), wcount int32 (O, kh*kw)).

    Bit ``c % 64`` of word ``c // 64`` is 1 where the sign is -1; output channels are padded to a multiple of 8
    (the kernel's vector width) with zero words; ``wcount[o, t]`` = number of -1 weights of filter o at tap t
    (what a zero-padded tap adds to the mismatch count).
    """
    o, cg, kh, kw = sign.shape
    g = groups
    og = o // g
    cwg = (cg + 63) // 64
    ogp = (og + 7) // 8 * 8
    neg = (sign < 0).reshape(o, cg, kh * kw).to(torch.int64)
    wcount = neg.sum(1).to(torch.int32).contiguous()
    neg = torch.nn.functional.pad(neg, (0, 0, 0, cwg * 64 - cg)).reshape(o, cwg, 64, kh * kw)
    words = torch.zeros(o, cwg, kh * kw, dtype=torch.int64)
    for bit in range(64):  # int64 shifts wrap at bit 63 exactly as uint64 would
        words |= neg[:, :, bit, :] << bit
    words = words.reshape(g, og, cwg, kh * kw).permute(0, 3, 2, 1)  # (G, taps, CWg, Og)
    words = torch.nn.functional.pad(words, (0, ogp - og)).contiguous()
    return words, wcount


class PackedConv:
    """The packed form of one :class:`BinaryConv2d`: sign words, tap counts, alpha (a plain object, not state).

    Built by :func:`to_packed_runtime`; ``supports(x)`` says whether an input can take the packed path.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        self.version: tuple[int, ...] = ()
        self.refresh(conv)

    @staticmethod
    def _version_of(conv: nn.Conv2d) -> tuple[int, ...]:
        ps = getattr(conv, "packed_scale", None)
        return (conv.weight._version, id(conv.weight), -1 if ps is None else ps._version, id(ps))

    def refresh(self, conv: nn.Conv2d) -> None:
        """(Re)pack the weight if it changed since the last packing."""
        v = self._version_of(conv)
        if v == self.version:
            return
        sign, scale = conv.weight_sign_and_scale()
        self.words, self.wcount = pack_weight_signs(sign.detach().cpu(), conv.groups)
        self.alpha = (torch.empty(0) if scale is None
                      else scale.detach().to("cpu", torch.float32).reshape(-1).contiguous())
        self.version = v

    def nbytes(self) -> int:
        """Bytes the packed weights hold in memory."""
        return self.words.numel() * 8 + self.wcount.numel() * 4 + self.alpha.numel() * 4


def eligible(conv: nn.Module) -> bool:
    """Whether the kernel implements this conv: stride 1, dilation 1, zero padding < kernel, a known binarizer."""
    if not callable(getattr(conv, "weight_sign_and_scale", None)) or not isinstance(conv, nn.Conv2d):
        return False
    kh, kw = conv.kernel_size
    pad = conv.padding
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and isinstance(pad, tuple) and pad[0] == pad[1] and 0 <= pad[0] < min(kh, kw)
            and activation_affine(conv.act, conv.in_channels) is not None)


def can_run(conv: nn.Module, x: Tensor) -> bool:
    """Whether ``conv`` takes the packed path on ``x`` now: converted, eval mode, CPU float32, and no gradient
    wanted (autograd off, or neither ``x`` nor the weight requires one: the kernel has no backward)."""
    return (getattr(conv, "packed_runtime", None) is not None and not conv.training and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.dim() == 4
            and (not torch.is_grad_enabled() or not (x.requires_grad or conv.weight.requires_grad))
            and _ext is not None and not getattr(_suspended, "depth", 0) and not disabled_by_env())


@contextlib.contextmanager
def float_only() -> Iterator[None]:
    """Within this block (this thread) every converted layer runs its float path: for code that must see the
    float model's own modules and ATen ops, e.g. the hook- and dispatch-based cost count (bnnpan.eval.cost)."""
    _suspended.depth = getattr(_suspended, "depth", 0) + 1
    try:
        yield
    finally:
        _suspended.depth -= 1


def _e() -> Tensor:
    return torch.empty(0)


def run_packed(conv: nn.Module, x: Tensor, *, pre_mul: float | None = None, scaled: bool = True,
               rprelu: nn.Module | None = None, post_div: float | None = None,
               residual: Tensor | None = None) -> Tensor:
    """``conv``'s output on the packed kernel (see the module doc), with an optional fused epilogue.

    ``pre_mul``: the conv's input is ``x * pre_mul`` (BBCU's residual alignment ``binconv(k x)``), multiplied in the
    kernel before the binarizer's own affine. ``scaled=False``: the raw integer dot products (no alpha, no bias),
    for exactness checks. ``rprelu`` (an :class:`~bnnpan.models.layers.RPReLU`), ``post_div``, ``residual``:
    ``out = residual + RPReLU(conv) / post_div``.
    """
    rt: PackedConv = conv.packed_runtime
    rt.refresh(conv)
    x = x.contiguous()
    c = x.shape[1]
    mul, add = activation_affine(conv.act, c)
    if pre_mul is not None:
        if mul is not None:
            raise ValueError("run_packed: pre_mul and a multiplicative binarizer cannot be fused")
        mul = torch.full((c,), float(pre_mul), dtype=torch.float32)
    alpha = rt.alpha if scaled else _e()
    bias = conv.bias.detach().float().contiguous() if (scaled and conv.bias is not None) else _e()
    g = s = z = _e()
    if rprelu is not None:
        o = conv.out_channels
        g, z = _vec(rprelu.gamma, o), _vec(rprelu.zeta, o)
        s = _vec(rprelu.prelu.weight, o)
    res = _e() if residual is None else residual.contiguous()
    kh, kw = conv.kernel_size
    return _ext.binconv(x, _e() if mul is None else mul, _e() if add is None else add, rt.words, rt.wcount,
                        conv.out_channels, conv.groups, kh, kw, conv.padding[0], alpha, bias, g, s, z,
                        -1.0 if post_div is None else float(post_div), res)


def to_packed_runtime(model: nn.Module) -> dict[str, Any]:
    """Convert ``model``'s binary convs to the packed runtime in place (eval mode uses it; training does not).

    Returns ``{"packed": n, "float": m, "available": bool, "reason": str | None}``: layers converted, binary layers
    left on the float path (unsupported shape or binarizer), and why nothing was converted. Idempotent.
    """
    binaries = [m for m in model.modules() if callable(getattr(m, "weight_sign_and_scale", None))
                and isinstance(m, nn.Conv2d)]
    if not binaries:
        return {"packed": 0, "float": 0, "available": available(), "reason": "no binary layers"}
    if not available():
        reason = f"disabled by ${ENV_DISABLE}" if disabled_by_env() else f"extension unavailable ({_failed})"
        return {"packed": 0, "float": len(binaries), "available": False, "reason": reason}
    n = 0
    for m in binaries:
        if eligible(m):
            if getattr(m, "packed_runtime", None) is None:
                m.packed_runtime = PackedConv(m)
            n += 1
    return {"packed": n, "float": len(binaries) - n, "available": True, "reason": None}


def to_float_runtime(model: nn.Module) -> nn.Module:
    """Undo :func:`to_packed_runtime` (every binary conv back on the float path); returns ``model``."""
    for m in model.modules():
        if getattr(m, "packed_runtime", None) is not None:
            m.packed_runtime = None
    return model


def packed_weight_bytes(model: nn.Module) -> int:
    """Bytes of the packed binary weights held by the converted layers."""
    return sum(m.packed_runtime.nbytes() for m in model.modules() if getattr(m, "packed_runtime", None) is not None)


RUNTIMES = ("packed", "float")


def apply_runtime(model: nn.Module, runtime: str) -> dict[str, Any]:
    """``runtime="packed"``: :func:`to_packed_runtime`; ``"float"``: :func:`to_float_runtime`. Returns the summary."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "float":
        to_float_runtime(model)
        # not available(): asking would compile the extension for a run that does not use it
        return {"packed": 0, "float": None, "available": None, "reason": "float runtime chosen"}
    return to_packed_runtime(model)
