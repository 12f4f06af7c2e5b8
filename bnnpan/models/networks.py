"""The networks: one per method, all :class:`~bnnpan.models.backbone.PanBackbone`, only the body block differs.

``build_network(name, NetConfig(...))``; :data:`NETWORKS` maps a name to ``factory(NetConfig) -> nn.Module``.
Method-specific switches live in ``NetConfig.extra`` (:data:`EXTRA_KEYS` lists them per method; a key that no
method knows is an error, so a typo in ``params.yaml`` does not pass silently).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from bnnpan.models import layers
from bnnpan.models.backbone import PanBackbone
from bnnpan.models.bnnpan import VARIANTS, BNNPanNet, BNNPanSwitches


@dataclass(frozen=True)
class NetConfig:
    in_channels: int  # C (MS bands)
    width: int = 32  # D
    depth: int = 4  # N binary blocks
    ratio: int = 4  # sensor ratio (informational)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific switches
    zero_init_tail: bool = True  # start every method at EXP (see backbone.py); init only


#: method -> the ``extra`` keys it reads (with their defaults' meaning).
EXTRA_KEYS: dict[str, dict[str, str]] = {
    "fp": {},
    "bnn": {},
    "xnor": {"xnor_window": "size of XNOR-Net's averaging kernel k for the K map (default 3)"},
    "bireal": {},
    "irnet": {},
    "reactnet": {},
    "btm": {"btm_res_scale": "scale of the binary branch in x + s * y (default 0.2)"},
    "bbcu": {"bbcu_k": "residual-alignment factor k (default 130 * width / 64)"},
    "bisrnet": {"bisr_beta_init": "initial beta of the tanh backward (default 2.0)"},
    **{name: {k: "BNNPan switch (bnnpan.models.bnnpan.BNNPanSwitches)" for k in BNNPanSwitches.keys()}
       for name in VARIANTS},
}


def _backbone(cfg: NetConfig, block: Callable[[int], nn.Module]) -> PanBackbone:
    return PanBackbone(cfg.in_channels, cfg.width, cfg.depth, block, zero_init_tail=cfg.zero_init_tail)


def _fp(cfg: NetConfig) -> nn.Module:
    return _backbone(cfg, layers.FPBlock)


def _bnn(cfg: NetConfig) -> nn.Module:
    return _backbone(cfg, layers.BNNBlock)


def _xnor(cfg: NetConfig) -> nn.Module:
    window = int(cfg.extra.get("xnor_window", 3))
    return _backbone(cfg, lambda d: layers.XNORBlock(d, window=window))


def _bireal(cfg: NetConfig) -> nn.Module:
    return _backbone(cfg, layers.BiRealBlock)


def _irnet(cfg: NetConfig) -> nn.Module:
    return _backbone(cfg, layers.IRNetBlock)


def _reactnet(cfg: NetConfig) -> nn.Module:
    return _backbone(cfg, layers.ReActBlock)


def _btm(cfg: NetConfig) -> nn.Module:
    s = float(cfg.extra.get("btm_res_scale", 0.2))
    return _backbone(cfg, lambda d: layers.BTMBlock(d, res_scale=s))


def _bbcu(cfg: NetConfig) -> nn.Module:
    k = cfg.extra.get("bbcu_k")
    return _backbone(cfg, lambda d: layers.BBCUBlock(d, k=None if k is None else float(k)))


def _bisrnet(cfg: NetConfig) -> nn.Module:
    beta = float(cfg.extra.get("bisr_beta_init", 2.0))
    return _backbone(cfg, lambda d: layers.BiSRBlock(d, beta_init=beta))


def _bnnpan_factory(variant: str) -> Callable[[NetConfig], nn.Module]:
    def build(cfg: NetConfig) -> nn.Module:
        return BNNPanNet(cfg.in_channels, cfg.width, cfg.depth, bnnpan_switches(variant, cfg.extra),
                         zero_init_tail=cfg.zero_init_tail)

    build.__doc__ = f"BNNPan variant {variant!r}: switches {VARIANTS[variant] or 'all on'} (bnnpan.models.bnnpan)"
    return build


def bnnpan_switches(variant: str, extra: dict[str, Any]) -> BNNPanSwitches:
    """The switches of a BNNPan variant: its :data:`VARIANTS` entry, then ``extra`` (params) on top."""
    return BNNPanSwitches.from_dict({**VARIANTS[variant], **extra})


def uses_prior(network: str, extra: dict[str, Any]) -> bool:
    """Whether a network needs the pretrained latent prior (a BNNPan variant with ``ldpc != off``)."""
    return network in VARIANTS and bnnpan_switches(network, extra).ldpc != "off"


NETWORKS: dict[str, Callable[[NetConfig], nn.Module]] = {
    "fp": _fp,
    "bnn": _bnn,
    "xnor": _xnor,
    "bireal": _bireal,
    "irnet": _irnet,
    "reactnet": _reactnet,
    "btm": _btm,
    "bbcu": _bbcu,
    "bisrnet": _bisrnet,
    **{name: _bnnpan_factory(name) for name in VARIANTS},
}


def build_network(name: str, cfg: NetConfig) -> nn.Module:
    """Build network ``name`` (ValueError listing the known names, or naming an ``extra`` key no method knows)."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; known networks: {', '.join(NETWORKS)}")
    known = {k for keys in EXTRA_KEYS.values() for k in keys}
    unknown = sorted(set(cfg.extra) - known)
    if unknown:
        raise ValueError(f"NetConfig.extra has unknown key(s) {unknown}; known: {sorted(known)}")
    return NETWORKS[name](cfg)
