"""Atomic outputs: all-or-nothing writes, and (BNNPAN_KEEP_UNCHANGED) identical outputs left untouched."""

from __future__ import annotations

import os

import pytest

from bnnpan.atomic import KEEP_ENV, atomic_dir, write_text


def test_failed_write_leaves_the_previous_file(tmp_path) -> None:
    f = tmp_path / "a.txt"
    write_text(f, "one")

    def boom(fh):
        fh.write("half")
        raise RuntimeError("killed")

    from bnnpan.atomic import write_with

    with pytest.raises(RuntimeError):
        write_with(f, boom, mode="w")
    assert f.read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("keep", [False, True])
def test_identical_output_is_kept_only_when_asked(tmp_path, monkeypatch, keep: bool) -> None:
    if keep:
        monkeypatch.setenv(KEEP_ENV, "1")
    else:
        monkeypatch.delenv(KEEP_ENV, raising=False)
    f, d = tmp_path / "a.txt", tmp_path / "out"
    write_text(f, "same")
    with atomic_dir(d) as tmp:
        (tmp / "x.bin").write_bytes(b"123")
    (d / ".snakemake_timestamp").touch()  # a workflow tool's marker is not content
    old = 1_000_000_000
    os.utime(f, ns=(old, old))
    os.utime(d / "x.bin", ns=(old, old))
    write_text(f, "same")
    with atomic_dir(d) as tmp:
        (tmp / "x.bin").write_bytes(b"123")
    assert (f.stat().st_mtime_ns == old) is keep
    assert ((d / "x.bin").stat().st_mtime_ns == old) is keep
    assert (d / ".snakemake_timestamp").exists() is keep
    # different content is always written
    write_text(f, "new")
    with atomic_dir(d) as tmp:
        (tmp / "x.bin").write_bytes(b"456")
    assert f.read_text() == "new" and (d / "x.bin").read_bytes() == b"456"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]  # no temporaries left
