"""Import the field's ready-made datasets (PanCollection) as a prepared dataset.

A dataset with ``source: pancollection`` names the files a user already has (``train``, ``valid``,
``test_rr``, ``test_fr``: local paths or ``{url, sha256}``, downloaded and verified by
:func:`bnnpan.data.download.resolve`). :func:`import_dataset` validates them and writes
``data/prepared/<dataset>/{train,valid,test_rr,test_fr}.h5`` + ``manifest.json`` exactly as
:func:`bnnpan.data.prepare.prepare_dataset` would (same keys, attributes, provenance datasets,
one-sample Fletcher-32 chunks, manifest sha256), so ``train``, ``pretrain-prior``, ``evaluate`` and
``report`` run on it unchanged.

Inputs (the formats the field distributes; ``shared/design/protocol.md``):

* **HDF5** (``train_wv3.h5``, ``test_wv3_multiExm1.h5``, ...): datasets ``gt``, ``lms``, ``ms``, ``pan``,
  N x C x H x W (``pan`` N x 1 x H x W; N x H x W accepted), float64 or integer DN, **no attributes**;
* **MATLAB** ``.mat`` v5 (scipy) or v7.3 (HDF5 with MATLAB's header, read with h5py, transposed):
  the same variables as N x H x W x C (``pan`` N x H x W), optionally ``sensor`` (``WV3``, ...) and
  ``L`` (bit depth).

Full-resolution files (``test_fr``) need ``lms``, ``ms``, ``pan`` (a ``gt`` there is ignored); the others
also ``gt``.

**Validated before anything appears in data/prepared/<dataset>/** (every problem is one
:class:`~bnnpan.data.scene.SceneError` line naming the file, the dataset and the problem):
the variables are present; arrays are 4-D with one N; the band count is the sensor's (or ``bands:``);
``pan``, ``lms`` (and ``gt``) share one size, ``ratio`` times ``ms``'s; reduced-resolution test tiles
hold ``evaluate.border_cut`` plus one ``evaluate.block`` and full-resolution ones a whole number of
blocks; every value is finite; the *measured* DN (``gt``, and the full-resolution ``pan`` and ``ms``)
lie in [0, scale]. The *degraded* arrays (reduced-resolution ``ms``/``pan`` and every ``lms``) come out
of filters with negative lobes (MTF, bicubic shrink, the 23-tap interpolator) that legitimately ring
slightly outside [0, scale] near saturated or dark edges, so they are allowed a margin of
:data:`OVERSHOOT` x scale: enough for ringing, far too little for a wrong scale (16-bit data in an
11-bit dataset is 32x over). The scale is the params' ``scale``/``bits``, else the ``.mat``'s ``L``,
else the sensor's; a maximum below scale / 8 is one warning naming the bit depth the data look like.

**Copy, not link.** The arrays are copied (converted to ``dtype``, float32 by default: exact for integer
DN, ~1e-7 relative for PanCollection's float64 ``lms``) rather than referenced with HDF5 external links:
a link would leave the prepared dataset depending on a file outside the repository that DVC does not
track (moved or edited, and every result silently changes or breaks), could not carry the attributes,
the one-sample Fletcher-32 chunks and the sha256 the loaders check, and would not work for ``.mat``
inputs. The price is disk space (float32: about half the size of a float64 source).

**Memory is bounded whatever the file size.** Sources are read and written in chunks of whole samples
of at most :data:`CHUNK_BYTES` (a 6 GB ``train_wv3.h5`` is never read whole), in one pass that
validates while it writes into a temporary directory beside the output; a problem found anywhere
removes that directory, so the previous output (or nothing) stays. The structure of every file is
checked before any data is read. Exception: a v5 ``.mat`` cannot be read partially, so one variable
at a time is loaded whole (v5 variables are limited to 2 GB anyway).

**Splits.** Files are used as distributed (PanCollection's splits). Without ``valid`` the last
``valid_fraction`` of ``train``'s samples (contiguous, at least one) become ``valid.h5`` and are left
out of ``train.h5``; PanCollection's patches overlap their neighbours, so that validation set is not
spatially independent of training: give ``valid`` when you have it. Missing test files give no test
file; the stage list then has no evaluate stage for the dataset (without ``test_rr``) or evaluate
scores reduced resolution only (without ``test_fr``).

The samples have no georeferencing (said once): ``geotransform`` is in pixel units, ``crs`` None,
``window`` (-1, -1, h, w) (the footprint in the source scene is unknown) and ``source_index`` the
sample's index in its source file.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from bnnpan.atomic import atomic_dir
from bnnpan.config import PanCollectionDataset, Params
from bnnpan.data.download import FetchContext, resolve
from bnnpan.data.hdf5io import write_h5
from bnnpan.data.prepare import check_test_tiles, code_version
from bnnpan.data.scene import SceneError, check_radiometry, likely_bits, resolve_scale, sha256_file
from bnnpan.data.sources import mat_bits, mat_string
from bnnpan.sensors import Sensor, get_sensor, sensor_from_alias

log = logging.getLogger(__name__)

PROVENANCE = "PanCollection import"
#: the largest block of whole samples read (and written) at once
CHUNK_BYTES = 64 * 2**20
#: margin (x scale) allowed outside [0, scale] for degraded arrays (filter ringing; see the module docstring)
OVERSHOOT = 0.25
#: output files in the order they are written (small test files first, so their errors come early)
WRITE_ORDER = ("test_fr", "test_rr", "valid", "train")
SPLITS = ("train", "valid", "test_rr", "test_fr")
KEYS = ("gt", "lms", "ms", "pan")
PIXEL_GEOTRANSFORM = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # GDAL order: pixel units, north up (as .mat scenes)


def _needs(split: str) -> tuple[str, ...]:
    return KEYS[1:] if split == "test_fr" else KEYS


def _measured(split: str, key: str) -> bool:
    """Raw sensor DN (checked against [0, scale] exactly) rather than the output of a degradation filter."""
    return key == "gt" or (split == "test_fr" and key in ("ms", "pan"))


# --------------------------------------------------------------------------------------------- readers
class _Reader:
    """One source file, whatever its format: shapes as N x C x H x W and reads of whole samples."""

    fmt = ""
    variables: list[str]  # the file's array variables / datasets

    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = path, label

    def raw_shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _read(self, key: str, i0: int, i1: int) -> np.ndarray:
        raise NotImplementedError

    def small(self, key: str) -> Any:
        """A small variable (``sensor``, ``L``) as an array, or None when absent."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def shape(self, key: str) -> tuple[int, ...]:
        """N x C x H x W (a 3-D ``pan`` gets its band axis)."""
        s = self.raw_shape(key)
        return (s[0], 1, *s[1:]) if len(s) == 3 else s

    def read(self, key: str, i0: int, i1: int) -> np.ndarray:
        """Samples ``i0:i1`` of ``key`` as N x C x H x W float64 (a damaged file: one SceneError line)."""
        try:
            a = np.asarray(self._read(key, i0, i1), dtype=np.float64)
        except (OSError, KeyError, RuntimeError, ValueError, MatReadError, zlib.error) as e:
            detail = " ".join(str(e).split()) or type(e).__name__
            raise SceneError(f"{self.label}: cannot read {key!r} samples {i0}-{i1 - 1}: the file is truncated or "
                             f"damaged ({detail})") from None
        return a[:, None] if a.ndim == 3 else a


