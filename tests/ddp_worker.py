"""Training worker for the loop tests, run as a subprocess.

* under ``python -m torch.distributed.run --nproc_per_node=2 --standalone tests/ddp_worker.py ...``:
  DistributedDataParallel training (gloo), compared with a single-process run by test_train_loop;
* as a plain script with ``--pause-at N --marker FILE``: writes FILE at step N and sleeps, so the
  test can kill it with a real SIGTERM between checkpoints and resume the run.

The model is built after ``torch.manual_seed(seed)`` exactly as the tests build it (:func:`make_model`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnnpan.train.loop import TrainConfig, train  # noqa: E402


class TinyNet(nn.Module):
    """A small full-precision residual conv net with the networks' forward signature (lms, pan)."""

    def __init__(self, channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, lms: torch.Tensor, pan: torch.Tensor) -> torch.Tensor:
        return lms + self.body(torch.cat([lms, pan], dim=1))


def make_model(name: str, seed: int, channels: int = 3, ratio: int = 2) -> tuple[nn.Module, dict]:
    """``tiny`` (this file) or a registry network (``fp``, ``bireal``, ...) built after seeding."""
    torch.manual_seed(seed)
    if name == "tiny":
        return TinyNet(channels), {"name": "tiny", "in_channels": channels, "width": 16, "depth": 0,
                                   "ratio": ratio, "extra": {}}
    from bnnpan.models.networks import NetConfig, build_network

    cfg = NetConfig(in_channels=channels, width=16, depth=2, ratio=ratio)
    meta = {"name": name, "in_channels": channels, "width": 16, "depth": 2, "ratio": ratio, "extra": {}}
    return build_network(name, cfg), meta


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--config", required=True, help="TrainConfig as JSON")
    ap.add_argument("--digest", default="")
    ap.add_argument("--pause-at", type=int, default=0)
    ap.add_argument("--marker", default="")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args()
    cfg = TrainConfig.from_dict(json.loads(a.config))
    model, meta = make_model(a.model, cfg.seed)

    def log_fn(metrics: dict, step: int) -> None:
        if a.pause_at and step == a.pause_at and "train/loss" in metrics:
            Path(a.marker).write_text(str(step))
            time.sleep(120)  # killed here by the test

    res = train(model, a.train, a.valid, cfg, Path(a.out), progress=a.progress, log_fn=log_fn, resume=True,
                net_meta=meta, params_digest=a.digest)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
