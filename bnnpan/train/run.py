"""The ``train`` stage: params -> network + training config -> the one loop, tracked in MLflow.

The resume digest covers everything that defines the run (method, dataset, network,
resolved recipe, seed, and the training file's sha256 from the manifest), so a checkpoint
is only ever continued by the very same run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bnnpan.config import Params, run_name
from bnnpan.data.hdf5io import read_attrs
from bnnpan.environment import apply_threads, resolve_threads, run_environment
from bnnpan.models.networks import NetConfig, build_network
from bnnpan.train.loop import CheckpointError, TrainConfig, load_checkpoint, train


def _threads(params: Params) -> tuple[int, str]:
    """Apply params' ``threads`` (bnnpan.environment.resolve_threads: null = $BNNPAN_THREADS, else every CPU).

    Small convolutions on a shared 2-core machine: oversubscribed threads are ~100x slower; and another
    count changes the float summation order, hence the weights (bnnpan.environment).
    """
    return apply_threads(params.threads)


def prior_file(params: Params, dataset: str, seed: int = 0) -> Path:
    """Where ``pretrain-prior`` writes a dataset's latent prior (E1, E2, denoiser) for training seed ``seed``
    (``prior.pt``; ``prior_seed<s>.pt`` for s > 0: :func:`bnnpan.config.run_name`)."""
    return Path(params.paths.models) / dataset / f"{run_name('prior', seed)}.pt"


def model_file(params: Params, dataset: str, method: str, seed: int = 0) -> Path:
    """The trained weights of one run: ``models/<dataset>/<run_name(method, seed)>.pt``."""
    return Path(params.paths.models) / dataset / f"{run_name(method, seed)}.pt"


def training_digest(params: Params, dataset: str, method: str, seed: int, data_sha256: str,
                    net_cfg: NetConfig | None = None) -> str:
    """The ``params_digest`` of a checkpoint: sha256 of everything that makes the training run what it is.

    The method, its network and config, the resolved recipe, the seed, the training file's sha256, the prior's
    sha256 (BNNPan methods) and the thread count (a checkpoint is continued bit for bit only with the same
    count). A checkpoint whose digest differs is not resumed (:func:`bnnpan.train.loop.train`), and
    ``bnnpan export`` uses it to confirm which training data a checkpoint was made from.
    """
    if net_cfg is None:
        attrs = read_attrs(Path(params.paths.prepared) / dataset / "train.h5")
        net_cfg = NetConfig(in_channels=len(attrs["bands"]), width=params.model.width, depth=params.model.depth,
                            ratio=int(attrs["ratio"]), extra=params.network_extra(method),
                            zero_init_tail=params.model.zero_init_tail)
    prior_sha = None
    if method in params.prior_methods():
        prior = prior_file(params, dataset, seed)
        prior_sha = hashlib.sha256(prior.read_bytes()).hexdigest() if prior.is_file() else "missing"
    return hashlib.sha256(json.dumps({
        "method": method, "network": params.network_of(method), "dataset": dataset, "net": asdict(net_cfg),
        "train": params.train.resolved(method), "seed": seed, "data": data_sha256, "prior": prior_sha,
        "threads": resolve_threads(params.threads)[0],
    }, sort_keys=True, default=str).encode()).hexdigest()


def train_method(params: Params, dataset: str, method: str, *, seed: int | None = None, track: bool = True,
                 resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train ``method`` on ``dataset`` with training seed ``seed`` (default: the first of ``train.seeds``).

    The seed seeds the weight initialisation, the sample order and the augmentation (bnnpan.train.loop); a
    BNNPan method loads the prior pretrained with the same seed.
    """
    seed = params.train.seeds[0] if seed is None else seed
    params.need_split(dataset, "train", f"train {method}")
    prepared = Path(params.paths.prepared) / dataset
    attrs = read_attrs(prepared / "train.h5")
    manifest = json.loads((prepared / "manifest.json").read_text())
    network = params.network_of(method)
    net_cfg = NetConfig(in_channels=len(attrs["bands"]), width=params.model.width, depth=params.model.depth,
                        ratio=int(attrs["ratio"]), extra=params.network_extra(method),
                        zero_init_tail=params.model.zero_init_tail)
    recipe = params.train.resolved(method)
    tcfg = TrainConfig(seed=seed, **{k: v for k, v in recipe.items() if k != "ranks"})  # ranks: how many processes
    if int(os.environ.get("RANK", "0")) != 0:
        track = False  # under torchrun, rank 0 alone logs the run to MLflow (the loop writes files on rank 0 only)
    prior_path = prior_file(params, dataset, seed) if method in params.prior_methods() else None
    if prior_path is not None and not prior_path.is_file():
        raise CheckpointError(f"{prior_path}: {method} needs the pretrained latent prior; run "
                              f"`bnnpan pretrain-prior --dataset {dataset} --seed {seed}` first")
    digest = training_digest(params, dataset, method, seed, manifest["files"]["train.h5"]["sha256"], net_cfg)
    _, threads_source = _threads(params)
    torch.manual_seed(seed)
    model = build_network(network, net_cfg)
    if prior_path is not None:
        try:
            model.load_prior(load_checkpoint(prior_path)["model"])
        except ValueError as e:
            raise CheckpointError(f"{prior_path}: {e}; re-run `bnnpan pretrain-prior --dataset {dataset} "
                                  f"--seed {seed}`") from None
    out = model_file(params, dataset, method, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"name": network, "method": method, "seed": seed, **asdict(net_cfg)}
    kwargs = dict(device=params.device, progress=progress, resume=resume, net_meta=meta,
                  scale=float(attrs["scale"]), params_digest=digest)
    if not track:
        return train(model, prepared / "train.h5", prepared / "valid.h5", tcfg, out, **kwargs)
    from bnnpan import tracking
    from bnnpan.devices import resolve_device

    with tracking.stage_run(params, f"train_{dataset}_{run_name(method, seed)}",
                            {"dataset": dataset, "method": method, "seed": str(seed)}):
        tracking.log_environment(run_environment(resolve_device(params.device), threads_source))
        tracking.log_params({"method": method, "network": network, "dataset": dataset, "seed": seed,
                             "device": params.device,
                             **{f"model.{k}": v for k, v in asdict(net_cfg).items() if k != "extra"},
                             **{f"model.extra.{k}": v for k, v in net_cfg.extra.items()},
                             **{f"train.{k}": v for k, v in recipe.items()}})
        result = train(model, prepared / "train.h5", prepared / "valid.h5", tcfg, out,
                       log_fn=lambda metrics, step: tracking.log_metrics(metrics, step=step), **kwargs)
        tracking.log_metrics({f"final/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))})
        curve = out.with_name(f"{out.stem}_curve.csv")
        if curve.is_file():
            tracking.log_artifact(curve)
        tracking.log_artifact(out, artifact_path="checkpoint")
    return result
