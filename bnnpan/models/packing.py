"""Packed 1-bit export of a binarized network, and inference from it.

File format (ONE ``torch.save`` file holding only tensors and plain Python types, so it is read back with
``torch.load(path, weights_only=True)``; written to a temporary file in the same folder, fsync-ed, then renamed):

* ``bits``: uint8, the sign bits of every binary conv (``BinaryConv2d``), ``np.packbits(sign > 0)`` of the flattened
  weight (big-endian bit order, +1 -> 1, -1 -> 0), 8 weights per byte, layers concatenated (each starting on a byte);
* ``scales``: float32, the per-output-channel weight scales of the binary convs (``weight_sign_and_scale()``),
  concatenated; a layer whose binary weight is plain ``sign(W)`` stores none;
* ``fp``: float32, every other floating parameter and buffer of the state dict, flattened and concatenated;
* ``other``: non-floating buffers as they are (e.g. BatchNorm's int64 ``num_batches_tracked``);
* ``binary`` / ``fp_index``: plain lists of dicts (name, shape, offsets) indexing the three flat tensors;
* ``sha256``: digest of the three flat tensors' bytes, checked on load (a tampered or truncated file is rejected).

Flat tensors keep the container overhead (one zip record per tensor) out of the size comparison.

Loading (:func:`load_packed`) needs an identically built model. The latent real weights are gone after export:
each binary conv's ``weight`` becomes ``sign`` (so ``sign(W)`` is unchanged) and its ``binary_weight()`` /
``weight_sign_and_scale()`` are overridden ON THE INSTANCE to return the stored ``packed_scale * sign`` (the scale a
layer would otherwise recompute from ``W``, e.g. mean|W| or IR-Net's standardisation, no longer exists). The scale
lives in a non-persistent buffer ``packed_scale`` (it follows ``.to(device)``; the state-dict keys are unchanged).
The loaded model is for inference: its ``binary_weight()`` has no gradient path to a latent weight.

Two file formats share the packing code here: :func:`pack_model` turns a model into a :class:`PackedModel` (per
layer: sign bits, scale, FP32 tensors) and :func:`unpack_into` loads one into an identically built model. This
module's ``torch.save`` format concatenates the pieces (above; its size is the ``network_cost.file`` figure of
every network's metrics.json, :func:`bnnpan.eval.evaluate.network_cost`, so its bytes must not change);
:mod:`bnnpan.deploy.export` stores them one tensor each in a self-describing safetensors file.
"""

from __future__ import annotations

import hashlib
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bnnpan.atomic import write_with

FORMAT = "bnnpan-packed-1bit"
VERSION = 1


class PackedFileError(ValueError):
    """A packed file that cannot be read, is corrupted, or does not match the model."""


def _binary_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> binary conv (an ``nn.Conv2d`` exposing ``weight_sign_and_scale()``), in module order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and callable(getattr(m, "weight_sign_and_scale", None))}


def _weight_key(name: str) -> str:
    return f"{name}.weight" if name else "weight"


