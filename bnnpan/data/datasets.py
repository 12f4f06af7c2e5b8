"""A torch ``Dataset`` over the PanCollection HDF5 files (``train.h5``, ``valid.h5``, ``test_*.h5``).

Every array is divided by the file's ``scale`` attribute (never a scale guessed from the data),
so samples are float32 in ~[0, 1] as the networks expect. Samples are dicts
``{"lms": (C,H,W), "pan": (1,H,W), "ms": (C,h,w), "gt": (C,H,W)}`` (``gt`` absent in
full-resolution files).

* Files under :data:`IN_MEMORY_BYTES` are read into memory once (fast on CPU, shared
  copy-on-write with forked DataLoader workers). Larger files are opened lazily, once per
  process: an h5py handle is not fork-safe, so a worker never reuses its parent's handle.
* ``augment=True`` applies one of the 8 dihedral transforms (flips x 90 degree rotations), the
  same one to every array of the sample, so lms/pan/ms/gt stay registered. The transform is drawn
  from ``generator`` (or the global torch RNG) -- or given explicitly by indexing with a pair
  ``ds[(i, t)]``, which is what the training loop does: it draws ``t`` in its own checkpointed
  sampler, so the sample sequence does not depend on the number of workers or on a resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bnnpan.data.hdf5io import ARRAY_KEYS, HDF5Error, check_manifest, h5_errors, open_h5

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
        self._h5: Any = None
        self._pid: int | None = None

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
        return self._h5

    def _read(self, i: int) -> dict[str, np.ndarray]:
        if self._arrays is not None:
            return {k: a[i] for k, a in self._arrays.items()}
        f = self._file()
        with h5_errors(self.path, f"read sample {i}"):
            return {k: self._divide(f[k][i]) for k in self.keys}

    def draw_transform(self) -> int:
        """One dihedral transform index drawn from ``self.generator`` (or the global torch RNG)."""
        return int(torch.randint(N_TRANSFORMS, (1,), generator=self.generator).item())

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """Sample ``index``; ``(index, t)`` applies dihedral transform ``t`` (whatever ``augment`` says)."""
        if isinstance(index, (tuple, list)):
            i, t = int(index[0]), int(index[1])
        else:
            i = int(index)
            t = self.draw_transform() if self.augment else 0
        if not -self.n <= i < self.n:
            raise IndexError(f"{self.path}: sample {i} out of range (n={self.n})")
        i %= self.n
        out = {k: torch.from_numpy(np.array(a, dtype=np.float32, copy=True)) for k, a in self._read(i).items()}
        if t:
            out = {k: dihedral(v, t) for k, v in out.items()}
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"] = None  # h5py handles neither pickle nor survive a fork; reopened lazily
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._h5 is not None:
            try:
                self._h5.close()
            finally:
                self._h5 = None
                self._pid = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if self._h5 is not None and self._pid == os.getpid():
                self._h5.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return (f"PanDataset({str(self.path)!r}, n={self.n}, scale={self.scale}, augment={self.augment}, "
                f"in_memory={self.in_memory})")
