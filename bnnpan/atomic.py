"""Atomic outputs: write to a temporary file (or directory) beside the target, then rename.

A reader, or a run that is killed half-way, never sees a half-written file: the target is
either the previous version or the complete new one. Files get the usual permissions
(0666 minus the umask), not the 0600 of ``mkstemp``.

With ``BNNPAN_KEEP_UNCHANGED=1`` in the environment (set by ``bnnpan run --params <profile>``, which runs
stages outside Snakemake), a new output byte-identical to the existing one is discarded and the existing
file or directory is left untouched, mtime included: re-running a shared stage from a profile then does not
make Snakemake (mtime-based) see the default DAG's data as updated. Snakemake-run stages never set it (a job
must leave its outputs newer than its inputs).
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

KEEP_ENV = "BNNPAN_KEEP_UNCHANGED"
#: files a workflow tool adds to directory outputs; not part of the content
MARKERS = frozenset({".snakemake_timestamp"})


def _keep_unchanged() -> bool:
    return os.environ.get(KEEP_ENV, "") not in ("", "0")


def same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)


def same_dir(a: Path, b: Path) -> bool:
    """Same relative file names (markers aside) and byte-identical files."""
    if not (a.is_dir() and b.is_dir()):
        return False

    def files(d: Path) -> set[Path]:
        return {p.relative_to(d) for p in d.rglob("*") if p.is_file() and p.name not in MARKERS}

    fa, fb = files(a), files(b)
    return fa == fb and all(same_file(a / f, b / f) for f in fa)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if _keep_unchanged() and same_file(Path(tmp), path):
            Path(tmp).unlink()
            return
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_with(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], mode: str = "wb") -> Path:
    """``write(fileobj)`` into a temporary file (flushed and fsynced), then rename it over ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_with(path, lambda f: f.write(text), mode="w")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; on success swap it into place.

    On an exception the temporary directory is removed and a previous ``out_dir`` is left
    exactly as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if _keep_unchanged() and same_dir(tmp, out_dir):
            shutil.rmtree(tmp)
            return
        os.chmod(tmp, 0o777 & ~_umask())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
