"""BNNPan: the shared backbone with a body of PIBF modules and the LDPC latent prior (our reconstruction).

Paper: Hou, Chen, Ran, Cong, Liu, You, Deng, "Binarized Neural Network for Multi-spectral Image Fusion",
CVPR 2025. Backbone as every other method (``shared/design/method.md``)::

    x0  = conv3x3_fp(cat[lms, pan])                  C+1 -> D
    z   = prior(lms, pan)                            LDPC: diffusion sample (test) | E1(gt, lms, pan) (oracle)
    x   = PIBF_N(... PIBF_1(x0, z), z)               binary body (bnnpan.models.pibf)
    out = conv3x3_fp(x + x0) + lms                   D -> C, zero-initialised (starts at EXP)

Every reconstructed choice is a switch (:class:`BNNPanSwitches`, from ``train.methods.<m>.extra`` and the
``prior`` section of ``params.yaml``); the ablation methods are named sets of switches (:data:`VARIANTS`).

Roles (how the one training loop drives it; see ``bnnpan.train.loop``: a model with ``wants_gt`` is called as
``model(lms, pan, gt)`` and may return ``(out, aux_loss)``; ``out=None`` means "no image loss"):

* ``network`` -- the method. ``ldpc="diffusion"``: z sampled by the pretrained prior; ``prior_mode="frozen"``
  keeps the prior fixed (E1 is not even built), ``"finetune"`` trains E2 + denoiser with the body, adding
  ``latent_weight * L1(z_hat, E1 z)`` (E1 frozen). ``ldpc="oracle"``: z = E1(gt, ...) (reduced resolution only:
  there is no gt at full resolution). ``ldpc="off"``: no prior.
* ``stage1`` -- prior pretraining, step 1: the oracle network with E1 trainable (E1 learns what the body misses).
* ``stage2`` -- prior pretraining, step 2: only E2 + denoiser train, to reproduce E1's z from (lms, pan)
  through the diffusion chain (latent loss only); in eval mode it fuses with the sampled z (validation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from bnnpan.models.backbone import check_inputs
from bnnpan.models.layers import conv3x3
from bnnpan.models.pibf import PIBF
from bnnpan.models.prior import LatentPrior

LDPC_MODES = ("diffusion", "oracle", "off")
PRIOR_MODES = ("frozen", "finetune")
ROLES = ("network", "stage1", "stage2")


@dataclass(frozen=True)
class BNNPanSwitches:
    """Every reconstructed choice of BNNPan (defaults = the full method)."""

    bwtc: bool = True  # False: one plain (FP-stat) binary unit instead of the wavelet unit
    # BWTC's full-resolution base unit beside the sub-band units. Our choice: off. With it a PIBF runs two binary
    # convs (OPs 1.9x BBCU's at 256x256 instead of 1.4x), and on Landsat-8 it did not help (Q2n 0.9580 with,
    # 0.9588 without; no LDPC; issue-5 session).
    bwtc_base: bool = False
    fp_stats: bool = True  # False: binary units without FP mean/std re-centring and rescaling
    cdc: bool = True  # False: no channel-wise distribution calibration
    ldpc: str = "diffusion"  # diffusion | oracle | off
    latent_dim: int = 256  # L, size of z
    prior_width: int = 32  # channels of the E1 / E2 conv stacks
    diffusion_steps: int = 4  # T
    beta_start: float = 0.1
    beta_end: float = 0.99
    scheduler: str = "ddim"  # ddim (eta 0, deterministic) | ddpm
    sample_seed: int = 0  # seed of z_T at test time
    kl_weight: float = 0.0  # DiffIR's optional KL term of the latent loss
    prior_mode: str = "frozen"  # frozen | finetune, when the method is trained
    latent_weight: float = 1.0  # finetune: weight of L1(z_hat, E1 z)

    def __post_init__(self) -> None:
        if self.ldpc not in LDPC_MODES:
            raise ValueError(f"bnnpan: ldpc must be one of {LDPC_MODES}, got {self.ldpc!r}")
        if self.prior_mode not in PRIOR_MODES:
            raise ValueError(f"bnnpan: prior_mode must be one of {PRIOR_MODES}, got {self.prior_mode!r}")
        if self.latent_dim < 1 or self.prior_width < 1 or self.diffusion_steps < 1:
            raise ValueError("bnnpan: latent_dim, prior_width and diffusion_steps must be >= 1")
        if self.latent_weight < 0 or self.kl_weight < 0:
            raise ValueError("bnnpan: latent_weight and kl_weight must be >= 0")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BNNPanSwitches:
        known = set(cls.keys())
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"bnnpan: unknown switch(es) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: method name -> the switches it sets on top of the defaults (the ablations of the report).
VARIANTS: dict[str, dict[str, Any]] = {
    "bnnpan": {},
    "bnnpan_no_bwtc": {"bwtc": False},
    "bnnpan_no_fpstats": {"fp_stats": False},
    "bnnpan_no_ldpc": {"ldpc": "off"},
    "bnnpan_oracle_prior": {"ldpc": "oracle"},
    "bnnpan_no_cdc": {"cdc": False},
}


class BNNPanNet(nn.Module):
    """``forward(lms, pan, gt=None)`` -> (B, C, H, W) (or ``(out, aux_loss)`` while training, see the module doc)."""

    def __init__(self, in_channels: int, width: int = 32, depth: int = 4,
                 switches: BNNPanSwitches | None = None, zero_init_tail: bool = True, role: str = "network") -> None:
        super().__init__()
        sw = switches or BNNPanSwitches()
        if role not in ROLES:
            raise ValueError(f"bnnpan: role must be one of {ROLES}, got {role!r}")
        if role == "stage1" and sw.ldpc != "oracle" or role == "stage2" and sw.ldpc != "diffusion":
            raise ValueError(f"bnnpan: role {role} needs ldpc={'oracle' if role == 'stage1' else 'diffusion'}")
        self.in_channels, self.width, self.depth, self.switches, self.role = in_channels, width, depth, sw, role
        use_z = sw.ldpc != "off"
        self.head = conv3x3(in_channels + 1, width)
        self.body = nn.ModuleList(
            PIBF(width, bwtc=sw.bwtc, fp_stats=sw.fp_stats, cdc=sw.cdc, latent_dim=sw.latent_dim if use_z else 0,
                 base=sw.bwtc_base) for _ in range(depth))
        self.tail = conv3x3(width, in_channels)
        if zero_init_tail:
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)
        self.latent_training = sw.ldpc == "diffusion" and (role == "stage2" or sw.prior_mode == "finetune")
        self.prior: LatentPrior | None = None
        if use_z:
            self.prior = LatentPrior(
                in_channels, sw.latent_dim, sw.prior_width, sw.diffusion_steps, sw.beta_start, sw.beta_end,
                sw.scheduler, sw.sample_seed, sw.kl_weight,
                with_e1=sw.ldpc == "oracle" or self.latent_training, with_diffusion=sw.ldpc == "diffusion")
        #: the training loop passes gt when this is set
        self.wants_gt = sw.ldpc == "oracle" or self.latent_training
        #: inference needs the reference (the oracle ablation: reduced resolution only)
        self.needs_reference = sw.ldpc == "oracle"
        self._set_trainable()

    def _set_trainable(self) -> None:
        if self.prior is None:
            return
        if self.role == "stage2":  # only E2 + denoiser learn
            for p in self.parameters():
                p.requires_grad_(False)
            for m in (self.prior.e2, self.prior.denoiser):
                m.requires_grad_(True)
        elif self.role == "network":
            self.prior.requires_grad_(self.switches.prior_mode == "finetune")
            if self.prior.e1 is not None and self.switches.ldpc == "diffusion":
                self.prior.e1.requires_grad_(False)  # the target of the latent loss stays fixed

    def prior_state_dict(self) -> dict[str, Tensor]:
        """The ``prior.*`` entries of the state dict (what ``pretrain-prior`` hands to the methods)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("prior.")}

    def load_prior(self, state: dict[str, Tensor]) -> list[str]:
        """Load the ``prior.*`` entries this model has from a pretrained state dict; returns the keys loaded."""
        if self.prior is None:
            return []
        own = self.prior_state_dict()
        missing = sorted(k for k in own if k not in state)
        if missing:
            raise ValueError(f"the pretrained prior lacks {len(missing)} tensor(s) this model needs, e.g. {missing[0]}"
                             " (was it pretrained with other prior settings?)")
        sub = {k[len("prior."):]: state[k] for k in own}
        try:
            self.prior.load_state_dict(sub)
        except RuntimeError as e:
            raise ValueError(f"the pretrained prior does not fit this model: {e}") from None
        return sorted(own)

    def latent(self, lms: Tensor, pan: Tensor, gt: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(z, latent loss or None) for this role/mode."""
        sw = self.switches
        if self.prior is None:
            return None, None
        if sw.ldpc == "oracle":
            if gt is None:
                raise ValueError("bnnpan with the oracle prior needs the reference gt (reduced resolution only)")
            return self.prior.encode_gt(gt, lms, pan), None
        if self.training and self.latent_training:
            if gt is None:
                raise ValueError("training the diffusion prior needs gt")
            with torch.no_grad():
                z_gt = self.prior.encode_gt(gt, lms, pan)
            z = self.prior.diffuse(z_gt, lms, pan)
            return z, self.prior.latent_loss(z, z_gt)
        return self.prior.sample(lms, pan), None

    def forward(self, lms: Tensor, pan: Tensor, gt: Tensor | None = None):
        check_inputs(lms, pan, self.in_channels)
        z, aux = self.latent(lms, pan, gt)
        if aux is not None and self.role == "stage2":
            return None, aux
        x0 = self.head(torch.cat([lms, pan], dim=1))
        x = x0
        for block in self.body:
            x = block(x, z)
        out = self.tail(x + x0) + lms
        if aux is not None:
            return out, self.switches.latent_weight * aux
        return out
