"""Trained networks as fusion methods: load a checkpoint (weights only) and fuse tiles.

A checkpoint written by :func:`bnnpan.train.loop.train` is a dict of tensors and plain
types (never a pickled module): ``model`` (state_dict), ``net`` (name, in_channels, width,
depth, ratio, extra) and ``scale``. It is always read in weights-only mode (no unpickling of
code, :func:`bnnpan.train.loop.load_checkpoint`); the network is rebuilt from the registry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnnpan.models.networks import NetConfig, build_network
from bnnpan.train.loop import CheckpointError, load_checkpoint, recreate_hint

__all__ = ["CheckpointError", "NetworkFuser", "load_network"]


def _load(path: Path, device: str | torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; {recreate_hint(path).replace('recreate', 'create')}")
    return load_checkpoint(path, map_location=device)  # weights_only=True inside


def load_network(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network of a checkpoint and load its weights; returns (model in eval mode, ckpt)."""
    from bnnpan.devices import resolve_device

    path = Path(path)
    device = resolve_device(device)
    ckpt = _load(path, device)
    try:
        net = dict(ckpt["net"])
        cfg = NetConfig(in_channels=int(net["in_channels"]), width=int(net["width"]), depth=int(net["depth"]),
                        ratio=int(net.get("ratio", 4)), extra=dict(net.get("extra") or {}))
        model = build_network(str(net["name"]), cfg)
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: checkpoint does not match its network: {e}") from None
    return model.to(device).eval(), ckpt


class NetworkFuser:
    """``fuse(lms, pan, ms)`` in DN with a trained network (inputs divided by the scale)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", runtime: str = "float") -> None:
        from bnnpan.models.packed_runtime import apply_runtime

        self.model, ckpt = load_network(path, device)
        #: binary layers on the packed 1-bit kernels (CPU, eval) or the float simulation; what was converted
        self.runtime = {"runtime": runtime, **apply_runtime(self.model, runtime)}
        self.sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()  # the file scored (metrics.json)
        device = next(self.model.parameters()).device
        self.name = str(ckpt["net"].get("method", ckpt["net"]["name"]))
        self.scale = float(ckpt["scale"])
        self.device = device
        #: the network needs the reference at inference (BNNPan's oracle prior): reduced resolution only
        self.needs_reference = bool(getattr(self.model, "needs_reference", False))

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / self.scale).to(self.device)

    @torch.no_grad()
    def fuse(self, lms: np.ndarray, pan: np.ndarray, ms: np.ndarray, gt: np.ndarray | None = None) -> np.ndarray:
        ref = ()
        if self.needs_reference:
            if gt is None:
                raise ValueError(f"{self.name} needs the reference image (oracle prior): reduced resolution only")
            ref = (self._tensor(gt)[None],)
        out = self.model(self._tensor(lms)[None], self._tensor(pan)[None, None], *ref)[0].double().cpu().numpy()
        return out * self.scale