class _H5(_Reader):
    """PanCollection HDF5: N x C x H x W as stored."""

    fmt = "HDF5"

    def __init__(self, path: Path, label: str) -> None:
        super().__init__(path, label)
        self.f = h5py.File(path, "r")
        self.variables = [k for k, v in self.f.items() if isinstance(v, h5py.Dataset)]

    def raw_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.f[key].shape)

    def _read(self, key: str, i0: int, i1: int) -> np.ndarray:
        return self.f[key][i0:i1]

    def small(self, key: str) -> Any:
        return None

    def close(self) -> None:
        self.f.close()


class _Mat73(_H5):
    """MATLAB v7.3 (HDF5, column-major): HDF5 sees N x H x W x C as C x W x H x N."""

    fmt = "MATLAB v7.3"

    def raw_shape(self, key: str) -> tuple[int, ...]:
        return _nchw(tuple(reversed(self.f[key].shape)))

    def _read(self, key: str, i0: int, i1: int) -> np.ndarray:
        return _to_nchw(np.asarray(self.f[key][..., i0:i1]).T)

    def small(self, key: str) -> Any:
        if key not in self.f or not isinstance(self.f[key], h5py.Dataset) or self.f[key].size > 256:
            return None
        return np.asarray(self.f[key][()]).T


