"""``bnnpan export``: a trained network as one self-describing, pickle-free file, registered in MLflow.

Why a second format beside ``models/<dataset>/<method>.pt``: the checkpoint is a ``torch.save`` file (a pickle,
read weights-only), holds the latent FP32 weights of every binary conv, and says nothing about the data it
expects (sensor, bands, DN scale) beyond the scale. The exported file is what a user downloads and runs: sign
bits packed 8 per byte, no pickle anywhere (safetensors), and every fact needed to apply it, so ``bnnpan fuse
--model FILE`` needs nothing else.

File format ``bnnpan-packed-1bit-safetensors``, version 1
--------------------------------------------------------
One `safetensors <https://huggingface.co/docs/safetensors>`_ file (an 8-byte little-endian header length, a
JSON header, the raw tensor bytes). The packing is :mod:`bnnpan.models.packing`'s (shared code, :func:`
bnnpan.models.packing.pack_model`); each piece is its own named tensor:

* ``<layer>.weight.bits`` (uint8, 1-D): for every binary conv ``<layer>``, the sign bits of its weight,
  ``np.packbits(sign(W) > 0)`` of the C-order flattened weight (big-endian bit order: the first weight is the
  most significant bit of byte 0; +1 -> 1, -1 -> 0; the last byte zero-padded). The weight's shape is in the
  metadata (``binary``);
* ``<layer>.weight.scale`` (float32): that layer's per-output-channel weight scale (``alpha`` in
  ``alpha * sign(W)``), absent for a layer whose binary weight is plain ``sign(W)``;
* every other floating tensor of the state dict (head and tail convs, biases, thresholds, RPReLU, BatchNorm
  statistics, BNNPan's prior...) as float32 under its state-dict key, with its shape;
* non-floating buffers (BatchNorm's ``num_batches_tracked``) under their key, in their dtype.

A full-precision method (``fp``) has no ``.bits``/``.scale`` tensor: everything is float32.

The header's ``__metadata__`` (string to string) holds:

* ``format`` = ``bnnpan-packed-1bit-safetensors``, ``format_version`` = ``"1"``;
* ``bnnpan``: a JSON object (keys sorted, compact) with ``method``, ``network``, ``seed``, ``dataset``,
  ``net`` (the checkpoint's network description: ``name``, ``in_channels``, ``width``, ``depth``, ``ratio``,
  ``extra``, ...), ``sensor``, ``bands``, ``ratio``, ``scale`` (inputs and outputs are DN / scale),
  ``needs_reference``, ``binary`` (the binary convs in module order: ``name``, ``shape``, ``scaled``),
  ``training_data`` (file, sha256, whether the checkpoint's own digest confirms it), ``checkpoint``
  (file name, sha256, step, params digest), ``metrics`` (the test indices of ``bnnpan evaluate`` and the
  validation figures, with their source; null when there are none), ``code_version`` (bnnpan version, git
  commit) and ``torch`` (the version that exported it);
* ``sha256``: the hex sha256 of ``"<format>/<version>\\n" + <the bnnpan JSON text> + "\\n"`` followed, for
  every tensor in name order, by ``json.dumps([name, dtype, shape])`` and the tensor's raw little-endian bytes.

:func:`load_exported` recomputes that digest before using anything, so a changed tensor byte, an edited
metadata value, a truncated file or a file that is not safetensors is refused with one :class:`PackedFileError`
line. The digest detects accidents and naive edits, not a forger, who can recompute it (it is not a signature:
check the file's sha256 against the registry's ``file_sha256`` for that). Exporting the same checkpoint twice
with the same code gives the same bytes (no time stamp inside).

Where the provenance comes from: a checkpoint holds the network description, the DN scale, its training step
and a digest of the run's inputs, but not the sensor, the bands or the training file's sha256. Those are read
from the prepared training file (``<prepared>/<dataset>/train.h5`` attributes; the sha256 that
``manifest.json`` recorded, checked against the file). The checkpoint's ``params_digest`` is then recomputed
the way ``bnnpan train`` computes it (:func:`training_digest`): when it matches, that very file is confirmed as
the training data (``training_data.verified``); when it does not (the params, the prior or the data changed
since training) the export says so in a warning and records ``verified: false``.

Test metrics come from ``<reports>/<dataset>/<run>/metrics.json``. When ``dvc.lock`` (in the working
directory) has the evaluate stage that wrote that file, the checkpoint's md5 must equal the one that stage
read; otherwise the metrics belong to another training and are left out (with a warning).

MLflow (:func:`register`): one run ``export_<dataset>_<run>`` (under ``$BNNPAN_PARENT_RUN_ID`` when set), an
MLflow 3 LoggedModel (``mlflow.initialize_logged_model``) whose artifacts are the file and its metadata as
JSON (``MlflowClient.log_model_artifacts``; no pickled Python model, no MLmodel flavour), its params
(``initialize_logged_model(params=...)``) and metrics (``mlflow.log_metrics(model_id=...)``), finalised
READY, then ``mlflow.register_model("models:/<model_id>", "bnnpan-<dataset>-<method>")``: a new version per
export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bnnpan.atomic import atomic_path, write_with
from bnnpan.data.scene import sha256_file
from bnnpan.models.packing import PackedFileError, PackedLayer, PackedModel, pack_model, unpack_into

__all__ = ["FORMAT", "VERSION", "ExportError", "PackedFileError", "export_method", "export_model",
           "is_exported", "load_exported", "read_exported", "register", "registered_name"]

FORMAT = "bnnpan-packed-1bit-safetensors"
VERSION = 1
BITS, SCALE = ".bits", ".scale"  # suffixes of a binary conv's weight key
META_KEY = "bnnpan"
#: the largest |exported - checkpoint| output allowed on a real tile, in units of the DN scale
TOLERANCE = 1e-5
#: file names of the LoggedModel's artifacts
ARTIFACT_FILE, ARTIFACT_META = "model.safetensors", "bnnpan_meta.json"
log = logging.getLogger(__name__)


class ExportError(ValueError):
    """An export that cannot be made as asked (inconsistent inputs); the message is one line."""


# ---------------------------------------------------------------------------------------------- the file


def _weight_key(name: str) -> str:
    return f"{name}.weight" if name else "weight"


def _tensor_bytes(t: Tensor) -> bytes:
    # reshape(-1) first: a 0-d tensor cannot be viewed as bytes of another size
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(meta_text: str, tensors: dict[str, Tensor]) -> str:
    """The file's content digest (module docstring): the format, the metadata text, then every tensor."""
    h = hashlib.sha256(f"{FORMAT}/{VERSION}\n".encode())
    h.update(meta_text.encode())
    h.update(b"\n")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _finite(x: Any) -> Any:
    """JSON-safe: NaN / inf (a missing validation, an undefined index) become null, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, np.generic):
        return _finite(x.item())
    return x


def _tensors(packed: PackedModel) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """The named tensors of the file and the ``binary`` index of the metadata."""
    tensors: dict[str, Tensor] = {}
    index: list[dict[str, Any]] = []
    for layer in packed.binary:
        key = _weight_key(layer.name)
        tensors[key + BITS] = layer.bits.contiguous()
        if layer.scale is not None:
            tensors[key + SCALE] = layer.scale.contiguous()
        index.append({"name": layer.name, "shape": list(layer.shape), "scaled": layer.scale is not None})
    for key, t in (*packed.fp.items(), *packed.other.items()):
        if key in tensors:  # a state-dict key that ends like our suffixes: refuse rather than overwrite
            raise ValueError(f"state-dict key {key!r} collides with a packed binary tensor name")
        tensors[key] = t.contiguous()
    return tensors, index


def exported_bytes(model: nn.Module, meta: dict[str, Any]) -> bytes:
    """The file's bytes for ``model`` (packed) and ``meta`` (needs ``net``: see :func:`load_exported`)."""
    from safetensors.torch import save

    if "net" not in meta or "scale" not in meta:
        raise ValueError("export metadata needs at least 'net' (the network description) and 'scale'")
    tensors, index = _tensors(pack_model(model))
    text = json.dumps(_finite({**meta, "binary": index}), sort_keys=True, separators=(",", ":"), allow_nan=False)
    header = {"format": FORMAT, "format_version": str(VERSION), META_KEY: text, "sha256": _digest(text, tensors)}
    return _canonical(save(tensors, metadata=header))