def _digest(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _pack_bits(sign: Tensor) -> Tensor:
    if not bool(((sign == 1) | (sign == -1)).all()):
        raise ValueError("weight_sign_and_scale() returned a sign tensor that is not exactly +-1")
    bits = np.packbits(sign.detach().reshape(-1).cpu().numpy() > 0)
    return torch.from_numpy(bits)


def _unpack_bits(bits: Tensor, numel: int, shape: list[int]) -> Tensor:
    flat = np.unpackbits(bits.numpy(), count=numel).astype(np.float32) * 2.0 - 1.0
    return torch.from_numpy(flat).reshape(shape)


@dataclass
class PackedLayer:
    """One binary conv, packed: the sign bits of its weight and its per-output-channel scale."""

    name: str  #: module name (its weight is the state-dict entry ``<name>.weight``)
    shape: list[int]  #: the weight's shape
    bits: Tensor  #: uint8, ``np.packbits(sign > 0)`` of the flattened weight (see the module docstring)
    scale: Tensor | None  #: float32 (the layer's shape for it), or None for a plain ``sign(W)`` layer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class PackedModel:
    """A whole model packed: its binary convs (module order) and the rest of its state dict."""

    binary: list[PackedLayer] = field(default_factory=list)
    fp: dict[str, Tensor] = field(default_factory=dict)  #: every other floating tensor, as float32, state-dict order
    other: dict[str, Tensor] = field(default_factory=dict)  #: non-floating buffers as they are (state-dict order)


def pack_model(model: nn.Module) -> PackedModel:
    """``model`` packed (on the CPU, copies): sign bits 8 per byte + FP32 scales for the binary convs, FP32 rest."""
    binaries = _binary_modules(model)
    skip = {_weight_key(n) for n in binaries}
    out = PackedModel()
    with torch.no_grad():
        for name, mod in binaries.items():
            sign, scale = mod.weight_sign_and_scale()
            if tuple(sign.shape) != tuple(mod.weight.shape):
                raise ValueError(f"{name}: sign shape {tuple(sign.shape)} != weight shape {tuple(mod.weight.shape)}")
            out.binary.append(PackedLayer(
                name=name, shape=list(sign.shape), bits=_pack_bits(sign),
                scale=None if scale is None else scale.detach().to("cpu", torch.float32).clone()))
        for key, t in model.state_dict().items():
            if key in skip:
                continue
            if t.is_floating_point():
                out.fp[key] = t.detach().to("cpu", torch.float32).clone()
            else:
                out.other[key] = t.detach().cpu().clone()
    return out


def pack_state(model: nn.Module) -> dict[str, Any]:
    """The packed payload of ``model`` (see the module docstring); :func:`export_packed` saves it."""
    packed = pack_model(model)
    bits_parts: list[Tensor] = []
    scale_parts: list[Tensor] = []
    binary_index: list[dict[str, Any]] = []
    byte_off = scale_off = 0
    for layer in packed.binary:
        entry: dict[str, Any] = {"name": layer.name, "shape": list(layer.shape), "numel": layer.numel,
                                 "byte_offset": byte_off, "nbytes": layer.bits.numel(),
                                 "scale_offset": None, "scale_shape": None}
        bits_parts.append(layer.bits)
        byte_off += layer.bits.numel()
        if layer.scale is not None:
            s = layer.scale.reshape(-1)
            entry.update(scale_offset=scale_off, scale_shape=list(layer.scale.shape))
            scale_parts.append(s)
            scale_off += s.numel()
        binary_index.append(entry)

    fp_parts: list[Tensor] = []
    fp_index: list[dict[str, Any]] = []
    off = 0
    for key, t in packed.fp.items():
        flat = t.reshape(-1)
        fp_index.append({"key": key, "shape": list(t.shape), "offset": off})
        fp_parts.append(flat)
        off += flat.numel()

    bits = torch.cat(bits_parts) if bits_parts else torch.zeros(0, dtype=torch.uint8)
    scales = torch.cat(scale_parts) if scale_parts else torch.zeros(0, dtype=torch.float32)
    fp = torch.cat(fp_parts) if fp_parts else torch.zeros(0, dtype=torch.float32)
    return {"format": FORMAT, "version": VERSION, "bits": bits, "scales": scales, "fp": fp, "other": packed.other,
            "binary": binary_index, "fp_index": fp_index, "sha256": _digest(bits, scales, fp),
            "torch_version": str(torch.__version__)}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    write_with(path, lambda f: torch.save(obj, f))


def export_packed(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` packed (sign bits 8 per byte + FP32 rest) to ``path`` atomically; returns the path."""
    path = Path(path)
    _atomic_torch_save(pack_state(model), path)
    return path


def _read_packed(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means an unreadable file; say which
        size = path.stat().st_size if path.is_file() else "missing"
        raise PackedFileError(f"cannot read packed model file {path} ({size} bytes; truncated, corrupted or not a "
                              f"torch.save file): {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise PackedFileError(f"{path} is not a {FORMAT!r} file")
    if obj.get("version") != VERSION:
        raise PackedFileError(f"{path}: unsupported packed format version {obj.get('version')!r}")
    for key, dtype in (("bits", torch.uint8), ("scales", torch.float32), ("fp", torch.float32)):
        if not isinstance(obj.get(key), Tensor) or obj[key].dtype != dtype:
            raise PackedFileError(f"{path}: field {key!r} missing or not a {dtype} tensor")
    if _digest(obj["bits"], obj["scales"], obj["fp"]) != obj.get("sha256"):
        raise PackedFileError(f"{path}: checksum mismatch, the packed file is corrupted")
    return obj


def _packed_binary_weight(self: nn.Module) -> Tensor:
    return self.weight if self.packed_scale is None else self.packed_scale * self.weight


def _packed_sign_and_scale(self: nn.Module) -> tuple[Tensor, Tensor | None]:
    return self.weight, self.packed_scale


def unpack_into(model: nn.Module, packed: PackedModel, where: str | os.PathLike) -> nn.Module:
    """Load ``packed`` into an identically built ``model`` (in place; also returned), ready for inference.

    ``where`` (the file) starts every error message. Each binary conv's weight becomes its sign and its
    ``binary_weight()`` / ``weight_sign_and_scale()`` return the stored scale times it (module docstring).
    """
    binaries = _binary_modules(model)
    names = [layer.name for layer in packed.binary]
    if names != list(binaries):
        raise PackedFileError(f"{where}: binary layers {names} do not match the model's {list(binaries)}")
    state: dict[str, Tensor] = {}
    scales: dict[str, Tensor | None] = {}
    for layer in packed.binary:
        if layer.bits.dtype != torch.uint8 or layer.bits.dim() != 1 or layer.bits.numel() != math.ceil(
                layer.numel / 8):
            raise PackedFileError(f"{where}: bit field of {layer.name!r} is out of range")
        state[_weight_key(layer.name)] = _unpack_bits(layer.bits, layer.numel, layer.shape)
        scales[layer.name] = None if layer.scale is None else layer.scale.clone()
    state.update(packed.fp)
    state.update(packed.other)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # torch's text spans several lines; one line names the file
        raise PackedFileError(f"{where} does not match the model: {' '.join(str(e).split())}") from e
    for name, mod in binaries.items():
        scale = scales[name]
        if scale is not None:
            scale = scale.to(device=mod.weight.device, dtype=mod.weight.dtype)
        if "packed_scale" in mod._buffers:
            mod._buffers["packed_scale"] = scale
        else:
            mod.register_buffer("packed_scale", scale, persistent=False)
        mod.binary_weight = types.MethodType(_packed_binary_weight, mod)
        mod.weight_sign_and_scale = types.MethodType(_packed_sign_and_scale, mod)
    return model


def load_packed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a packed file into an identically built ``model`` (in place; also returned), ready for inference."""
    path = Path(path)
    obj = _read_packed(path)
    bits, fp, sc = obj["bits"], obj["fp"], obj["scales"]
    packed = PackedModel(other=dict(obj["other"]))
    try:
        for e in obj["binary"]:
            numel, nbytes = int(e["numel"]), int(e["nbytes"])
            if nbytes != math.ceil(numel / 8) or e["byte_offset"] + nbytes > bits.numel():
                raise PackedFileError(f"{path}: bit field of {e['name']!r} is out of range")
            scale = None
            if e["scale_shape"] is not None:
                n = math.prod(e["scale_shape"])
                if e["scale_offset"] + n > sc.numel():
                    raise PackedFileError(f"{path}: scale of {e['name']!r} is out of range")
                scale = sc[e["scale_offset"]:e["scale_offset"] + n].reshape(e["scale_shape"])
            packed.binary.append(PackedLayer(name=e["name"], shape=list(e["shape"]),
                                             bits=bits[e["byte_offset"]:e["byte_offset"] + nbytes], scale=scale))
        for e in obj["fp_index"]:
            n = math.prod(e["shape"])
            if e["offset"] + n > fp.numel():
                raise PackedFileError(f"{path}: tensor {e['key']!r} is out of range")
            packed.fp[e["key"]] = fp[e["offset"]:e["offset"] + n].reshape(e["shape"])
    except (KeyError, TypeError) as e:
        raise PackedFileError(f"{path}: malformed index ({type(e).__name__}: {e})") from e
    return unpack_into(model, packed, path)


def packed_size_report(model: nn.Module, tmpdir: str | os.PathLike) -> dict[str, Any]:
    """Export ``model`` packed and as an FP32 ``state_dict`` into ``tmpdir``; compare the two file sizes.

    ``ratio`` = packed bytes / FP32 bytes (smaller is better); ``compression`` = its inverse.
    """
    tmpdir = Path(tmpdir)
    packed = export_packed(model, tmpdir / "model.packed.pt")
    fp32_path = tmpdir / "model.fp32_state_dict.pt"
    sd = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu())
          for k, v in model.state_dict().items()}
    _atomic_torch_save(sd, fp32_path)
    packed_bytes, fp32_bytes = packed.stat().st_size, fp32_path.stat().st_size
    n_binary = sum(m.weight.numel() for m in _binary_modules(model).values())
    return {"packed_path": str(packed), "fp32_path": str(fp32_path), "packed_bytes": packed_bytes,
            "fp32_bytes": fp32_bytes, "ratio": packed_bytes / fp32_bytes, "compression": fp32_bytes / packed_bytes,
            "binary_layers": len(_binary_modules(model)), "binary_weights": n_binary}