class _Mat5(_Reader):
    """MATLAB v5 (scipy): one variable in memory at a time (v5 cannot be read partially)."""

    fmt = "MATLAB v5"

    def __init__(self, path: Path, label: str) -> None:
        super().__init__(path, label)
        if not _v5_complete(path):  # scipy would list the variables before the cut and say nothing
            raise SceneError(f"{label}: the .mat file is truncated (its last variable ends after the end of the file)")
        self.info = {name: shape for name, shape, _ in scipy.io.whosmat(path)}
        self.variables = list(self.info)
        self._cached: tuple[str, np.ndarray] | None = None

    def _load(self, key: str) -> np.ndarray:
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # drop the previous variable before loading the next
            self._cached = (key, scipy.io.loadmat(self.path, variable_names=[key])[key])
        return self._cached[1]

    def raw_shape(self, key: str) -> tuple[int, ...]:
        return _nchw(tuple(self.info[key]))

    def _read(self, key: str, i0: int, i1: int) -> np.ndarray:
        return _to_nchw(self._load(key)[i0:i1])

    def small(self, key: str) -> Any:
        if key not in self.info or math.prod(self.info[key]) > 256:
            return None
        return scipy.io.loadmat(self.path, variable_names=[key])[key]

    def close(self) -> None:
        self._cached = None


def _v5_complete(path: Path) -> bool:
    """Whether every top-level element of a v5 .mat ends inside the file (walks the 8-byte tags, reads no data).

    Layout: a 128-byte header (bytes 126-127 ``IM`` = little-endian), then elements ``(type: u32, nbytes: u32,
    data)``; ``miMATRIX`` (14) data are padded to 8 bytes, ``miCOMPRESSED`` (15) are not; a small element
    (non-zero upper half of ``type``) is the 8-byte tag alone.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        endian = "<" if f.read(128)[126:128] == b"IM" else ">"
        pos = 128
        while pos < size:
            f.seek(pos)
            tag = f.read(8)
            if len(tag) < 8:
                return False
            typ, n = struct.unpack(endian + "II", tag)
            if typ >> 16:
                pos += 8
                continue
            end = pos + 8 + n
            if end > size:
                return False
            pos = end if typ == 15 else (end + 7) // 8 * 8
    return True


def _nchw(matlab_shape: tuple[int, ...]) -> tuple[int, ...]:
    """MATLAB N x H x W x C -> N x C x H x W (N x H x W stays: a PAN)."""
    s = matlab_shape
    return (s[0], s[3], s[1], s[2]) if len(s) == 4 else s


def _to_nchw(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, -1, 1) if a.ndim == 4 else a


def _open(path: Path, label: str) -> _Reader:
    """The reader for ``path`` by content (MATLAB's header text, else HDF5's signature)."""
    try:
        with open(path, "rb") as f:
            head = f.read(128)
        if head.startswith(b"MATLAB 5.0"):
            return _Mat5(path, label)
        if h5py.is_hdf5(path):
            return (_Mat73 if head.startswith(b"MATLAB 7.3") else _H5)(path, label)
    except (OSError, ValueError, TypeError, NotImplementedError, MatReadError, zlib.error) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise SceneError(f"{label}: cannot open it (truncated or damaged?): {detail}") from None
    raise SceneError(f"{label}: neither HDF5 nor a MATLAB .mat (truncated, or another format)")


# ----------------------------------------------------------------------------------------- inspection
@dataclass
class _Source:
    split: str
    path: Path
    record: dict[str, Any]
    reader: _Reader
    label: str
    shapes: dict[str, tuple[int, ...]]
    n: int


def _inspect(src: _Source, n_bands: int, ratio: int, bands: tuple[str, ...]) -> None:
    """Structure checks (no data read): variables, ranks, one N, band counts, sizes and the ratio."""
    r, lab = src.reader, src.label
    missing = [k for k in _needs(src.split) if k not in r.variables]
    if missing:
        hint = ""
        if any(k in r.variables for k in ("I_PAN", "I_MS", "I_MS_LR")):
            hint = "; it looks like one scene's PAN/MS pair: use it as a scene (`source: mat`) instead"
        raise SceneError(f"{lab}: no variable(s) {missing} (variables: {sorted(r.variables)}); a PanCollection "
                         f"file has {list(_needs(src.split))}{hint}")
    shapes = {k: r.shape(k) for k in _needs(src.split)}
    for k, s in shapes.items():
        if len(s) != 4:
            raise SceneError(f"{lab}: {k!r} has shape {r.raw_shape(k)}; expected "
                             f"{'N x H x W x C' if r.fmt.startswith('MATLAB') else 'N x C x H x W'}")
    ns = {s[0] for s in shapes.values()}
    if len(ns) != 1:
        raise SceneError(f"{lab}: the arrays hold different numbers of samples {dict(shapes)}")
    n = ns.pop()
    if n < 1:
        raise SceneError(f"{lab}: no samples")
    layout = "N x H x W x C" if r.fmt.startswith("MATLAB") else "N x C x H x W"
    for k, s in shapes.items():
        want = 1 if k == "pan" else n_bands
        if s[1] != want:
            what = "1 band" if k == "pan" else f"{n_bands} bands ({', '.join(bands)})"
            raise SceneError(f"{lab}: {k!r} has {s[1]} band(s) (shape {r.raw_shape(k)}, read as {layout}), expected "
                             f"{what}{'' if k == 'pan' else '; declare `bands:` for a subset'}")
    hr = shapes["lms"][2:]
    for k in ("pan", "gt"):
        if k in shapes and shapes[k][2:] != hr:
            raise SceneError(f"{lab}: {k!r} is {shapes[k][2]} x {shapes[k][3]} but 'lms' is {hr[0]} x {hr[1]}")
    lr = shapes["ms"][2:]
    if (lr[0] * ratio, lr[1] * ratio) != hr:
        raise SceneError(f"{lab}: 'ms' is {lr[0]} x {lr[1]}, which times the ratio {ratio} is not the "
                         f"{hr[0]} x {hr[1]} of 'pan'/'lms'")
    src.shapes, src.n = shapes, n


def _file_sensor(sources: list[_Source], cfg: PanCollectionDataset, dataset: str) -> Sensor:
    """``sensor:`` from params, else the ``.mat`` files' ``sensor`` variable (they must agree)."""
    found: dict[str, tuple[str, _Source]] = {}
    for s in sources:
        text = mat_string(v) if (v := s.reader.small("sensor")) is not None else None
        if text:
            try:
                found[sensor_from_alias(text).name] = (text, s)
            except ValueError as e:
                if cfg.sensor is None:
                    raise SceneError(f"{s.label}: its `sensor` variable: {' '.join(str(e).split())}; set "
                                     f"`sensor:` on the dataset") from None
    if cfg.sensor is not None:
        sensor = get_sensor(cfg.sensor)
        for name, (text, s) in found.items():
            if name != sensor.name:
                raise SceneError(f"{s.label}: params say sensor {sensor.name!r} but the file's `sensor` is {text!r} "
                                 f"({name}); fix one of them")
        return sensor
    if not found:
        raise SceneError(f"dataset {dataset}: `sensor:` is required (the files carry no `sensor` variable)")
    if len(found) > 1:
        raise SceneError(f"dataset {dataset}: the files name different sensors {sorted(found)}")
    return get_sensor(next(iter(found)))


