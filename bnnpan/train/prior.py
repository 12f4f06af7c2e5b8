"""The ``pretrain_prior`` stage: BNNPan's latent diffusion prior, in two steps, with the one training loop.

1. **Stage 1** (``models/<dataset>/prior_stage1.pt``): E1 (sees gt, lms, pan) trained jointly with the oracle
   BNNPan network that consumes its latent z, with the shared recipe (``train.defaults``) for
   ``prior.stage1_iterations`` steps. z learns what the binary body cannot recover by itself (DiffIR stage 1).
2. **Stage 2** (``models/<dataset>/prior.pt``): starting from stage 1, E1 and the body frozen, E2 + the latent
   denoiser learn to reproduce E1's z from (lms, pan) alone through the diffusion chain (``add_noise`` to step
   T-1, T reverse steps), loss ``L1(z_hat, z_gt)`` (+ optional KL), for ``prior.stage2_iterations`` steps at
   ``prior.stage2_lr``. Its validation fuses with the *sampled* z (fixed seed), the test-time path.

Both steps resume from their own ``.ckpt`` like every training; the resume digest of stage 2 includes stage
1's final file, so a new stage 1 restarts stage 2. The switches of the stage-1 network (BWTC, FP statistics,
CDC) are the full method's unless ``prior.network`` sets them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bnnpan.config import Params, run_name
from bnnpan.data.hdf5io import read_attrs
from bnnpan.environment import resolve_threads, run_environment
from bnnpan.models.bnnpan import BNNPanNet, BNNPanSwitches
from bnnpan.train.loop import CheckpointError, TrainConfig, load_checkpoint, train
from bnnpan.train.run import _threads, prior_file


def prior_switches(params: Params) -> dict[str, Any]:
    """The BNNPan switches the prior is pretrained with: the ``prior`` section's, ``prior.network`` on top.

    Only E1 / E2 / the denoiser leave this stage (every BNNPan method trains its own body), so the stage-1
    network need not match a method's switches; it depends on the ``prior`` section alone, and a method's
    recipe (e.g. its lr) does not re-run the prior.
    """
    sw = {**params.prior.switches(), **params.prior.network}
    BNNPanSwitches.from_dict(sw)  # an unknown switch is an error here, not deep inside a run
    return sw


def _digest(blob: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def pretrain_prior(params: Params, dataset: str, *, seed: int | None = None, track: bool = True, resume: bool = True,
                   progress: bool = True) -> dict[str, Any]:
    """Run both stages for ``dataset`` with training seed ``seed`` (default: the first of ``train.seeds``);
    returns ``{"stage1": metrics, "stage2": metrics}``. Seed s > 0 writes ``prior_stage1_seed<s>.pt`` and
    ``prior_seed<s>.pt``, which the BNNPan runs of that seed load."""
    seed = params.train.seeds[0] if seed is None else seed
    params.need_split(dataset, "train", "pretrain the prior")
    prepared = Path(params.paths.prepared) / dataset
    attrs = read_attrs(prepared / "train.h5")
    manifest = json.loads((prepared / "manifest.json").read_text())
    channels = len(attrs["bands"])
    pc = params.prior
    sw = prior_switches(params)
    sw1 = BNNPanSwitches.from_dict({**sw, "ldpc": "oracle"})
    sw2 = BNNPanSwitches.from_dict({**sw, "ldpc": "diffusion"})
    base = params.train.defaults.model_dump()
    rec1 = {**base, "iterations": pc.stage1_iterations, "warmup": min(base["warmup"], pc.stage1_iterations - 1)}
    rec2 = {**base, "iterations": pc.stage2_iterations, "lr": pc.stage2_lr,
            "warmup": min(base["warmup"], pc.stage2_iterations - 1)}
    out1 = Path(params.paths.models) / dataset / f"{run_name('prior_stage1', seed)}.pt"
    out2 = prior_file(params, dataset, seed)
    out2.parent.mkdir(parents=True, exist_ok=True)
    common = {"dataset": dataset, "seed": seed, "width": params.model.width, "depth": params.model.depth,
              "zero_init_tail": params.model.zero_init_tail, "data": manifest["files"]["train.h5"]["sha256"],
              "threads": resolve_threads(params.threads)[0]}  # bit-for-bit resume needs the same thread count
    d1 = _digest({**common, "stage": 1, "switches": asdict(sw1), "train": rec1})
    scale = float(attrs["scale"])
    _, threads_source = _threads(params)

    def meta(name: str, s: BNNPanSwitches) -> dict[str, Any]:
        return {"name": name, "in_channels": channels, "width": params.model.width, "depth": params.model.depth,
                "ratio": int(attrs["ratio"]), "extra": s.to_dict(), "zero_init_tail": params.model.zero_init_tail}

    def run(log_prefix: str | None) -> dict[str, Any]:
        def log_fn(prefix: str):
            if log_prefix is None:
                return None
            from bnnpan import tracking

            return lambda metrics, step: tracking.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()},
                                                              step=step)

        torch.manual_seed(seed)
        net1 = BNNPanNet(channels, params.model.width, params.model.depth, sw1, params.model.zero_init_tail,
                         role="stage1")
        r1 = train(net1, prepared / "train.h5", prepared / "valid.h5", TrainConfig(seed=seed, **rec1), out1,
                   device=params.device, progress=progress, resume=resume, net_meta=meta("bnnpan_stage1", sw1),
                   scale=scale, params_digest=d1, log_fn=log_fn("stage1"))
        d2 = _digest({**common, "stage": 2, "switches": asdict(sw2), "train": rec2,
                      "stage1": hashlib.sha256(out1.read_bytes()).hexdigest()})
        torch.manual_seed(seed)
        net2 = BNNPanNet(channels, params.model.width, params.model.depth, sw2, params.model.zero_init_tail,
                         role="stage2")
        state1 = load_checkpoint(out1)["model"]
        missing, unexpected = net2.load_state_dict(state1, strict=False)
        fresh = ("prior.e2.", "prior.denoiser.")
        if unexpected or any(not k.startswith(fresh) for k in missing):
            raise CheckpointError(f"{out1}: stage-1 network does not match stage 2 (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        r2 = train(net2, prepared / "train.h5", prepared / "valid.h5", TrainConfig(seed=seed, **rec2), out2,
                   device=params.device, progress=progress, resume=resume, net_meta=meta("bnnpan_prior", sw2),
                   scale=scale, params_digest=d2, log_fn=log_fn("stage2"))
        return {"stage1": r1, "stage2": r2}

    if not track:
        return run(None)
    from bnnpan import tracking
    from bnnpan.devices import resolve_device

    with tracking.stage_run(params, f"pretrain_prior_{dataset}{run_name('', seed)}",
                            {"dataset": dataset, "method": "bnnpan_prior", "seed": str(seed)}):
        tracking.log_environment(run_environment(resolve_device(params.device), threads_source))
        tracking.log_params({"dataset": dataset, "seed": seed, "device": params.device,
                             **{f"prior.{k}": v for k, v in pc.model_dump().items()},
                             **{f"switches.{k}": v for k, v in sw1.to_dict().items() if k != "ldpc"},
                             **{f"stage1.{k}": v for k, v in rec1.items()},
                             **{f"stage2.{k}": v for k, v in rec2.items()}})
        result = run("prior")
        tracking.log_metrics({f"final/{s}_{k}": float(v) for s, r in result.items() for k, v in r.items()
                              if isinstance(v, (int, float))})
        for f in (out1, out2):
            curve = f.with_name(f"{f.stem}_curve.csv")
            if curve.is_file():
                tracking.log_artifact(curve)
        tracking.log_artifact(out2, artifact_path="checkpoint")
    return result
