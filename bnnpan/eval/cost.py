"""Cost accounting of a fusion network, per layer, by forward hooks (BNN-paper convention).

:func:`count_cost` runs ONE forward pass (eval mode, no grad) on a (1, C, H, W) ``lms`` and a (1, 1, H, W) ``pan``
(uniform random values in [0, 1), fixed seed; the counts do not depend on the values), with forward hooks on the
modules, and records one row per module. The totals are sums of the rows, never a global divide.

Conventions (all counts are for ONE image of H x W, batch 1; "elements" = elements of the module's output):

* **Binary conv** (an ``nn.Conv2d`` exposing ``weight_sign_and_scale()``, i.e. ``BinaryConv2d``):
  ``MACs = out_elements * (in_channels / groups) * kh * kw``, counted as **BOPs** (1-bit multiply-accumulates).
  Its latent ``weight`` is a *binary param* (1 bit at inference). Its FP per-output-channel weight scale (when
  ``weight_sign_and_scale()`` returns one) and its bias each add 1 FLOP per output element. The weight binarizer
  (sign / scale / standardisation of ``W``) costs nothing: at inference it is done once, offline.
* **FP conv / linear** (any other ``nn.Conv*`` / ``nn.Linear``): the same MAC formula (transposed convs:
  ``in_elements * (out_channels / groups) * kh * kw``; linear: ``out_elements * in_features``) counted as
  **FLOPs** (1 MAC = 1 FLOP), plus 1 FLOP per output element for the bias.
* **Elementwise leaf modules** (norms, activations, the activation binarizer ``act`` of a binary conv, any other leaf
  module): **1 FLOP per output element**, whatever the formula (a BatchNorm at inference is a fused scale + shift;
  sign(x + b) is one compare). Pooling modules: ``out_elements * kernel area``; adaptive/global pooling:
  ``in_elements``. Pure data movement (Identity, Dropout, Flatten, PixelShuffle/Unshuffle, ChannelShuffle): 0.
* **Functional code** written in a non-leaf module's ``forward`` (residual additions, ``x * k``, RPReLU's
  ``v - gamma`` and ``+ zeta``, XNOR-Net's K map, ``F.hardtanh`` ...) is seen by a ``TorchDispatchMode`` during the
  same pass and charged to the innermost running module (kind ``functional``): 1 FLOP per output element of each
  ATen op; reductions (mean, sum, var, ...) 1 per input element; functional pooling ``out * kernel area``;
  functional conv / matmul their MACs as FLOPs; data movement (view, cat, pad, copy ...) 0. Ops run inside a
  counted module (above) are covered by that module's rule and not counted again.
* **Params**: ``binary_params`` = numel of the latent weights of binary convs; ``fp_params`` = every other
  ``nn.Parameter`` (biases, norms, RPReLU, scales, thresholds, first/last convs). Buffers (BN running statistics,
  fixed filters) are reported per row in ``buffers`` but are not params. A parameter shared by several modules is
  counted once (at the first module that owns it, binary convs first). Parameters of modules that do not run in the
  forward pass are still counted (they are stored).

Totals: ``params_equiv = binary_params / 32 + fp_params`` (equivalent FP32 params), ``bits = binary_params * 1 +
fp_params * 32``, ``bytes = bits / 8``, ``ops = bops / 64 + flops``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROW_COLUMNS = ("name", "type", "kind", "calls", "out_elements", "binary_params", "fp_params", "buffers",
               "macs", "bops", "flops", "ops")
TABLE_COLUMNS = ("method", "size", "binary_params", "fp_params", "params_equiv", "bits", "bytes",
                 "bops", "flops", "ops")
SEED = 0

_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_MOVE = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten,
         nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.LPPool1d, nn.LPPool2d)
_ADAPTIVE_POOL = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                  nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ACT_HINTS = ("relu", "sign", "tanh", "sigmoid", "act", "binar", "elu", "swish", "gelu", "softmax")

# ATen ops (overload packet names, a trailing "_" of in-place variants stripped) that only move or create data.
_FREE_OPS = frozenset("""
view _unsafe_view reshape _reshape_alias expand expand_as permute transpose t contiguous clone cat stack slice select
squeeze unsqueeze split split_with_sizes chunk unbind constant_pad_nd pad reflection_pad1d reflection_pad2d
reflection_pad3d replication_pad1d replication_pad2d replication_pad3d detach alias _to_copy copy to empty
empty_like empty_strided zeros zeros_like ones ones_like full full_like fill zero new_empty new_empty_strided
new_zeros new_ones new_full lift_fresh lift_fresh_copy as_strided flatten unflatten pixel_shuffle pixel_unshuffle
narrow repeat index_select gather scalar_tensor arange _local_scalar_dense item set_ resize
""".split())
_REDUCE_OPS = frozenset("""
mean sum var std var_mean std_mean amax amin max min norm linalg_vector_norm prod logsumexp _adaptive_avg_pool2d
_adaptive_avg_pool3d adaptive_avg_pool1d adaptive_max_pool2d adaptive_max_pool1d adaptive_max_pool3d
""".split())
_POOL_OPS = frozenset("avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d "
                      "max_pool2d_with_indices max_pool3d_with_indices".split())
_MM_OPS = frozenset("mm addmm bmm baddbmm matmul linear".split())


def is_binary_conv(module: nn.Module) -> bool:
    """A 1-bit conv in the sense of the contract: an ``nn.Conv2d`` exposing ``weight_sign_and_scale()``."""
    return isinstance(module, nn.Conv2d) and callable(getattr(module, "weight_sign_and_scale", None))


def _kind(module: nn.Module) -> str:
    if is_binary_conv(module):
        return "binary_conv"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "fp_conv"
    if isinstance(module, nn.Linear | nn.Bilinear):
        return "linear"
    if isinstance(module, _NORM):
        return "norm"
    cls = type(module)
    name = cls.__name__.lower()
    if cls.__module__ == "torch.nn.modules.activation" or cls.__module__.endswith("binarizers") or any(
        h in name for h in _ACT_HINTS
    ):
        return "activation"
    if "norm" in name:
        return "norm"
    return "other"


def _numel(obj: Any) -> int:
    """Total number of elements of the tensors in a (possibly nested) module output."""
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, Mapping):
        return sum(_numel(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_numel(v) for v in obj)
    return 0


def _area(k: Any) -> int:
    return int(k) if isinstance(k, int) else math.prod(int(v) for v in k)


@dataclass
class CostReport:
    """Per-layer rows (``rows``, one per module with params or ops, columns :data:`ROW_COLUMNS`) and their totals."""

    rows: pd.DataFrame
    in_channels: int
    height: int
    width: int
    binary_params: int = 0
    fp_params: int = 0
    bops: int = 0
    flops: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params_equiv(self) -> float:
        """Equivalent FP32 params: binary / 32 + FP."""
        return self.binary_params / 32 + self.fp_params

    @property
    def bits(self) -> int:
        return self.binary_params + 32 * self.fp_params

    @property
    def bytes(self) -> float:
        return self.bits / 8

    @property
    def ops(self) -> float:
        """BOPs / 64 + FLOPs."""
        return self.bops / 64 + self.flops

    def totals(self) -> dict[str, Any]:
        return {"size": f"{self.height}x{self.width}", "binary_params": self.binary_params,
                "fp_params": self.fp_params, "params_equiv": self.params_equiv, "bits": self.bits,
                "bytes": self.bytes, "bops": self.bops, "flops": self.flops, "ops": self.ops}

    def by_kind(self) -> pd.DataFrame:
        """The rows summed per kind (binary_conv, fp_conv, norm, activation, functional, ...)."""
        cols = ["binary_params", "fp_params", "macs", "bops", "flops", "ops"]
        return self.rows.groupby("kind")[cols].sum()

    def __str__(self) -> str:
        t = self.totals()
        return (f"CostReport(C={self.in_channels}, {t['size']}: binary={t['binary_params']}, fp={t['fp_params']}, "
                f"params_equiv={t['params_equiv']:.1f}, bytes={t['bytes']:.0f}, BOPs={t['bops']:.4g}, "
                f"FLOPs={t['flops']:.4g}, OPs={t['ops']:.4g})")


def _owned_params(model: nn.Module) -> dict[str, dict[str, int]]:
    """name -> {"binary_params", "fp_params", "buffers"}: each parameter counted once, binary convs first."""
    seen: set[int] = set()
    owned: dict[str, dict[str, int]] = {}
    modules = list(model.named_modules())
    # Binary convs claim their latent weight first, so a weight shared with an FP module stays binary.
    order = [m for m in modules if is_binary_conv(m[1])] + [m for m in modules if not is_binary_conv(m[1])]
    for name, mod in order:
        counts = owned.setdefault(name, {"binary_params": 0, "fp_params": 0, "buffers": 0})
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = "binary_params" if is_binary_conv(mod) and pname == "weight" else "fp_params"
            counts[key] += p.numel()
        for b in mod.buffers(recurse=False):
            if id(b) in seen or not b.is_floating_point():
                continue
            seen.add(id(b))
            counts["buffers"] += b.numel()
    return owned


def _roles(model: nn.Module) -> dict[int, str]:
    """id(module) -> "formula" (counted by its own rule), "ignored" (inside a formula module) or "functional"."""
    roles: dict[int, str] = {}

    def mark_subtree(mod: nn.Module, role: str) -> None:
        for m in mod.modules():
            roles.setdefault(id(m), role)

    for mod in model.modules():
        if is_binary_conv(mod):
            roles[id(mod)] = "formula"
            act = getattr(mod, "act", None)
            if isinstance(act, nn.Module):
                roles[id(act)] = "formula"
                for m in act.modules():
                    if m is not act:
                        roles.setdefault(id(m), "ignored")
            for m in mod.modules():  # the weight binarizer and anything else: offline at inference
                roles.setdefault(id(m), "ignored")
    for mod in model.modules():
        if id(mod) in roles:
            continue
        if next(mod.children(), None) is None:
            roles[id(mod)] = "formula"
        else:
            roles[id(mod)] = "functional"
    # descendants of a formula module that were not classified by a binary conv are covered by its rule
    for mod in model.modules():
        if roles[id(mod)] == "formula":
            for m in mod.modules():
                if m is not mod and roles.get(id(m)) == "functional":
                    mark_subtree(m, "ignored")
    return roles


def _formula_ops(mod: nn.Module, kind: str, has_scale: bool, inputs: tuple, output: Any) -> tuple[int, int, int]:
    """(MACs, BOPs, FLOPs) of one call of a module counted by its own rule."""
    out_el = _numel(output)
    in_el = _numel(inputs[0]) if inputs else 0
    bias = 1 if isinstance(getattr(mod, "bias", None), torch.Tensor) else 0
    if kind == "binary_conv":
        macs = out_el * (mod.in_channels // mod.groups) * _area(mod.kernel_size)
        return macs, macs, out_el * (bias + int(has_scale))
    if kind == "fp_conv":
        if isinstance(mod, nn.modules.conv._ConvTransposeNd):
            macs = in_el * (mod.out_channels // mod.groups) * _area(mod.kernel_size)
        else:
            macs = out_el * (mod.in_channels // mod.groups) * _area(mod.kernel_size)
        return macs, 0, macs + out_el * bias
    if kind == "linear":
        in_features = mod.in1_features * mod.in2_features if isinstance(mod, nn.Bilinear) else mod.in_features
        macs = out_el * in_features
        return macs, 0, macs + out_el * bias
    if isinstance(mod, _MOVE):
        return 0, 0, 0
    if isinstance(mod, _POOL):
        return 0, 0, out_el * _area(mod.kernel_size)
    if isinstance(mod, _ADAPTIVE_POOL):
        return 0, 0, in_el
    return 0, 0, out_el  # norms, activations, binarizers, scales, other elementwise modules: 1 FLOP per element


def _aten_ops(func: Any, args: tuple, out: Any) -> tuple[int, int]:
    """(MACs, FLOPs) of one ATen op in functional code (see the module docstring)."""
    name = func.overloadpacket.__name__
    base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    if base in _FREE_OPS:
        return 0, 0
    out_el = _numel(out[0] if isinstance(out, tuple | list) and out else out)
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if base == "convolution" and len(args) >= 7:
        w = args[1]
        k = w.shape[1] * math.prod(w.shape[2:])  # (in/groups) * kernel for a conv, (out/groups) * kernel transposed
        macs = (_numel(first) if args[6] else out_el) * k
        return macs, macs + (out_el if isinstance(args[2], torch.Tensor) else 0)
    if base in _MM_OPS:
        a = args[1] if base in ("addmm", "baddbmm") else args[0]
        macs = out_el * int(a.shape[-1])
        return macs, macs
    if base in _POOL_OPS:
        return 0, out_el * _area(args[1])
    if base in _REDUCE_OPS:
        return 0, _numel(first)
    return 0, out_el


class _FunctionalCounter(TorchDispatchMode):
    """Charges every ATen op run outside counted modules to the innermost running module."""

    def __init__(self, stack: list[nn.Module], roles: dict[int, str], acc: dict[int, dict[str, int]]) -> None:
        super().__init__()
        self.stack, self.roles, self.acc = stack, roles, acc

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack and all(self.roles.get(id(m)) == "functional" for m in self.stack):
            macs, flops = _aten_ops(func, args, out)
            a = self.acc[id(self.stack[-1])]
            a["macs"] += macs
            a["flops"] += flops
        return out


def _without_dynamo_import(mode: type[TorchDispatchMode]) -> None:
    """Let ``mode``'s ``__torch_dispatch__`` run without importing ``torch._dynamo``.

    torch wraps every dispatch mode's ``__torch_dispatch__`` so that ``torch.compile`` does not trace it; the
    wrapper imports ``torch._dynamo`` (sympy and the compiler: ~3 s, more than the whole count) on its first
    call, to build a "disabled" copy of the function, and caches that copy on the function. Nothing here is
    compiled, so the function itself serves as its own disabled copy. If torch changes the mechanism the
    attributes are absent and torch simply imports as before.
    """
    wrapped = getattr(mode.__dict__.get("__torch_dispatch__"), "__wrapped__", None)
    if wrapped is not None and getattr(wrapped, "__dynamo_disable", None) is None:
        setattr(wrapped, "__dynamo_disable", wrapped)


_without_dynamo_import(_FunctionalCounter)


def count_cost(model: nn.Module, in_channels: int, height: int, width: int, device: str | torch.device = "cpu",
               ) -> CostReport:
    """Count params, BOPs and FLOPs of ``model`` for one (1, C, H, W) input, per layer (see the module docstring).

    The model must already live on ``device``; it is put in eval mode for the pass (BN running statistics are
    not touched) and its training flag is restored afterwards. Forward signature: ``model(lms, pan)``, or
    ``model(lms, pan, gt)`` for a model with ``needs_reference`` (the oracle prior).
    """
    from bnnpan.models.packed_runtime import float_only

    with float_only():  # a packed-runtime model counts as the float model it equals (hooks see every module)
        return _count_cost(model, in_channels, height, width, device)


def _count_cost(model: nn.Module, in_channels: int, height: int, width: int, device: str | torch.device
                ) -> CostReport:
    owned = _owned_params(model)
    roles = _roles(model)
    named = list(model.named_modules())
    acc = {id(m): {"calls": 0, "out_elements": 0, "macs": 0, "bops": 0, "flops": 0} for _, m in named}
    stack: list[nn.Module] = []
    handles = []
    for _, mod in named:
        kind = _kind(mod)
        has_scale = False
        if kind == "binary_conv":
            with torch.no_grad():
                has_scale = mod.weight_sign_and_scale()[1] is not None

        def pre(m: nn.Module, inputs: tuple) -> None:
            stack.append(m)

        def post(m: nn.Module, inputs: tuple, output: Any, kind: str = kind, has_scale: bool = has_scale) -> None:
            stack.pop()
            a = acc[id(m)]
            a["calls"] += 1
            a["out_elements"] += _numel(output)
            if roles[id(m)] == "formula":
                macs, bops, flops = _formula_ops(m, kind, has_scale, inputs, output)
                a["macs"] += macs
                a["bops"] += bops
                a["flops"] += flops

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))

    was_training = model.training
    gen = torch.Generator().manual_seed(SEED)
    lms = torch.rand((1, in_channels, height, width), generator=gen).to(device)
    pan = torch.rand((1, 1, height, width), generator=gen).to(device)
    # A model that needs the reference at inference (BNNPan's oracle-prior ablation) gets a random one.
    ref = (torch.rand((1, in_channels, height, width), generator=gen).to(device),) \
        if getattr(model, "needs_reference", False) else ()
    try:
        model.eval()
        with torch.no_grad(), _FunctionalCounter(stack, roles, acc):
            model(lms, pan, *ref)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    rows = []
    for name, mod in named:
        params = owned.get(name, {"binary_params": 0, "fp_params": 0, "buffers": 0})
        a = acc[id(mod)]
        role = roles[id(mod)]
        if role != "formula" and not any(params.values()) and not a["flops"]:
            continue
        kind = _kind(mod) if role == "formula" else ("internal" if role == "ignored" else "functional")
        rows.append({"name": name or "<root>", "type": type(mod).__name__, "kind": kind, **a, **params,
                     "ops": a["bops"] / 64 + a["flops"]})
    df = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    return CostReport(rows=df, in_channels=in_channels, height=height, width=width,
                      binary_params=int(df["binary_params"].sum()), fp_params=int(df["fp_params"].sum()),
                      bops=int(df["bops"].sum()), flops=int(df["flops"].sum()))


def cost_table(models: Mapping[str, nn.Module], in_channels: int,
               sizes: Iterable[tuple[int, int]] = ((64, 64), (256, 256)), device: str | torch.device = "cpu",
               ) -> pd.DataFrame:
    """One row per method per input size, columns :data:`TABLE_COLUMNS` (size as ``"HxW"``)."""
    rows = []
    for method, model in models.items():
        for h, w in sizes:
            rows.append({"method": method, **count_cost(model, in_channels, h, w, device=device).totals()})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