def _file_bits(sources: list[_Source]) -> tuple[int | None, str]:
    """The bit depth the ``.mat`` files carry (``L``); every file that has one must agree."""
    bits: dict[int, str] = {}
    for s in sources:
        v = s.reader.small("L")
        if v is not None:
            bits.setdefault(mat_bits(v, s.path), s.label)
    if len(bits) > 1:
        raise SceneError("the files carry different bit depths `L`: " + ", ".join(f"{b} ({lab})" for b, lab in
                                                                                   bits.items()))
    if not bits:
        return None, ""
    b, lab = next(iter(bits.items()))
    return b, lab


# --------------------------------------------------------------------------------------------- copying
def _chunks(n: int, sample_shape: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    per = max(1, CHUNK_BYTES // (8 * math.prod(sample_shape)))
    for i in range(0, n, per):
        yield i, min(n, i + per)


@dataclass
class _Out:
    """One output file: samples ``i0:i1`` of a source."""

    split: str
    src: _Source
    i0: int
    i1: int

    @property
    def n(self) -> int:
        return self.i1 - self.i0


def _copy(out: _Out, f: h5py.File, dtype: np.dtype, scale: float, stats: dict[str, Any],
          step: Callable[[], None]) -> None:
    """Copy ``out``'s arrays chunk by chunk into ``f``, checking every value on the way."""
    src = out.src
    for key in _needs(out.split):
        shape = src.shapes[key]
        ds = f.create_dataset(key, shape=(out.n, *shape[1:]), dtype=dtype, chunks=(1, *shape[1:]), fletcher32=True)
        measured = _measured(out.split, key)
        lo, hi = (0.0, scale) if measured else (-OVERSHOOT * scale, (1 + OVERSHOOT) * scale)
        for a, b in _chunks(out.n, shape[1:]):
            block = src.reader.read(key, out.i0 + a, out.i0 + b)
            finite = np.isfinite(block)
            if not finite.all():
                i = out.i0 + a + int(np.argwhere(~finite)[0][0])
                raise SceneError(f"{src.label}: {key!r} contains NaN or inf (sample {i})")
            bmin, bmax = float(block.min()), float(block.max())
            if bmax > hi or bmin < lo:
                bad = bmax if bmax > hi else bmin
                i = out.i0 + a + int(np.argwhere((block > hi) | (block < lo))[0][0])
                allowed = "[0, scale]" if measured else f"[-{OVERSHOOT:g}, {1 + OVERSHOOT:g}] x scale (filter ringing)"
                hint = (f"the data look {likely_bits(bad)}-bit: declare `bits: {likely_bits(bad)}` (or the right "
                        "`scale:`) on the dataset" if bad > hi else "DN cannot be negative")
                raise SceneError(f"{src.label}: {key!r} has DN {bad:g} (sample {i}) outside {allowed} with scale "
                                 f"{scale:g} (from {stats['source']}); {hint}")
            if measured:
                stats["max"] = max(stats["max"], bmax)
            ds[a:b] = block.astype(dtype)
            step()


def _provenance(out: _Out, scene_index: int) -> dict[str, np.ndarray]:
    """The per-sample datasets prepare writes beside the arrays (no scene footprint is known here)."""
    n = out.n
    h, w = out.src.shapes["gt" if "gt" in _needs(out.split) else "ms"][2:]
    return {
        "scene_index": np.full(n, scene_index, dtype=np.int16),
        "window": np.tile(np.asarray([-1, -1, h, w], dtype=np.int32), (n, 1)),  # footprint unknown
        "geotransform": np.tile(np.asarray(PIXEL_GEOTRANSFORM, dtype=np.float64), (n, 1)),
        "source_index": np.arange(out.i0, out.i1, dtype=np.int64),  # the sample's index in its source file
    }


# ------------------------------------------------------------------------------------------ the import
def import_dataset(params: Params, dataset: str, out_dir: str | Path | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Validate and copy a ``source: pancollection`` dataset into ``data/prepared/<dataset>/``; return the manifest."""
    cfg = params.datasets[dataset]
    assert isinstance(cfg, PanCollectionDataset)
    out_dir = Path(out_dir or Path(params.paths.prepared) / dataset)
    ctx = FetchContext(downloads=Path(params.paths.downloads), progress=False)  # inside the caller's progress bar
    sources: list[_Source] = []
    try:
        for split, loc in cfg.files().items():
            if progress:
                progress(f"{dataset}: checking {split}", 0, 0)
            path, record = resolve(loc, ctx, what=f"dataset {dataset} {split} file")
            label = f"{path}: dataset {dataset} ({split})"
            reader = _open(path, label)
            sources.append(_Source(split, path, record, reader, label, {}, 0))
        return _import(params, cfg, dataset, out_dir, sources, progress)
    finally:
        for s in sources:
            s.reader.close()


def _import(params: Params, cfg: PanCollectionDataset, dataset: str, out_dir: Path, sources: list[_Source],
            progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    sensor = _file_sensor(sources, cfg, dataset)
    try:
        bands, _ = sensor.select(cfg.bands)
    except ValueError as e:
        raise SceneError(f"dataset {dataset}: {' '.join(str(e).split())}") from None
    ratio = sensor.ratio
    for s in sources:
        _inspect(s, len(bands), ratio, bands)
        if s.split == "test_rr":
            check_test_tiles(min(s.shapes["lms"][2:]), 0, params, s.label)
        elif s.split == "test_fr":
            for side in s.shapes["lms"][2:]:
                check_test_tiles(0, side, params, s.label)
    by_split = {s.split: s for s in sources}
    file_bits, bits_label = _file_bits(sources)
    where = bits_label or f"dataset {dataset}"
    scale, scale_source = resolve_scale(cfg.declared_scale(), file_bits, sensor, where, key="dataset")

    # What goes where: the files as distributed; without `valid`, the tail of `train`.
    outs: dict[str, _Out] = {}
    valid_split = None
    for s in sources:
        outs[s.split] = _Out(s.split, s, 0, s.n)
    if "train" in by_split and "valid" not in by_split:
        tr = by_split["train"]
        n_valid = max(1, round(cfg.valid_fraction * tr.n))
        if tr.n - n_valid < 1:
            raise SceneError(f"{tr.label}: {tr.n} sample(s) cannot be split into train and validation sets "
                             f"(valid_fraction={cfg.valid_fraction}); give `valid`")
        outs["train"] = _Out("train", tr, 0, tr.n - n_valid)
        outs["valid"] = _Out("valid", tr, tr.n - n_valid, tr.n)
        valid_split = {"from": "train", "samples": [tr.n - n_valid, tr.n], "valid_fraction": cfg.valid_fraction}

    names = _scene_names(sources)
    scene_of = {s.split: i for i, s in enumerate(sources)}
    dtype = np.dtype(cfg.dtype)
    settings = {
        **cfg.model_dump(mode="json"),
        "provenance": PROVENANCE, "valid_split": valid_split, "scale_source": scale_source,
        "test_tile_used": by_split["test_rr"].shapes["lms"][2] if "test_rr" in by_split else None,
        "fr_tile_used": by_split["test_fr"].shapes["lms"][2] if "test_fr" in by_split else None,
    }
    common = {
        "sensor": sensor.name, "ratio": ratio, "scale": scale, "bands": list(bands),
        "rgb": list(sensor.rgb_indices(tuple(bands)) or []), "scenes": names,
        "crs": dict.fromkeys(names), "code_version": code_version(), "dataset": dataset,
        "settings": settings,
        "value_unit": "DN (divide by scale)", "provenance": PROVENANCE,
    }
    total = sum(len(list(_chunks(o.n, o.src.shapes[k][1:]))) for o in outs.values() for k in _needs(o.split))
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(f"{dataset}: copying", done, total)

    log.info("dataset %s: PanCollection files carry no georeferencing: the prepared tiles (and fused GeoTIFFs) "
             "are in pixel coordinates", dataset)
    stats: dict[str, Any] = {"max": 0.0, "source": scale_source}
    files: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        for split in WRITE_ORDER:
            if split not in outs:
                continue
            out = outs[split]
            attrs = {**common, "split": split.split("_")[0],
                     "resolution": "full" if split == "test_fr" else "reduced"}
            if split.startswith("test"):
                attrs["geotransform"] = [list(PIXEL_GEOTRANSFORM)] * out.n if out.n <= 1000 else "see dataset"
            # The small datasets and the attributes as prepare writes them, then the arrays, chunk by chunk.
            path = write_h5(tmp / f"{split}.h5", _provenance(out, scene_of[out.src.split]), attrs)
            with h5py.File(path, "r+") as f:
                _copy(out, f, dtype, scale, stats, step)
            files[f"{split}.h5"] = {
                "n": out.n, "dropped_nodata": 0,
                "shapes": {k: [out.n, *out.src.shapes[k][1:]] for k in _needs(split)},
                "source": {"split": out.src.split, "samples": [out.i0, out.i1]},
                "bytes": path.stat().st_size, "sha256": sha256_file(path),
            }
        check_radiometry(stats["max"], scale, scale_source, f"dataset {dataset} ({', '.join(names)})",
                         key="on the dataset")
        manifest = {
            "dataset": dataset, "sensor": sensor.name, "ratio": ratio, "scale": scale, "scale_source": scale_source,
            "bands": list(bands), "dtype": cfg.dtype, "files": {k: files[k] for k in
                                                               (f"{s}.h5" for s in SPLITS) if k in files},
            "provenance": PROVENANCE,
            "scenes": [{"name": n, "role": s.split, "source_file": {**s.record, "format": s.reader.fmt,
                                                                    "variables": sorted(s.reader.variables)},
                        "n": s.n, "crs": None, "licence": cfg.licence, "attribution": cfg.attribution}
                       for n, s in zip(names, sources, strict=True)],
            "settings": settings, "code_version": common["code_version"],
            "split": "as distributed (PanCollection's files)" + (
                f"; valid.h5 = the last {valid_split['samples'][1] - valid_split['samples'][0]} samples of train"
                if valid_split else ""),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if progress:
        progress(f"{dataset}: written to {out_dir}", total, total)
    return manifest


def _scene_names(sources: list[_Source]) -> list[str]:
    """One name per source file: its file name (with the split when two share one)."""
    base = [s.path.name for s in sources]
    return [f"{s.split}:{b}" if base.count(b) > 1 else b for s, b in zip(sources, base, strict=True)]
