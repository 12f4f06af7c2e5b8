"""A torch ``Dataset`` over the PanCollection HDF5 files (``train.h5``, ``valid.h5``, ``test_*.h5``).

Every array is divided by the file's ``scale`` attribute (never a scale guessed from the data),
so samples are float32 in ~[0, 1] as the networks expect. Samples are dicts
``{"lms": (C,H,W), "pan": (1,H,W), "ms": (C,h,w), "gt": (C,H,W)}`` (``gt`` absent in
full-resolution files).

* Files under :data:`IN_MEMORY_BYTES` are read into memory once (fast on CPU, shared
  copy-on-write with forked DataLoader workers). Larger files are **streamed**: opened lazily, once
  per process (an h5py handle is not fork-safe, so a worker never reuses its parent's handle), and
  read batch by batch: a DataLoader batch is fetched by :meth:`PanDataset.__getitems__`, which reads
  the batch's distinct indices in increasing order, one slice per run of consecutive indices, casts
  and divides them as one block and hands the samples back in the sampler's order, each bit-identical
  to the in-memory one (same float32 cast and division). Memory stays one batch plus HDF5's chunk cache
  (1 MiB per array per process), whatever the file size; any dtype on disk (PanCollection's float64
  included) is cast per batch.
* Layouts: contiguous arrays (PanCollection's) and one sample per chunk (ours) read exactly the
  samples asked for. Chunks of several samples with a filter (compression, checksum) make HDF5 read
  and decode a whole chunk per sample; in a random sample order no cache smaller than the file
  avoids that (a chunk is rarely asked for twice before eviction), so such a file gets a one-line
  warning with the ``h5repack`` command that rechunks it.
* ``augment=True`` applies one of the 8 dihedral transforms (flips x 90 degree rotations), the
  same one to every array of the sample, so lms/pan/ms/gt stay registered. The transform is drawn
  from ``generator`` (or the global torch RNG) -- or given explicitly by indexing with a pair
  ``ds[(i, t)]``, which is what the training loop does: it draws ``t`` in its own checkpointed
  sampler, so the sample sequence does not depend on the number of workers or on a resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bnnpan.data.hdf5io import ARRAY_KEYS, HDF5Error, check_manifest, h5_errors, open_h5

log = logging.getLogger(__name__)

IN_MEMORY_BYTES = 512 * 2**20
N_TRANSFORMS = 8


def dihedral(x: torch.Tensor, t: int) -> torch.Tensor:
    """Dihedral transform ``t`` in 0..7 of the last two dims: flip the width if ``t >= 4``, then rotate
    by ``(t % 4) * 90`` degrees (``t == 0`` is the identity)."""
    t = int(t)
    if not 0 <= t < N_TRANSFORMS:
        raise ValueError(f"dihedral transform index must be in 0..7, got {t}")
    if t >= 4:
        x = torch.flip(x, dims=(-1,))
    if t % 4:
        x = torch.rot90(x, k=t % 4, dims=(-2, -1))
    return x.contiguous()


class PanDataset(Dataset):
    """Samples of one PanCollection HDF5 file, divided by its ``scale`` attribute (float32 tensors)."""

    def __init__(self, path: str | Path, augment: bool = False, *, generator: torch.Generator | None = None,
                 in_memory: bool | None = None) -> None:
        self.path = Path(path)
        self.augment = bool(augment)
        self.generator = generator
        check_manifest(self.path)
        with open_h5(self.path) as f, h5_errors(self.path, "read it"):
            if "scale" not in f.attrs:
                raise HDF5Error(f"{self.path}: missing attribute 'scale' (the divisor of the stored DN)")
            try:
                self.scale = float(f.attrs["scale"])
            except (TypeError, ValueError):
                raise HDF5Error(f"{self.path}: attribute 'scale' is not a number: {f.attrs['scale']!r}") from None
            if not np.isfinite(self.scale) or self.scale <= 0:
                raise HDF5Error(f"{self.path}: attribute 'scale' must be > 0, got {self.scale}")
            self.keys: tuple[str, ...] = tuple(k for k in ARRAY_KEYS if k in f)
            missing = [k for k in ("lms", "ms", "pan") if k not in self.keys]
            if missing:
                raise HDF5Error(f"{self.path}: missing dataset(s) {missing}; has {list(f)}")
            self.shapes = {k: tuple(f[k].shape) for k in self.keys}
            lens = {s[0] for s in self.shapes.values()}
            if len(lens) != 1 or any(len(s) != 4 for s in self.shapes.values()):
                raise HDF5Error(f"{self.path}: arrays must be N x C x H x W with one N, got {self.shapes}")
            self.n = int(lens.pop())
            self.ratio = int(f.attrs["ratio"]) if "ratio" in f.attrs else None
            nbytes = sum(int(np.prod(s)) * 4 for s in self.shapes.values())
            load = nbytes < IN_MEMORY_BYTES if in_memory is None else bool(in_memory)
            self._arrays: dict[str, np.ndarray] | None = None
            if load:
                self._arrays = {k: self._divide(f[k][...]) for k in self.keys}
            else:
                self._warn_layout(f)
        self._h5: Any = None
        self._pid: int | None = None
        self._dsets: dict[str, Any] = {}  # the open handle's datasets (a name lookup costs ~0.2 ms)

    def _warn_layout(self, f: Any) -> None:
        """One warning line when streaming will decode whole multi-sample chunks per sample (see the module doc)."""
        slow = {k: f[k].chunks[0] for k in self.keys
                if f[k].chunks is not None and f[k].chunks[0] > 1 and (f[k].compression or f[k].fletcher32
                                                                       or f[k].shuffle or f[k].scaleoffset)}
        if slow:
            shapes = ",".join(f"{k}:CHUNK=1x{'x'.join(map(str, self.shapes[k][1:]))}" for k in slow)
            log.warning("%s: chunks of %s samples with a filter: streaming decodes a whole chunk per sample "
                        "(slow); rechunk once with `h5repack -l %s IN OUT`", self.path,
                        "/".join(str(v) for v in sorted(set(slow.values()))), shapes)

    def _divide(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float32) / np.float32(self.scale)

    @property
    def in_memory(self) -> bool:
        return self._arrays is not None

    def __len__(self) -> int:
        return self.n

    def _file(self) -> Any:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = open_h5(self.path)  # a fresh handle per process (never the parent's after a fork)
            self._pid = os.getpid()
            with h5_errors(self.path, "open its arrays"):
                self._dsets = {k: self._h5[k] for k in self.keys}
        return self._h5

    def _read(self, i: int) -> dict[str, np.ndarray]:
        if self._arrays is not None:
            return {k: a[i] for k, a in self._arrays.items()}
        self._file()
        with h5_errors(self.path, f"read sample {i}"):
            return {k: self._divide(d[i]) for k, d in self._dsets.items()}

    def draw_transform(self) -> int:
        """One dihedral transform index drawn from ``self.generator`` (or the global torch RNG)."""
        return int(torch.randint(N_TRANSFORMS, (1,), generator=self.generator).item())

    def _index(self, index: int | tuple[int, int]) -> tuple[int, int]:
        """``(i, t)``: the sample (negative indices counted from the end) and its dihedral transform."""
        if isinstance(index, (tuple, list)):
            i, t = int(index[0]), int(index[1])
        else:
            i = int(index)
            t = self.draw_transform() if self.augment else 0
        if not -self.n <= i < self.n:
            raise IndexError(f"{self.path}: sample {i} out of range (n={self.n})")
        return i % self.n, t

    @staticmethod
    def _sample(arrays: dict[str, np.ndarray], t: int, fresh: bool = False) -> dict[str, torch.Tensor]:
        """Tensors of one sample under transform ``t``. A transform makes new tensors anyway (``torch.flip``
        copies); otherwise the arrays are copied unless ``fresh`` (a batch block read for this call only),
        so a sample never shares memory with the in-memory arrays or with the file cache."""
        if t:
            return {k: dihedral(torch.from_numpy(np.asarray(a, dtype=np.float32)), t) for k, a in arrays.items()}
        return {k: torch.from_numpy(np.asarray(a, dtype=np.float32) if fresh else np.array(a, dtype=np.float32))
                for k, a in arrays.items()}

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """Sample ``index``; ``(index, t)`` applies dihedral transform ``t`` (whatever ``augment`` says)."""
        i, t = self._index(index)
        return self._sample(self._read(i), t)

    def __getitems__(self, indices: Sequence[int | tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """The samples of one batch, in the order given: what a DataLoader's batch fetch calls.

        In memory: ``[self[i] for i in indices]``. Streamed: the distinct indices are sorted and read run by
        run (one slice per run of consecutive indices, in file order; a duplicate, e.g. in a batch spanning
        two passes of the sampler, is read once), divided by the scale as one block, and each sample is
        taken from the block in the order of ``indices``: the same values and transforms as ``self[i]``
        one by one. Transforms are drawn (``augment`` without explicit pairs) in the order of ``indices``,
        as one-by-one indexing does. (Slices, not one h5py fancy-index call: HDF5 reads a union of
        hyperslabs slowly, measured 33 ms against 1.3 ms for 16 samples of a one-sample-chunk file, and
        slower on a contiguous file too.)
        """
        pairs = [self._index(ix) for ix in indices]
        if self._arrays is not None or not pairs:
            return [self._sample(self._read(i), t) for i, t in pairs]
        uniq, pos = np.unique(np.fromiter((i for i, _ in pairs), dtype=np.int64, count=len(pairs)),
                              return_inverse=True)
        cuts = np.flatnonzero(np.diff(uniq) != 1) + 1  # runs of consecutive indices: one slice read each
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(uniq, cuts)]
        self._file()
        with h5_errors(self.path, f"read samples {uniq[0]}..{uniq[-1]}"):
            block = {}
            for k, d in self._dsets.items():
                parts = [d[a:b] for a, b in runs]
                block[k] = self._divide(parts[0] if len(parts) == 1 else np.concatenate(parts))
        out, used = [], set()
        for p, (_, t) in zip(pos, pairs, strict=True):  # a repeated index gets its own copy
            out.append(self._sample({k: a[p] for k, a in block.items()}, t, fresh=p not in used))
            used.add(p)
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"] = None  # h5py handles neither pickle nor survive a fork; reopened lazily
        state["_pid"] = None
        state["_dsets"] = {}
        return state

    def close(self) -> None:
        if self._h5 is not None:
            try:
                self._h5.close()
            finally:
                self._h5 = None
                self._pid = None
                self._dsets = {}

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if self._h5 is not None and self._pid == os.getpid():
                self._h5.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return (f"PanDataset({str(self.path)!r}, n={self.n}, scale={self.scale}, augment={self.augment}, "
                f"in_memory={self.in_memory})")