def _canonical(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted.

    safetensors writes the header from hash maps, so the key order (not the content) changes from run to run;
    sorted, the same model and metadata always give the same bytes (a re-export is recognisably identical,
    and DVC/`KEEP_UNCHANGED` see no change). The tensor bytes and their offsets are untouched.
    """
    n = int.from_bytes(data[:8], "little")
    text = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to a multiple of 8 bytes
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def export_model(model: nn.Module, meta: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``model`` packed with ``meta`` to ``path`` atomically (temporary file, fsync, rename)."""
    data = exported_bytes(model, meta)
    return write_with(path, lambda f: f.write(data))


def _header(data: bytes) -> dict[str, Any]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` claims to be an exported model (its safetensors header names :data:`FORMAT`).

    A cheap sniff of the header only, for a command that accepts either a checkpoint or an exported file
    (``bnnpan fuse --model``); :func:`load_exported` still checks everything.
    """
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 * 2**20:  # a torch.save zip starts "PK..": an absurd header length
                return False
            return (json.loads(f.read(n)).get("__metadata__") or {}).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_exported(path: str | os.PathLike) -> tuple[PackedModel, dict[str, Any]]:
    """Read and check an exported file: the packed model and its metadata. Never unpickles.

    Raises :class:`PackedFileError` (one line naming the file) for a missing, truncated or foreign file, another
    format or version, a digest mismatch (a changed tensor or metadata) or a malformed index.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise PackedFileError(f"{path}: exported model file not found")
    data = path.read_bytes()  # small (KB to MB); one read, so the digest covers the very bytes parsed
    try:
        tensors = load(data)
        header = _header(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PackedFileError(f"{path}: not a readable safetensors file ({len(data)} bytes; truncated, corrupted "
                              f"or another format): {detail}") from None
    md = header.get("__metadata__") or {}
    if md.get("format") != FORMAT:
        raise PackedFileError(f"{path}: not a {FORMAT!r} file (format {md.get('format')!r})")
    if md.get("format_version") != str(VERSION):
        raise PackedFileError(f"{path}: unsupported {FORMAT} version {md.get('format_version')!r} (this bnnpan "
                              f"reads version {VERSION})")
    text = md.get(META_KEY)
    if not isinstance(text, str) or _digest(text, tensors) != md.get("sha256"):
        raise PackedFileError(f"{path}: checksum mismatch: a tensor or the metadata was changed after export "
                              f"(or the file is corrupted)")
    try:
        meta = json.loads(text)
        packed = PackedModel()
        for e in meta["binary"]:
            key = _weight_key(str(e["name"]))
            scale = tensors.pop(key + SCALE) if e["scaled"] else None
            packed.binary.append(PackedLayer(name=str(e["name"]), shape=[int(v) for v in e["shape"]],
                                             bits=tensors.pop(key + BITS), scale=scale))
    except (KeyError, TypeError, ValueError) as e:
        raise PackedFileError(f"{path}: malformed metadata ({type(e).__name__}: {e})") from None
    for key, t in tensors.items():
        (packed.fp if t.is_floating_point() else packed.other)[key] = t
    meta.update(format=FORMAT, format_version=VERSION, sha256=md["sha256"])
    return packed, meta


def _build(net: dict[str, Any]) -> nn.Module:
    """The network a ``net`` description names, built from the registry (as ``load_network`` does)."""
    from bnnpan.models.networks import NetConfig, build_network

    cfg = NetConfig(in_channels=int(net["in_channels"]), width=int(net["width"]), depth=int(net["depth"]),
                    ratio=int(net.get("ratio", 4)), extra=dict(net.get("extra") or {}))
    return build_network(str(net["name"]), cfg)


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The network of an exported file, in eval mode on ``device``, and its metadata.

    The metadata has what applying it needs, like a checkpoint's: ``method``, ``net`` (with ``name``),
    ``scale`` (inputs are DN / scale, so is the output), ``sensor``, ``bands``, ``ratio``,
    ``needs_reference``; and the provenance (module docstring). The binary convs hold their sign and scale
    (:func:`bnnpan.models.packing.unpack_into`): the model is for inference.
    """
    from bnnpan.devices import resolve_device

    path = Path(path)
    packed, meta = read_exported(path)
    try:
        model = _build(meta["net"])
    except (KeyError, TypeError, ValueError) as e:
        raise PackedFileError(f"{path}: cannot rebuild its network from the metadata ({type(e).__name__}: "
                              f"{e})") from None
    unpack_into(model, packed, path)
    return model.to(resolve_device(device)).eval(), meta


# ------------------------------------------------------------------------------- provenance of a checkpoint


def code_version() -> dict[str, Any]:
    """bnnpan's version and the commit of the checkout the package is imported from (None outside git)."""
    from bnnpan import __version__
    from bnnpan.tracking import git_commit

    commit = git_commit(Path(__file__).resolve().parent)
    return {"bnnpan": __version__, "git_commit": None if commit == "unknown" else commit}


def training_data(params: Any, dataset: str, method: str, seed: int, ckpt: dict[str, Any]) -> dict[str, Any]:
    """Sensor, bands, ratio and the training file's sha256 (the checkpoint does not hold them), checked
    against the checkpoint: ``{"sensor", "bands", "ratio", "training_data": {...}}``."""
    from bnnpan.data.hdf5io import check_manifest, read_attrs

    path = Path(params.paths.prepared) / dataset / "train.h5"
    check_manifest(path)  # the sha256 recorded at prepare time must still be the file's (HDF5Error if not)
    attrs = read_attrs(path)
    manifest = path.parent / "manifest.json"
    try:
        sha = json.loads(manifest.read_text())["files"][path.name]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        sha = sha256_file(path)  # no manifest entry (an imported file): hash it here
    net = ckpt["net"]
    bands = list(attrs.get("bands") or [])
    if float(attrs["scale"]) != float(ckpt["scale"]):
        raise ExportError(f"{path} has scale {attrs['scale']} but the checkpoint was trained with {ckpt['scale']}: "
                          f"the prepared data changed since training (re-train, or restore the data)")
    ratio = int(attrs["ratio"])
    if (bands and len(bands) != int(net["in_channels"])) or ratio != int(net.get("ratio", ratio)):
        raise ExportError(f"{path} has {len(bands)} bands at ratio {attrs['ratio']} but the checkpoint's network "
                          f"takes {net['in_channels']} at ratio {net.get('ratio')}: the prepared data changed "
                          f"since training")
    digest = str(ckpt.get("params_digest") or "")
    from bnnpan.train.run import training_digest

    verified = bool(digest) and training_digest(params, dataset, method, seed, sha) == digest
    if not verified:
        log.warning("%s: cannot confirm that %s (sha256 %s...) is the data this checkpoint was trained on: its "
                    "params digest differs (params, prior or data changed since training); recorded as "
                    "unverified", _checkpoint_path(params, dataset, method, seed), path, sha[:12])
    return {"sensor": attrs.get("sensor"), "bands": bands, "ratio": ratio,
            "training_data": {"dataset": dataset, "file": path.name, "sha256": sha, "verified": verified}}


def _checkpoint_path(params: Any, dataset: str, method: str, seed: int) -> Path:
    """Where `bnnpan train` wrote this run's checkpoint (models/<dataset>/<run>.pt)."""
    from bnnpan.train.run import model_file

    return model_file(params, dataset, method, seed)


def _lock_check(metrics_path: Path, model_path: Path, lock: Path = Path("dvc.lock")) -> tuple[str, bool]:
    """Whether ``dvc.lock`` ties ``metrics_path`` to the current ``model_path``: ``("dvc.lock", ok)`` when a
    stage there wrote the metrics and read the model (ok: the model's md5 is the one it read), else
    ``("unchecked", True)``."""
    import yaml

    if not lock.is_file():
        return "unchecked", True
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return "unchecked", True
    norm = os.path.normpath
    for stage in stages.values():
        outs = {norm(str(o.get("path"))) for o in stage.get("outs") or []}
        if norm(str(metrics_path)) not in outs:
            continue
        for dep in stage.get("deps") or []:
            if norm(str(dep.get("path"))) == norm(str(model_path)):
                md5 = hashlib.md5(model_path.read_bytes()).hexdigest()  # DVC's file hash
                return "dvc.lock", md5 == dep.get("md5")
    return "unchecked", True


def evaluated_metrics(params: Any, dataset: str, method: str, seed: int, model_path: Path) -> dict[str, Any] | None:
    """The test indices ``bnnpan evaluate`` wrote for this run (``{"source", "check", "indices": {q2n_mean: ...}}``),
    or None when there are none or they belong to another training (:func:`_lock_check`, with a warning)."""
    from bnnpan.config import run_name
    from bnnpan.eval.evaluate import index_stats

    path = Path(params.paths.reports) / dataset / run_name(method, seed) / "metrics.json"
    if not path.is_file():
        log.warning("%s not found: the exported model carries no test metrics (run `bnnpan evaluate --dataset %s "
                    "--method %s` first)", path, dataset, method)
        return None
    try:
        metrics = json.loads(path.read_text())
        stats = index_stats(metrics)
        scored = (metrics.get("setup") or {}).get("model_sha256")
    except (OSError, ValueError, AttributeError) as e:
        raise ExportError(f"{path}: unreadable metrics file ({type(e).__name__}: {e})") from None
    # evaluate records the sha256 of the checkpoint it scored; older metrics files are checked through dvc.lock
    if scored is not None:
        check, ok = "metrics.json model_sha256", scored == sha256_file(model_path)
    else:
        check, ok = _lock_check(path, model_path)
    if not ok:
        log.warning("%s was evaluated from another %s than the current one (%s): its test metrics are left out "
                    "(re-run `bnnpan evaluate`, or `dvc repro`)", path, model_path, check)
        return None
    indices = {f"{k}_{s}": float(v) for k, st in stats.items() for s, v in st.items()
               if isinstance(v, (int, float)) and math.isfinite(v)}
    return {"source": str(path), "check": check, "indices": indices}


