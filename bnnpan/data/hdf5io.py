"""PanCollection-compatible HDF5 files.

Layout (the one PanCollection's loaders read, so models trained elsewhere load our files
and ours load theirs):

* ``gt``  N x C x H x W   reference HRMS (reduced-resolution files only)
* ``lms`` N x C x H x W   MS interpolated to the PAN grid with the 23-tap interpolator
* ``ms``  N x C x h x w   low-resolution MS (h = H / ratio)
* ``pan`` N x 1 x H x W   PAN

Values are raw DN (not divided by the scale) stored as **float32** (PanCollection stores
float64; float32 is exact for 16-bit DN and halves the size; ``dtype`` param switches).
Loaders divide by the ``scale`` attribute, never a scale guessed from the data.

Beside the four arrays, each file carries provenance datasets that PanCollection's
loaders ignore: ``scene_index`` (N), ``window`` (N x 4: row, col, height, width of the
sample's footprint on its scene's MS grid) and ``geotransform`` (N x 6, GDAL order, of the
``gt``/``lms`` grid for reduced-resolution files and of the PAN grid for full resolution).
Attributes: sensor, ratio, scale, bands, scenes (JSON), crs (JSON, per scene), split,
resolution (``reduced``/``full``), code_version, settings (JSON).

``prepare`` writes the four arrays as they are made (:class:`SampleWriter`: resizable along N, one
sample per chunk), never holding a whole array; readers see ordinary N x C x H x W datasets.

Integrity: every non-empty dataset is chunked with HDF5's Fletcher-32 checksum filter, so a damaged
chunk is a read error rather than silently different values, and ``manifest.json`` records each file's
sha256, checked (:func:`check_manifest`) before a file is used. Both end in one :class:`HDF5Error` line
naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bnnpan.atomic import atomic_path

ARRAY_KEYS = ("gt", "lms", "ms", "pan")
REQUIRED_ATTRS = ("sensor", "ratio", "scale", "split", "scenes")


class HDF5Error(ValueError):
    """A missing, corrupt or malformed dataset file (the message names the file)."""


def _create(f: h5py.File, key: str, a: np.ndarray) -> None:
    """One whole dataset: one sample per chunk with a Fletcher-32 checksum (an empty one unchunked)."""
    if a.size == 0:  # HDF5 cannot chunk (hence checksum) an empty dataset
        f.create_dataset(key, data=a)
        return
    # One sample per chunk, each chunk with a Fletcher-32 checksum: a flipped byte in the data
    # is an error on read, never a silently different value (PanCollection readers ignore it).
    chunks = (1, *a.shape[1:]) if a.ndim >= 3 else a.shape
    f.create_dataset(key, data=a, chunks=chunks, fletcher32=True)


def _write_attrs(f: h5py.File, attrs: dict[str, Any]) -> None:
    """Dicts and non-numeric lists as JSON strings, None as "null", the rest as they are."""
    for k, v in attrs.items():
        if isinstance(v, (dict, list, tuple)) and not (
            isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v)
        ):
            v = json.dumps(v)
        elif v is None:
            v = "null"
        f.attrs[k] = v


def write_h5(path: str | Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> Path:
    """Write arrays + attributes to ``path`` atomically (temp file in the same dir, then rename).

    Attribute values that are dicts or lists of strings are stored as JSON strings.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = {len(a) for k, a in arrays.items()}
    if len(n) > 1:
        raise ValueError(f"{path}: arrays have different lengths {n}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            for k, a in arrays.items():
                _create(f, k, a)
            _write_attrs(f, attrs)
    return path


class SampleWriter:
    """Append samples to one file as they are made, without holding them: the streaming ``write_h5``.

    Each sample array ``k`` (e.g. ``gt`` C x H x W) goes to a resizable dataset ``N x C x H x W``
    (``maxshape`` ``None`` along N), one sample per chunk with Fletcher-32 as :func:`write_h5`, cast to
    ``dtype`` (the values ``np.stack(samples).astype(dtype)`` would hold). Samples are buffered in
    blocks of about ``block_bytes`` and written with one resize per block, so memory stays one block
    whatever N. :meth:`finish` then writes the per-sample metadata arrays (as :func:`write_h5`) and the
    attributes. Datasets are created in the order of the first sample's keys, then the metadata ones,
    the order :func:`write_h5` gives. The file appears at ``path`` only on a clean exit (temp + rename).

        with SampleWriter(path, np.float32) as w:
            for s in samples: w.append(s)
            w.finish({"window": ...}, attrs)
    """

    def __init__(self, path: str | Path, dtype: Any, block_bytes: int = 8 * 2**20) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.block_bytes = int(block_bytes)
        self.n = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._buf: dict[str, np.ndarray] = {}
        self._fill = 0
        self._stack = contextlib.ExitStack()
        self._f: h5py.File | None = None
        self._finished = False

    def __enter__(self) -> SampleWriter:
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._f = self._stack.enter_context(h5py.File(tmp, "w", track_order=True))
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        if et is None and not self._finished:  # a programming error: never leave a file without metadata
            err = RuntimeError(f"{self.path}: SampleWriter closed without finish()")
            self._stack.__exit__(RuntimeError, err, None)  # closes and removes the temporary file
            raise err
        return bool(self._stack.__exit__(et, ev, tb))

    def append(self, sample: dict[str, np.ndarray]) -> None:
        """Add one sample (same keys and shapes every time)."""
        assert self._f is not None, "use SampleWriter as a context manager"
        if not self.shapes:
            self.shapes = {k: tuple(np.shape(a)) for k, a in sample.items()}
            per = sum(int(np.prod(s)) for s in self.shapes.values()) * self.dtype.itemsize
            block = max(1, self.block_bytes // max(per, 1))
            for k, shp in self.shapes.items():
                self._f.create_dataset(k, shape=(0, *shp), maxshape=(None, *shp), chunks=(1, *shp),
                                       dtype=self.dtype, fletcher32=True)
                self._buf[k] = np.empty((block, *shp), dtype=self.dtype)
        if sample.keys() != self.shapes.keys():
            raise ValueError(f"{self.path}: sample keys {list(sample)} != {list(self.shapes)}")
        for k, a in sample.items():
            if np.shape(a) != self.shapes[k]:
                raise ValueError(f"{self.path}: {k} has shape {np.shape(a)}, expected {self.shapes[k]}")
            self._buf[k][self._fill] = np.asarray(a).astype(self.dtype, copy=False)
        self._fill += 1
        if self._fill == len(next(iter(self._buf.values()))):
            self.flush()

    def flush(self) -> None:
        if not self._fill:
            return
        assert self._f is not None
        for k, b in self._buf.items():
            d = self._f[k]
            d.resize(self.n + self._fill, axis=0)
            d[self.n : self.n + self._fill] = b[: self._fill]
        self.n += self._fill
        self._fill = 0

    def finish(self, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Flush, then write the metadata ``arrays`` (length N each) and the file ``attrs``."""
        assert self._f is not None
        self.flush()
        for k, a in arrays.items():
            if len(a) != self.n:
                raise ValueError(f"{self.path}: {k} has {len(a)} rows for {self.n} samples")
            _create(self._f, k, a)
        _write_attrs(self._f, attrs)
        self._buf.clear()
        self._finished = True


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "[{n":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The file's attributes, JSON values decoded."""
    with open_h5(path) as f, h5_errors(path, "read its attributes"):
        return {k: _decode(v) for k, v in f.attrs.items()}


@contextlib.contextmanager
def h5_errors(path: str | Path, what: str) -> Iterator[None]:
    """Turn HDF5's errors on a damaged file into one :class:`HDF5Error` line naming the file.

    A damaged object header surfaces as ``KeyError`` ("bad object header version number"), a failed
    Fletcher-32 checksum or a truncated chunk as ``OSError``; some low-level failures as ``RuntimeError``.
    """
    try:
        yield
    except HDF5Error:
        raise
    except (OSError, KeyError, RuntimeError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0].strip("'\"")
        raise HDF5Error(f"{path}: cannot {what}: the file is corrupt or truncated ({detail}); "
                        f"{REMEDY}") from None


REMEDY = "restore it with `dvc checkout` or recreate it with `bnnpan prepare`"


def open_h5(path: str | Path) -> h5py.File:
    """Open a dataset file read-only, turning a missing or corrupt file into :class:`HDF5Error`."""
    path = Path(path)
    if not path.is_file():
        raise HDF5Error(f"{path}: dataset file not found (run `bnnpan prepare`)")
    with h5_errors(path, "open it as HDF5"):
        return h5py.File(path, "r")


def check_manifest(path: str | Path) -> None:
    """Compare ``path``'s sha256 with the one ``manifest.json`` (beside it) recorded when it was prepared.

    Catches any change after ``prepare``: a flipped byte in array data that no HDF5 check sees (files
    written before the Fletcher-32 checksums, or bytes outside the checksummed chunks). Files without a
    manifest entry (e.g. PanCollection files used as they are) are not checked here.
    """
    path = Path(path)
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        return
    try:
        entry = json.loads(manifest.read_text())["files"][path.name]
        want = entry["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return
    if not path.is_file():
        raise HDF5Error(f"{path}: dataset file not found (listed in {manifest}); {REMEDY}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    if h.hexdigest() != want:
        raise HDF5Error(f"{path}: contents differ from the sha256 in {manifest.name} (changed or corrupted "
                        f"after prepare); {REMEDY}")


def validate_h5(path: str | Path) -> dict[str, Any]:
    """Check keys, shapes and attributes; return a summary ``{"n": N, "shapes": {...}, "attrs": {...}}``.

    Reads every array once (in blocks of ~64 MiB, whatever the file size), so a truncated file is caught
    here rather than mid-training.
    """
    path = Path(path)
    check_manifest(path)
    with open_h5(path) as f, h5_errors(path, "read it"):
        missing = [k for k in REQUIRED_ATTRS if k not in f.attrs]
        if missing:
            raise HDF5Error(f"{path}: missing attribute(s) {missing}")
        keys = [k for k in ARRAY_KEYS if k in f]
        need = ("lms", "ms", "pan")
        if any(k not in f for k in need):
            raise HDF5Error(f"{path}: missing dataset(s) {[k for k in need if k not in f]}; has {list(f)}")
        ratio = int(f.attrs["ratio"])
        shapes = {k: tuple(f[k].shape) for k in keys}
        n = shapes["pan"][0]
        for k, s in shapes.items():
            if len(s) != 4 or s[0] != n:
                raise HDF5Error(f"{path}: {k} has shape {s}, expected N x C x H x W with N={n}")
        H, W = shapes["pan"][2:]
        if shapes["lms"][2:] != (H, W) or shapes["ms"][2:] != (H // ratio, W // ratio):
            raise HDF5Error(f"{path}: inconsistent shapes {shapes} for ratio {ratio}")
        if "gt" in shapes and shapes["gt"] != shapes["lms"]:
            raise HDF5Error(f"{path}: gt {shapes['gt']} != lms {shapes['lms']}")
        for k in keys:
            step = max(1, (64 << 20) // max(1, f[k].dtype.itemsize * int(np.prod(shapes[k][1:]))))  # ~64 MiB reads
            with h5_errors(path, f"read {k!r}"):
                for i in range(0, n, step):
                    block = f[k][i : i + step]
                    if not np.isfinite(block).all():
                        raise HDF5Error(f"{path}: {k} contains NaN or inf")
        attrs = {k: _decode(v) for k, v in f.attrs.items()}
    return {"n": int(n), "shapes": {k: list(v) for k, v in shapes.items()}, "attrs": attrs}
