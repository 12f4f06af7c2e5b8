"""LDPC's latent diffusion prior (BNNPan's "Latent Diffusion Prior Compensation"), reconstructed after DiffIR.

BNNPan (Hou et al., CVPR 2025) compensates what binarization loses with a latent diffusion prior; its design
is not public. Our reconstruction follows DiffIR (Xia et al., ICCV 2023), see ``shared/design/method.md``:

* **E1** (:class:`LatentEncoder`, stage 1) sees ``pixel_unshuffle(cat[gt, lms, pan], 4)`` and outputs a compact
  latent ``z in R^L`` (conv stack -> global average pool -> MLP). It is trained jointly with a network that
  consumes z, so z learns what that network (binary) misses. Only training (and the oracle ablation) runs it.
* **E2** (:class:`LatentEncoder`) sees ``pixel_unshuffle(cat[lms, pan], 4)`` only and gives the condition c.
* **Denoiser** (:class:`LatentDenoiser`): an MLP predicting ``z_0`` from ``(z_t, c, t / T)``.
* The noise schedule, ``add_noise`` and the reverse loop are ``diffusers`` schedulers (``DDIMScheduler`` with
  eta = 0, default, or ``DDPMScheduler``) with T training steps (default 4) and linear betas 0.1 -> 0.99
  (DiffIR), ``prediction_type="sample"`` (the denoiser predicts z_0) and no clipping (z is not an image).

Training the prior (:meth:`LatentPrior.diffuse`): ``z_T = add_noise(z_gt, eps, T - 1)``, then the T reverse
steps, differentiable, loss ``L1(z_hat, z_gt)`` (+ ``kl_weight`` * KL of ``softmax(z / 0.15)``, DiffIR's option).
At test time (:meth:`LatentPrior.sample`): ``z_T ~ N(0, I)`` from a generator seeded with ``seed`` (ONE draw of
shape (1, L) shared by every image, so a tile's z does not depend on its batch), then T reverse steps;
with DDIM (eta = 0) nothing else is random, so the sample is a deterministic function of (lms, pan).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnpan.models.imagestats import channel_moments

UNSHUFFLE = 4
KL_TEMPERATURE = 0.15


class LatentEncoder(nn.Module):
    """``(B, in_channels, H, W) -> (B, latent_dim)``: pixel-unshuffle x4, 1x1 conv, two stride-2 3x3 convs, GAP, MLP.

    Kept small on purpose: E2 runs at inference, so its FLOPs count in the method's OPs (~300 per HR pixel at
    width 32). H and W are reflect-padded to a multiple of 4 when needed.
    """

    def __init__(self, in_channels: int, latent_dim: int = 256, width: int = 32) -> None:
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(UNSHUFFLE)
        self.conv1 = nn.Conv2d(in_channels * UNSHUFFLE**2, width, 1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.act = nn.LeakyReLU(0.1)
        #: input pixels per pixel of the pooled map (unshuffle x4, two stride-2 convs): :mod:`bnnpan.models.imagestats`
        self.stat_stride = UNSHUFFLE * 4
        self.fc1 = nn.Linear(width, latent_dim)
        self.fc2 = nn.Linear(latent_dim, latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % UNSHUFFLE, (-w) % UNSHUFFLE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        x = self.act(self.conv1(self.unshuffle(x)))
        x = self.act(self.conv2(x))
        x = self.act(self.conv3(x))
        pooled, _ = channel_moments(self, x, var=False)  # the global average pool, streamable
        return self.fc2(self.act(self.fc1(pooled.flatten(1))))


class LatentDenoiser(nn.Module):
    """``(z_t (B, L), c (B, L), t (B,)) -> z_0 estimate (B, L)``: MLP on ``cat[z_t, c, t / T]`` (DiffIR's denoiser)."""

    def __init__(self, latent_dim: int = 256, steps: int = 4, hidden: int | None = None, layers: int = 4) -> None:
        super().__init__()
        hidden = hidden or latent_dim
        self.steps = steps
        dims = [2 * latent_dim + 1] + [hidden] * (layers - 1)
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            mods += [nn.Linear(a, b), nn.LeakyReLU(0.1)]
        mods.append(nn.Linear(dims[-1], latent_dim))
        self.mlp = nn.Sequential(*mods)

    def forward(self, z_t: Tensor, c: Tensor, t: Tensor) -> Tensor:
        tt = (t.to(z_t.dtype) / self.steps).reshape(-1, 1).expand(z_t.shape[0], 1)
        return self.mlp(torch.cat([z_t, c, tt], dim=1))


def make_scheduler(kind: str, steps: int, beta_start: float, beta_end: float):
    """A diffusers scheduler over ``steps`` training timesteps, linear betas, predicting the sample, no clipping."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if steps < 1:
        raise ValueError(f"diffusion steps must be >= 1, got {steps}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    common = dict(num_train_timesteps=steps, beta_start=beta_start, beta_end=beta_end, beta_schedule="linear",
                  clip_sample=False, prediction_type="sample")
    if kind == "ddim":
        sched = DDIMScheduler(**common, set_alpha_to_one=True)
    elif kind == "ddpm":
        sched = DDPMScheduler(**common, variance_type="fixed_small")
    else:
        raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {kind!r}")
    sched.set_timesteps(steps)
    return sched


class LatentPrior(nn.Module):
    """E1 (optional), E2 and the denoiser, with a diffusers scheduler; see the module docstring.

    ``with_e1``: build E1 (needed to pretrain, for the oracle prior and for a fine-tuning latent loss; a deployed
    diffusion prior does not store it). ``with_diffusion``: build E2 and the denoiser (not needed by the oracle).
    """

    def __init__(self, in_channels: int, latent_dim: int = 256, width: int = 32, steps: int = 4,
                 beta_start: float = 0.1, beta_end: float = 0.99, scheduler: str = "ddim", seed: int = 0,
                 kl_weight: float = 0.0, with_e1: bool = True, with_diffusion: bool = True) -> None:
        super().__init__()
        self.latent_dim, self.steps, self.seed, self.kl_weight = latent_dim, steps, int(seed), float(kl_weight)
        self.scheduler_kind = scheduler
        self.scheduler = make_scheduler(scheduler, steps, beta_start, beta_end)  # not a module: no state
        self.e1 = LatentEncoder(2 * in_channels + 1, latent_dim, width) if with_e1 else None
        self.e2 = LatentEncoder(in_channels + 1, latent_dim, width) if with_diffusion else None
        self.denoiser = LatentDenoiser(latent_dim, steps) if with_diffusion else None

    def encode_gt(self, gt: Tensor, lms: Tensor, pan: Tensor) -> Tensor:
        """E1: the stage-1 (oracle) latent from the reference."""
        if self.e1 is None:
            raise RuntimeError("this prior has no E1 (stage-1 encoder)")
        return self.e1(torch.cat([gt, lms, pan], dim=1))

    def condition(self, lms: Tensor, pan: Tensor) -> Tensor:
        if self.e2 is None:
            raise RuntimeError("this prior has no E2/denoiser (oracle-only prior)")
        return self.e2(torch.cat([lms, pan], dim=1))

    def _reverse(self, z: Tensor, c: Tensor, generator: torch.Generator | None) -> Tensor:
        for t in self.scheduler.timesteps:
            tt = torch.full((z.shape[0],), int(t), device=z.device)
            z0 = self.denoiser(z, c, tt)
            kw = {"eta": 0.0} if self.scheduler_kind == "ddim" else {}
            z = self.scheduler.step(z0, int(t), z, generator=generator, **kw).prev_sample
        return z

    def sample(self, lms: Tensor, pan: Tensor) -> Tensor:
        """Test-time z: ``z_T ~ N(0, I)`` (fixed seed, shared by the batch), T reverse steps conditioned on E2."""
        c = self.condition(lms, pan)
        g = torch.Generator().manual_seed(self.seed)
        z = torch.randn((1, self.latent_dim), generator=g).to(device=c.device, dtype=c.dtype).expand_as(c)
        return self._reverse(z.contiguous(), c, g if self.scheduler_kind == "ddpm" else None)

    def diffuse(self, z_gt: Tensor, lms: Tensor, pan: Tensor) -> Tensor:
        """Training-time z: noise ``z_gt`` to step T-1 (``add_noise``), then the T reverse steps (differentiable)."""
        c = self.condition(lms, pan)
        noise = torch.randn_like(z_gt)
        t_last = self.scheduler.timesteps[:1].repeat(z_gt.shape[0]).to(z_gt.device)
        z = self.scheduler.add_noise(z_gt, noise, t_last)
        return self._reverse(z, c, None)

    def latent_loss(self, z_hat: Tensor, z_gt: Tensor) -> Tensor:
        """``L1(z_hat, z_gt)`` + ``kl_weight`` * KL(softmax(z_gt / 0.15) || softmax(z_hat / 0.15)) (DiffIR)."""
        loss = F.l1_loss(z_hat, z_gt)
        if self.kl_weight > 0:
            p = F.log_softmax(z_gt / KL_TEMPERATURE, dim=1)
            q = F.log_softmax(z_hat / KL_TEMPERATURE, dim=1)
            loss = loss + self.kl_weight * F.kl_div(q, p, log_target=True, reduction="batchmean")
        return loss

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, steps={self.steps}, scheduler={self.scheduler_kind}, seed={self.seed}"