# ------------------------------------------------------------------------------------------ export + register


def registered_name(dataset: str, method: str) -> str:
    """The MLflow registered model of a method trained on a dataset (every seed and export is a version)."""
    return f"bnnpan-{dataset}-{method}"


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module, params: Any, dataset: str, scale: float) -> tuple[float, str] | None:
    """max |a - b| over the first reduced-resolution test tile (DN / scale), or None without a test file."""
    from bnnpan.data.hdf5io import h5_errors, open_h5

    for split in ("test_rr", "valid", "train"):
        path = Path(params.paths.prepared) / dataset / f"{split}.h5"
        if path.is_file():
            break
    else:
        return None
    with open_h5(path) as f, h5_errors(path, "read its first tile"):
        def arr(k: str) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(f[k][0:1], dtype=np.float32) / scale)

        lms, pan = arr("lms"), arr("pan")
        ref = (arr("gt"),) if getattr(a, "needs_reference", False) else ()
    return float((a(lms, pan, *ref) - b(lms, pan, *ref)).abs().max()), f"{path.name}[0]"


def export_method(params: Any, dataset: str, method: str, out: str | os.PathLike, *, seed: int | None = None,
                  register_model: bool = True) -> dict[str, Any]:
    """Export the trained ``method`` of ``dataset`` (training seed ``seed``) to ``out``; register it unless told not.

    The file is checked before it replaces ``out``: loaded back (:func:`load_exported`) its network must give
    the checkpoint's output to :data:`TOLERANCE` of the scale on the first test tile. Returns ``{"path",
    "bytes", "sha256", "meta", "max_abs_diff", "checked_on", "registry"}`` (``registry``: name, version,
    model_id, run_id; None with ``register_model=False``).
    """
    from bnnpan.config import ConfigError, run_name
    from bnnpan.models.checkpoint import load_network

    seed = params.train.seeds[0] if seed is None else seed
    if (dataset, method) not in params.trained():
        raise ConfigError(f"{method} is not trained on {dataset} by these params: trained (dataset, method) pairs "
                          f"are {params.trained()}")
    if seed not in params.train.seeds:
        raise ConfigError(f"seed {seed} is not in train.seeds {params.train.seeds}")
    ckpt_path = _checkpoint_path(params, dataset, method, seed)
    out = Path(out)
    if out.resolve() == ckpt_path.resolve():
        raise ExportError(f"--out {out} is the checkpoint itself: choose another file (e.g. {out.stem}.safetensors)")
    model, ckpt = load_network(ckpt_path, "cpu")
    provenance = training_data(params, dataset, method, seed, ckpt)
    metrics = evaluated_metrics(params, dataset, method, seed, ckpt_path)
    validation = {k: v for k, v in (ckpt.get("metrics") or {}).items() if isinstance(v, (int, float))}
    net = dict(ckpt["net"])
    meta = {
        "method": method, "network": str(net["name"]), "seed": seed, "dataset": dataset, "run": run_name(method, seed),
        "net": net, "scale": float(ckpt["scale"]), **provenance,
        "needs_reference": bool(getattr(model, "needs_reference", False)),
        "checkpoint": {"file": ckpt_path.name, "sha256": sha256_file(ckpt_path), "step": ckpt.get("step"),
                       "params_digest": ckpt.get("params_digest")},
        "metrics": {"test": metrics, "validation": validation or None},
        "code_version": code_version(), "torch": str(torch.__version__),
    }
    data = exported_bytes(model, meta)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        exported, meta = load_exported(tmp)
        check = _max_diff(model, exported, params, dataset, float(ckpt["scale"]))
        if check is not None and not check[0] <= TOLERANCE:
            raise ExportError(f"{out}: the exported network differs from {ckpt_path} by {check[0]:.3g} of the scale "
                              f"on {check[1]} (tolerance {TOLERANCE}); nothing written")
    result = {"path": out, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "meta": meta,
              "max_abs_diff": None if check is None else check[0], "checked_on": None if check is None else check[1],
              "registry": None}
    if register_model:
        result["registry"] = register(params, out, meta, result)
    return result


