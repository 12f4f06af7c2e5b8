"""The one training loop of every network: iteration-based, seeded, resumable bit for bit, DDP-ready.

Recipe (design/method.md, "Training recipe"): Adam, L1 loss (optionally ``+ ssim_weight * (1 - SSIM)``),
``cosine`` / ``step`` / ``constant`` learning-rate schedule, batches of patches divided by the
file's scale. Same recipe for every method; the CPU profile only shrinks ``iterations``.

Determinism and resume
    ``torch.manual_seed(cfg.seed)`` (plus Python and NumPy) seeds the process; the sample
    sequence comes from a separate ``torch.Generator`` (seeded with ``cfg.seed``) that draws a
    fresh permutation of the training set per pass and, with ``augment``, one dihedral transform
    per sample. Its state (and the position in the current permutation) is checkpointed with the
    model, optimizer, scheduler and every RNG state, so a run killed after checkpoint ``k`` and
    resumed continues the exact same sample sequence: on CPU with ``deterministic=True`` the final
    weights equal the uninterrupted run's bit for bit (tested) -- given the same intra-op thread count
    (``torch.get_num_threads()``): another count changes float summation order (~1e-7 after 12 steps).
    The number of DataLoader workers does not matter (transforms are drawn in the sampler).

Files (``out_path`` = e.g. ``models/landsat8/bireal.pt``)
    * ``out_path.with_suffix(".ckpt")``: the last checkpoint (every ``ckpt_every`` steps and at the
      end), written to a temporary file then ``os.replace``-d;
    * ``out_path``: the final model (weights + metadata) written atomically at the end;
    * ``<stem>_curve.csv``: ``step,loss,lr,val_l1,val_psnr`` per step, rewritten atomically at each
      checkpoint and at the end.
    Checkpoints are dicts of tensors and plain types (the layout of the contract), never pickled
    modules, and are read only with ``torch.load(..., weights_only=True)``.

Distributed
    Under ``torchrun`` (``WORLD_SIZE > 1``) the loop initialises the process group (gloo on CPU,
    NCCL on CUDA; ``device="cuda"`` becomes ``cuda:$LOCAL_RANK``), wraps the model in
    ``DistributedDataParallel`` and gives rank ``r`` the ``r``-th contiguous shard of every global
    batch: the global batch is ``cfg.batch_size`` and the global sample sequence is the single-process
    one, so the averaged gradient equals the single-process gradient up to float summation order
    (exactly so for networks without BatchNorm; BatchNorm statistics stay per rank, as usual with
    DDP). Only rank 0 validates, logs, writes files; all ranks meet at a barrier after each checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from bnnpan.atomic import write_with
from bnnpan.data.datasets import N_TRANSFORMS, PanDataset

log = logging.getLogger(__name__)

CKPT_VERSION = 1
CURVE_COLUMNS = ("step", "loss", "lr", "val_l1", "val_psnr")
LogFn = Callable[[dict[str, float], int], None]


class CheckpointError(RuntimeError):
    """An unreadable or inconsistent training checkpoint (the message names the file)."""


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (the same recipe for every method)."""

    iterations: int = 1000
    batch_size: int = 32  # global batch (split across DDP ranks)
    lr: float = 5e-4
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    lr_min: float = 0.0  # cosine: final learning rate
    lr_step: int | None = None  # step: decay period in iterations (None: iterations // 3)
    lr_gamma: float = 0.5  # step: decay factor
    warmup: int = 0  # linear learning-rate warm-up steps (0: none)
    weight_decay: float = 0.0
    loss: Literal["l1", "l1_ssim"] = "l1"
    ssim_weight: float = 0.1  # l1_ssim: L1 + ssim_weight * (1 - SSIM)
    grad_clip: float | None = None  # max global gradient norm (None: no clipping)
    val_every: int = 100  # validate every N steps (and at the end); 0: only at the end
    ckpt_every: int = 100  # checkpoint every N steps (and at the end); 0: only at the end
    log_every: int = 10  # call log_fn with the training loss every N steps
    augment: bool = False  # random dihedral transform (flips x rot90) per training sample
    seed: int = 0
    num_workers: int = 0  # DataLoader workers
    deterministic: bool = True  # torch.use_deterministic_algorithms on CPU (cudnn deterministic on CUDA)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        need(self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.warmup < self.iterations, f"warmup must be in [0, iterations), got {self.warmup}")
        need(self.lr_schedule in ("cosine", "step", "constant"),
             f"lr_schedule must be cosine|step|constant, got {self.lr_schedule!r}")
        need(0 <= self.lr_min <= self.lr, f"lr_min must be in [0, lr], got {self.lr_min}")
        need(self.lr_step is None or self.lr_step >= 1, f"lr_step must be >= 1, got {self.lr_step}")
        need(0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.loss in ("l1", "l1_ssim"), f"loss must be l1|l1_ssim, got {self.loss!r}")
        need(self.ssim_weight >= 0, f"ssim_weight must be >= 0, got {self.ssim_weight}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be None or > 0, got {self.grad_clip}")
        for k in ("val_every", "ckpt_every", "num_workers"):
            need(getattr(self, k) >= 0, f"{k} must be >= 0, got {getattr(self, k)}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; an unknown key is an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------- losses


def _gaussian_window(size: int = 11, sigma: float = 1.5, *, dtype=torch.float32, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(dtype=dtype, device=device)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) of two (B, C, H, W) batches, per channel, differentiable.

    11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, ``data_range`` the peak (1 for data divided
    by the scale); valid convolution (no padding), so H and W must be >= ``window``. Returns the mean of the
    SSIM map over batch, channels and pixels.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim expects two equal (B,C,H,W) shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    c = x.shape[1]
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: images {tuple(x.shape[-2:])} smaller than the {window}x{window} window")
    w = _gaussian_window(window, sigma, dtype=x.dtype, device=x.device).expand(c, 1, window, window)

    def filt(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, w, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean()


def training_loss(out: torch.Tensor, gt: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    loss = F.l1_loss(out, gt)
    if cfg.loss == "l1_ssim":
        loss = loss + cfg.ssim_weight * (1 - ssim(out, gt))
    return loss


def call_model(net: nn.Module, wants_gt: bool, lms: torch.Tensor, pan: torch.Tensor,
               gt: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(out, aux_loss or None)``: ``net(lms, pan, gt)`` when it ``wants_gt``, else ``net(lms, pan)``."""
    res = net(lms, pan, gt) if wants_gt else net(lms, pan)
    return res if isinstance(res, tuple) else (res, None)


def model_loss(net: nn.Module, wants_gt: bool, lms: torch.Tensor, pan: torch.Tensor, gt: torch.Tensor,
               cfg: TrainConfig) -> torch.Tensor:
    """The loss of one batch. Most networks are ``net(lms, pan) -> out`` and get :func:`training_loss`.

    A network with ``wants_gt = True`` (BNNPan's latent prior: the oracle encoder E1 sees the reference) is
    called as ``net(lms, pan, gt)`` and may return ``(out, aux_loss)``: the auxiliary loss (e.g. the latent
    L1 of the diffusion prior) is added; ``out = None`` means the image loss is not used (prior pretraining).
    """
    out, aux = call_model(net, wants_gt, lms, pan, gt)
    if out is None and aux is None:
        raise ValueError("the network returned neither an output nor a loss")
    loss = training_loss(out, gt, cfg) if out is not None else None
    if aux is not None:
        loss = aux if loss is None else loss + aux
    return loss


def optimizer_step(net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, wants_gt: bool, lms: torch.Tensor,
                   pan: torch.Tensor, gt: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """One training step on a batch (loss, backward, gradient clipping, optimizer step); returns the loss.
    ``net`` is what is called (``model`` itself or its DDP wrapper), ``model`` what is clipped. The one step of
    :func:`train`, also timed by ``bench/train.py``."""
    loss = model_loss(net, wants_gt, lms, pan, gt, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss


# -------------------------------------------------------------------------------------- sampler


class InfiniteBatchSampler:
    """Endless global batches: a fresh permutation of ``n`` samples per pass, from a private generator.

    Yields this rank's shard of each global batch: a list of indices, or of ``(index, transform)``
    pairs when ``augment`` (transforms drawn from the same generator, for the whole global batch).
    :meth:`state_before` returns the state before a given batch even when a DataLoader has
    prefetched past it, so a checkpoint restarts exactly at the next unconsumed batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, augment: bool = False, rank: int = 0,
                 world_size: int = 1) -> None:
        if n < 1:
            raise ValueError("the training set is empty")
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by the world size {world_size}")
        self.n, self.batch_size, self.augment = n, batch_size, augment
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(int(seed))
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos = 0
        self.batch = 0  # index of the next batch to produce
        self._history: deque[tuple[int, dict[str, Any]]] = deque(maxlen=256)  # > any DataLoader prefetch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "pos": int(self.pos),
                "batch": int(self.batch), "n": int(self.n), "batch_size": int(self.batch_size),
                "augment": bool(self.augment)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        if int(s["n"]) != self.n or int(s["batch_size"]) != self.batch_size or bool(s["augment"]) != self.augment:
            raise ValueError(f"sampler state for n={s['n']}, batch_size={s['batch_size']}, augment={s['augment']} "
                             f"does not match n={self.n}, batch_size={self.batch_size}, augment={self.augment}")
        self.generator.set_state(s["generator"].cpu())
        self.perm = s["perm"].cpu().clone()
        self.pos = int(s["pos"])
        self.batch = int(s["batch"])
        self._history.clear()

    def state_before(self, batch: int) -> dict[str, Any]:
        """The state just before producing global batch ``batch`` (0-based)."""
        if batch == self.batch:
            return self.state_dict()
        for b, s in self._history:
            if b == batch:
                return s
        raise RuntimeError(f"sampler state before batch {batch} is no longer known (next batch {self.batch})")

    def next_global(self) -> tuple[list[int], list[int] | None]:
        self._history.append((self.batch, self.state_dict()))
        idx: list[int] = []
        while len(idx) < self.batch_size:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
            take = min(self.batch_size - len(idx), self.n - self.pos)
            idx.extend(self.perm[self.pos:self.pos + take].tolist())
            self.pos += take
        tf = None
        if self.augment:
            tf = torch.randint(N_TRANSFORMS, (self.batch_size,), generator=self.generator).tolist()
        self.batch += 1
        return idx, tf

    def __iter__(self) -> Iterator[list[Any]]:
        per = self.batch_size // self.world_size
        while True:
            idx, tf = self.next_global()
            sl = slice(self.rank * per, (self.rank + 1) * per)
            yield list(zip(idx[sl], tf[sl], strict=True)) if tf is not None else idx[sl]


# ---------------------------------------------------------------------------------- RNG states


def _rng_state(device: torch.device) -> dict[str, Any]:
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(py[0]), "state": torch.tensor(py[1], dtype=torch.int64),
                   "gauss": None if py[2] is None else float(py[2])},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "cuda": [],
    }
    if device.type == "cuda":
        state["cuda"] = [torch.cuda.get_rng_state(device)]
    return state


def _set_rng_state(s: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(s["torch"].cpu())
    py = s["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = s["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].cpu().numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    if device.type == "cuda" and s.get("cuda"):
        torch.cuda.set_rng_state(s["cuda"][0].cpu(), device)


# ------------------------------------------------------------------------------------- files


def _atomic_write_bytes(path: Path, write: Callable[[Any], None], suffix: str = ".tmp") -> None:
    write_with(path, write)


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` (never a half-written file)."""
    path = Path(path)
    _atomic_write_bytes(path, lambda f: torch.save(obj, f))
    return path


def recreate_hint(path: str | Path) -> str:
    """How to get a good copy of a bnnpan file back, from its conventional name ``models/<dataset>/<x>``."""
    path = Path(path)
    dataset = path.parent.name or "<dataset>"
    if path.suffix == ".ckpt":
        return "delete it and re-run: training then starts over from step 0"
    if path.stem in ("prior", "prior_stage1"):
        return f"recreate it with `bnnpan pretrain-prior --dataset {dataset}` (or `dvc checkout`/`dvc repro`)"
    return f"recreate it with `bnnpan train --dataset {dataset} --method {path.stem}` (or `dvc checkout`/`dvc repro`)"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a missing/corrupt file is a :class:`CheckpointError`.

    The error is one line that names the file and how to recreate it. torch's own text is left out on
    purpose: for a file it cannot read it suggests ``weights_only=False``, which would run code from a file
    the user may not trust.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path}: not a valid bnnpan checkpoint (corrupt, truncated or not written by "
                              f"bnnpan; {type(e).__name__}); {recreate_hint(path)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: not a bnnpan checkpoint (no 'model' state_dict); {recreate_hint(path)}")
    return ckpt


def curve_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}_curve.csv")


def _write_curve(path: Path, rows: list[list[float]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CURVE_COLUMNS)
    for r in rows:
        w.writerow([int(r[0])] + ["" if math.isnan(v) else repr(float(v)) for v in r[1:]])
    data = buf.getvalue().encode()
    _atomic_write_bytes(path, lambda f: f.write(data))


# ------------------------------------------------------------------------------------ helpers


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    main = _main_scheduler(opt, cfg)
    if not cfg.warmup:
        return main
    # Linear warm-up: Adam's first steps move every weight by ~lr, which throws a network
    # that starts at EXP far off (loss x10 at step 2 without it).
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / (cfg.warmup + 1), total_iters=cfg.warmup)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[cfg.warmup])


def _main_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.iterations - cfg.warmup),
                                                          eta_min=cfg.lr_min)
    if cfg.lr_schedule == "step":
        step = cfg.lr_step or max(1, cfg.iterations // 3)
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=cfg.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _set_progress(model: nn.Module, p: float) -> None:
    for m in model.modules():
        fn = getattr(m, "set_progress", None)
        if callable(fn):
            fn(p)


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean L1 over all pixels and mean per-patch PSNR (peak 1: data divided by the scale), in eval mode."""
    was_training = model.training
    model.eval()
    abs_sum, count, psnrs = 0.0, 0, []
    try:
        for b in loader:
            lms, pan, gt = (b[k].to(device, non_blocking=True) for k in ("lms", "pan", "gt"))
            out = call_model(model, bool(getattr(model, "wants_gt", False)), lms, pan, gt)[0].float()
            err = out - gt
            abs_sum += float(err.abs().sum(dtype=torch.float64))
            count += err.numel()
            mse = err.double().pow(2).flatten(1).mean(1)
            psnrs.append((10 * torch.log10(1.0 / mse.clamp_min(1e-30))).cpu())
    finally:
        model.train(was_training)
    return {"val/l1": abs_sum / count, "val/psnr": float(torch.cat(psnrs).mean())}


def _progress_bar(enabled: bool, total: int, start: int):
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True))
    task = prog.add_task("train", total=total, completed=start, info="")
    return prog, task


# --------------------------------------------------------------------------------------- train


def train(model: nn.Module, train_path: str | Path, valid_path: str | Path | None, cfg: TrainConfig,
          out_path: str | Path, *, device: str | torch.device = "cpu", progress: bool = True,
          log_fn: LogFn | None = None, resume: bool = True, net_meta: dict[str, Any] | None = None,
          scale: float | None = None, params_digest: str = "") -> dict[str, float]:
    """Train ``model`` (``forward(lms, pan) -> hrms``) on ``train_path``; returns the final metrics.

    ``log_fn(metrics, step)`` receives ``{"train/loss", "lr"}`` every ``cfg.log_every`` steps and
    ``{"val/l1", "val/psnr"}`` at each validation (rank 0 only); an exception it raises aborts the run
    (the last checkpoint stays). ``resume``: continue from ``out_path.with_suffix(".ckpt")`` when it
    exists and carries the same ``params_digest`` (another digest: warn and start over; an unreadable
    file: :class:`CheckpointError`). ``net_meta`` (``{"name", "in_channels", "width", "depth", "ratio",
    "extra"}``) and ``scale`` (the training file's; another value is an error) are stored in every checkpoint so the
    model can be rebuilt from the registry. Returns ``{"step", "val_l1", "val_psnr", "train_loss",
    "seconds", "patches_per_s"}`` (patches per second over the optimisation steps of this call,
    global over ranks). The model is left on ``device`` in eval mode with the final weights.
    """
    t_start = time.perf_counter()
    out_path = Path(out_path)
    ckpt_path = out_path.with_suffix(".ckpt")
    curve_file = curve_path(out_path)

    world, rank, local_rank = _dist_env()
    distributed = world > 1
    from bnnpan.devices import resolve_device

    # `cuda` -> the current GPU (the rank's own under torchrun): set_device and DDP need an index.
    dev = resolve_device(device, local_rank if distributed else None)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    own_pg = False
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        own_pg = True
    if distributed:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    main = rank == 0

    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if cfg.deterministic:
            if dev.type == "cpu":
                torch.use_deterministic_algorithms(True)
            else:  # full determinism on CUDA also needs CUBLAS_WORKSPACE_CONFIG; best effort here
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        return _train(model, Path(train_path), None if valid_path is None else Path(valid_path), cfg, out_path,
                      ckpt_path, curve_file, dev, progress and main, log_fn, resume, net_meta, scale,
                      params_digest, distributed, world, rank, main, t_start)
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn
        if own_pg and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(model: nn.Module, train_path: Path, valid_path: Path | None, cfg: TrainConfig, out_path: Path,
           ckpt_path: Path, curve_file: Path, dev: torch.device, progress: bool, log_fn: LogFn | None,
           resume: bool, net_meta: dict[str, Any] | None, scale: float | None, params_digest: str,
           distributed: bool, world: int, rank: int, main: bool, t_start: float) -> dict[str, float]:
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)

    train_ds = PanDataset(train_path, augment=False)  # transforms come from the sampler
    if "gt" not in train_ds.keys:
        raise ValueError(f"{train_path}: no 'gt' array: training needs a reduced-resolution file")
    valid_loader = None
    if valid_path is not None and main:
        valid_ds = PanDataset(valid_path)
        if "gt" not in valid_ds.keys:
            raise ValueError(f"{valid_path}: no 'gt' array: validation needs a reduced-resolution file")
        if valid_ds.scale != train_ds.scale:
            raise ValueError(f"{valid_path}: scale {valid_ds.scale} != {train_path}'s {train_ds.scale}")
        valid_loader = DataLoader(valid_ds, batch_size=cfg.batch_size, shuffle=False,
                                  num_workers=0)
    if scale is not None and float(scale) != train_ds.scale:
        raise ValueError(f"scale={scale} differs from {train_path}'s scale attribute {train_ds.scale}")
    scale = train_ds.scale
    net_meta = dict(net_meta or {})

    model.to(dev)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _make_scheduler(opt, cfg)
    sampler = InfiniteBatchSampler(len(train_ds), cfg.batch_size, cfg.seed, cfg.augment, rank, world)
    curve: list[list[float]] = []
    start = 0

    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=dev)
        if ckpt.get("params_digest", None) != params_digest:
            if main:  # said once (one channel, rank 0): the run starts over, the old checkpoint is replaced
                log.warning("%s: checkpoint of other parameters (digest %r != %r); discarding it, %s starts over "
                            "from step 0", ckpt_path, ckpt.get("params_digest"), params_digest, out_path.stem)
        else:
            try:
                model.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["optimizer"])
                sched.load_state_dict(ckpt["scheduler"])
                sampler.load_state_dict(ckpt["rng"]["sampler"])
                _set_rng_state(ckpt["rng"], dev)
                start = int(ckpt["step"])
                curve = [list(r) for r in ckpt["curve"].tolist()] if "curve" in ckpt else []
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{ckpt_path}: checkpoint does not fit this model/config: {e}. "
                                      "Delete it (or pass resume=False) to start over.") from None
            if start > cfg.iterations:
                raise CheckpointError(f"{ckpt_path}: checkpoint at step {start} > iterations {cfg.iterations}")
            curve = [r for r in curve if r[0] <= start]
            if main:
                log.info("resuming %s from step %d of %d (%s)", out_path.stem, start, cfg.iterations, ckpt_path)

    wants_gt = bool(getattr(model, "wants_gt", False))
    net: nn.Module = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=dev.type == "cuda", persistent_workers=False)

    def checkpoint_dict(step: int) -> dict[str, Any]:
        rng = _rng_state(dev)
        rng["sampler"] = sampler.state_before(step)
        return {"version": CKPT_VERSION, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": int(step), "rng": rng, "params_digest": params_digest,
                "net": net_meta, "scale": scale, "train_config": cfg.to_dict(),
                "curve": torch.tensor(curve, dtype=torch.float64).reshape(-1, len(CURVE_COLUMNS))}

    def write_checkpoint(step: int) -> None:
        if main:
            save_checkpoint(checkpoint_dict(step), ckpt_path)
            _write_curve(curve_file, curve)
        if distributed:
            torch.distributed.barrier()

    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, loss on device) not yet synced
    window: list[float] = []
    last_val: dict[str, float] = {}
    if curve:
        vals = [r for r in curve if not math.isnan(r[3])]
        if vals:
            last_val = {"val/l1": vals[-1][3], "val/psnr": vals[-1][4]}
    last_loss = curve[-1][1] if curve else math.nan

    def flush(step: int, log_now: bool) -> None:
        nonlocal last_loss
        if pending:
            losses = torch.stack([p[2] for p in pending]).double()
            if distributed:
                torch.distributed.all_reduce(losses)
                losses /= world
            for (s, lr, _), v in zip(pending, losses.cpu().tolist(), strict=True):
                if not math.isfinite(v):
                    raise FloatingPointError(f"training loss is {v} at step {s} ({train_path}); lower lr?")
                curve.append([float(s), v, lr, math.nan, math.nan])
                window.append(v)
            last_loss = curve[-1][1]
            pending.clear()
        if log_now and window and main and log_fn is not None:
            log_fn({"train/loss": float(np.mean(window)), "lr": curve[-1][2]}, step)
        if log_now:
            window.clear()

    def run_validation(step: int) -> None:
        nonlocal last_val
        if valid_loader is None:
            return
        last_val = validate(model, valid_loader, dev)
        if curve and int(curve[-1][0]) == step:
            curve[-1][3], curve[-1][4] = last_val["val/l1"], last_val["val/psnr"]
        if log_fn is not None:
            log_fn(dict(last_val), step)

    prog, task = _progress_bar(progress, cfg.iterations, start)
    train_time, steps_done = 0.0, 0
    step = start
    with prog if prog is not None else contextlib.nullcontext():
        it = iter(loader)
        while step < cfg.iterations:
            t0 = time.perf_counter()
            batch = next(it)
            _set_progress(model, step / cfg.iterations)
            lms, pan, gt = (batch[k].to(dev, non_blocking=True) for k in ("lms", "pan", "gt"))
            lr = float(opt.param_groups[0]["lr"])
            loss = optimizer_step(net, model, opt, wants_gt, lms, pan, gt, cfg)
            sched.step()
            step += 1
            pending.append((step, lr, loss.detach()))
            is_last = step == cfg.iterations
            do_val = is_last or (cfg.val_every > 0 and step % cfg.val_every == 0)
            do_ckpt = is_last or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0)
            do_log = step % cfg.log_every == 0 or is_last
            if do_log or do_val or do_ckpt or (progress and not distributed):  # same steps on every rank
                flush(step, do_log)
            train_time += time.perf_counter() - t0
            steps_done += 1
            if do_val and main:
                run_validation(step)
            if do_ckpt:
                write_checkpoint(step)
            if prog is not None:
                its = steps_done / max(train_time, 1e-9)
                psnr = f" val PSNR {last_val['val/psnr']:.2f} dB" if last_val else ""
                prog.update(task, completed=step, info=f"loss {last_loss:.4g}{psnr} {its:.1f} it/s")
        del it  # shuts DataLoader workers down

    if step == start and main:  # nothing left to train (resumed a finished run): validate again
        if valid_loader is not None:
            last_val = validate(model, valid_loader, dev)
        write_checkpoint(step)
    elif step == start and distributed:
        torch.distributed.barrier()

    if main:
        final = {"version": CKPT_VERSION, "model": model.state_dict(), "step": int(step),
                 "params_digest": params_digest, "net": net_meta, "scale": scale, "train_config": cfg.to_dict(),
                 "metrics": {k.replace("/", "_"): float(v) for k, v in last_val.items()}}
        save_checkpoint(final, out_path)
        _write_curve(curve_file, curve)
    if distributed:
        torch.distributed.barrier()
    model.eval()
    return {"step": int(step), "val_l1": float(last_val.get("val/l1", math.nan)),
            "val_psnr": float(last_val.get("val/psnr", math.nan)), "train_loss": float(last_loss),
            "seconds": time.perf_counter() - t_start,
            "patches_per_s": steps_done * cfg.batch_size / train_time if train_time > 0 else 0.0}