def _model_params(meta: dict[str, Any], file_sha: str) -> dict[str, str]:
    """The LoggedModel's params (strings): what the model is and what it was made from."""
    net = meta["net"]
    flat = {"method": meta["method"], "network": meta["network"], "dataset": meta["dataset"], "seed": meta["seed"],
            "sensor": meta.get("sensor"), "bands": json.dumps(meta.get("bands")), "ratio": meta.get("ratio"),
            "scale": meta["scale"], "in_channels": net.get("in_channels"), "width": net.get("width"),
            "depth": net.get("depth"), **{f"extra.{k}": v for k, v in (net.get("extra") or {}).items()},
            "format": meta["format"], "format_version": meta["format_version"], "file_sha256": file_sha,
            "training_data_sha256": meta["training_data"]["sha256"],
            "training_data_verified": meta["training_data"]["verified"],
            "checkpoint_sha256": meta["checkpoint"]["sha256"], "bnnpan_version": meta["code_version"]["bnnpan"],
            "git_commit": meta["code_version"]["git_commit"]}
    return {k: str(v)[:6000] for k, v in flat.items()}


def register(params: Any, path: Path, meta: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Log the exported file as an MLflow 3 LoggedModel with its params and metrics; register it as a new
    version of :func:`registered_name` (module docstring). Returns ``{"name", "version", "model_id", "run_id"}``."""
    from bnnpan import tracking

    dataset, method, seed = meta["dataset"], meta["method"], int(meta["seed"])
    name = registered_name(dataset, method)
    file_sha = result["sha256"]
    test = (meta.get("metrics") or {}).get("test") or {}
    metrics = {**(test.get("indices") or {}),
               **{k: float(v) for k, v in ((meta.get("metrics") or {}).get("validation") or {}).items()
                  if isinstance(v, (int, float))},  # null: a NaN at export
               "file_bytes": float(result["bytes"])}
    if result.get("max_abs_diff") is not None:
        metrics["export_max_abs_diff"] = float(result["max_abs_diff"])
    metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
    model_params = _model_params(meta, file_sha)
    tags = {"dataset": dataset, "method": method, "seed": str(seed), "format": FORMAT, "file_sha256": file_sha}

    with tracking.stage_run(params, f"export_{dataset}_{meta['run']}", {"dataset": dataset, "method": method,
                                                                          "seed": str(seed)}) as run:
        import mlflow  # the tracking URI is set by stage_run

        client = mlflow.MlflowClient()
        tracking.log_params(model_params)
        logged = tracking.retry(lambda: mlflow.initialize_logged_model(
            name=f"bnnpan-{dataset}-{meta['run']}", source_run_id=run.info.run_id,
            experiment_id=run.info.experiment_id, params=model_params,
            tags={**tags, "bnnpan.kind": "export"}, model_type=FORMAT))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(path, Path(tmp) / ARTIFACT_FILE)
                (Path(tmp) / ARTIFACT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
                tracking.retry(lambda: client.log_model_artifacts(logged.model_id, tmp))
            tracking.retry(lambda: mlflow.log_metrics(metrics, model_id=logged.model_id))
            tracking.retry(lambda: mlflow.finalize_logged_model(logged.model_id, "READY"))
        except BaseException:
            tracking.retry(lambda: mlflow.finalize_logged_model(logged.model_id, "FAILED"))
            raise
        version = tracking.retry(lambda: mlflow.register_model(f"models:/{logged.model_id}", name, tags=tags))
    return {"name": name, "version": int(version.version), "model_id": logged.model_id, "run_id": run.info.run_id}
