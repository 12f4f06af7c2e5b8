"""Full-resolution (no-reference) quality indices: D_lambda (Khan), D_s, HQNR, QNR.

At full resolution there is no ground truth: the fused image ``F`` (``(C, H, W)``, on the PAN
grid) is compared with the expanded MS ``ms_exp`` (the native MS upsampled to the PAN grid with
the 23-tap interpolator, :func:`bnnpan.data.wald.interp23`) and with the PAN. Re-implemented with
numpy/scipy from the formulas of ``shared/design/protocol.md`` (section "Metrics", full
resolution; the HQNR of the toolbox of Vivone et al.); no toolbox code is used. Conventions:

* DN scale, float64, the **expanded MS comes first** where an index has a reference;
* ``H`` and ``W`` must be multiples of the block side (32): blocks are a non-overlapping grid
  with no padding (``ValueError`` naming the shape otherwise);
* the UIQI used by D_s and D_lambda_QNR is the **plain formula on non-overlapping blocks**,
  mean over blocks, without the special cases of :func:`bnnpan.eval.metrics_rr.q_index`: a block
  where both images are flat (or both all zero) is 0/0 = NaN, as in the reference toolbox, and
  the NaN propagates to the index (a ``RuntimeWarning`` says how many blocks). Tiles with
  nodata must be excluded by the caller (or the NaN reported), never silently averaged away;
* ``d_s``, ``hqnr`` and ``qnr`` are always the toolbox's (D_s's low-pass PAN from the bicubic
  shrink), whatever a dataset's ``pan_degradation``; our MTF variant of D_s is reported beside
  them as ``d_s_mtf`` / ``hqnr_mtf`` (:func:`full_resolution`), never in their place.

References
----------
* Khan, M. M., Alparone, L., Chanussot, J. (2009). Pansharpening quality assessment using the
  modulation transfer functions of instruments. IEEE TGRS 47(11), 3880-3891 (D_lambda^(K)).
* Alparone, L., Aiazzi, B., Baronti, S., Garzelli, A., Nencini, F., Selva, M. (2008).
  Multispectral and panchromatic data fusion assessment without reference. PE&RS 74(2),
  193-200 (QNR, D_lambda, D_s).
* Arienzo, A., Vivone, G., Garzelli, A., Alparone, L., Chanussot, J. (2022). Full-resolution
  quality assessment of pansharpening: theoretical and hands-on approaches. IEEE GRSM 10(3),
  168-201 (HQNR).
* Vivone, G., et al. (2021). A new benchmark based on recent advances in multispectral
  pansharpening. IEEE GRSM 9(1), 53-81 (toolbox).
* Wang, Z., Bovik, A. C. (2002). A universal image quality index. IEEE SPL 9(3), 81-84 (UIQI).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from bnnpan.data import wald
from bnnpan.eval.metrics_rr import DEFAULT_BLOCK, _pair, _positive_int, _q2n_blocks

__all__ = [
    "d_lambda_khan",
    "d_lambda_qnr",
    "d_s",
    "full_resolution",
    "uiqi_blocks",
]

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]
PAN_DEGRADATIONS = ("bicubic", "mtf")  # how D_s's PAN_L is made: the toolbox's, our variant


def _check_blocks(shape: tuple[int, ...], block: int, name: str) -> None:
    """Raise ``ValueError`` unless both sides of ``shape`` are multiples of ``block``."""
    h, w = shape[-2:]
    if h % block or w % block or h < block or w < block:
        raise ValueError(
            f"{name} has shape {tuple(shape)}: its sides {h} x {w} must be (non-zero) multiples of "
            f"the block size {block}; crop it first"
        )


def _block_view(img: FloatArray, block: int) -> FloatArray:
    """``(..., H, W)`` -> ``(..., nby, nbx, B*B)`` non-overlapping blocks."""
    *lead, h, w = img.shape
    v = img.reshape(*lead, h // block, block, w // block, block)
    v = np.swapaxes(v, -3, -2)
    return v.reshape(*lead, h // block, w // block, block * block)


def _uiqi_block_map(x: FloatArray, y: FloatArray, block: int) -> FloatArray:
    """UIQI of every non-overlapping block (broadcast over leading axes), NaN for 0/0."""
    bx = _block_view(x, block)
    by = _block_view(y, block)
    mx = np.mean(bx, axis=-1)
    my = np.mean(by, axis=-1)
    dx = bx - mx[..., None]
    dy = by - my[..., None]
    n1 = block * block - 1.0
    sxy = np.sum(dx * dy, axis=-1) / n1
    sxx = np.sum(dx * dx, axis=-1) / n1
    syy = np.sum(dy * dy, axis=-1) / n1
    with np.errstate(divide="ignore", invalid="ignore"):
        return 4.0 * sxy * mx * my / (sxx + syy) / (mx * mx + my * my)


def _mean_blocks(qmap: FloatArray, what: str) -> FloatArray:
    """Mean over the block axes (last two), warning about NaN (flat) blocks."""
    bad = int(np.count_nonzero(np.isnan(qmap)))
    if bad:
        warnings.warn(
            f"{what}: {bad} of {qmap.size} blocks are flat in both images (UIQI 0/0 = NaN, as in "
            "the reference toolbox); the index is NaN. Exclude tiles with nodata.",
            RuntimeWarning,
            stacklevel=3,
        )
    return np.mean(qmap, axis=(-2, -1))


def uiqi_blocks(x: ArrayLike, y: ArrayLike, block: int = DEFAULT_BLOCK) -> float:
    """UIQI (Wang & Bovik 2002) of two single-band images over non-overlapping blocks.

    Per ``block x block`` block (sample statistics; the ratio does not depend on N vs N-1)::

        Q = 4 s_xy m_x m_y / ((s_x^2 + s_y^2)(m_x^2 + m_y^2))

    and the mean over blocks. No special cases: a block flat in both images gives 0/0 = NaN
    (reference toolbox behaviour), which propagates to the result with a ``RuntimeWarning``.

    Parameters
    ----------
    x, y : array_like
        ``(H, W)`` (or ``(1, H, W)``) images, sides multiples of ``block``.
    block : int, default 32
        Block side.

    Returns
    -------
    float
        Mean UIQI over blocks.

    Raises
    ------
    ValueError
        On mismatching shapes, more than one band, or sides not multiples of ``block``.
    """
    xa, ya = _pair(x, y, "x", "y")
    if xa.shape[0] != 1:
        raise ValueError(f"uiqi_blocks takes single-band images, got shape {xa.shape}")
    b = _positive_int(block, "block", minimum=2)
    _check_blocks(xa.shape, b, "x")
    return float(_mean_blocks(_uiqi_block_map(xa[0], ya[0], b), "UIQI"))


def _fr_inputs(fused: ArrayLike, ms_exp: ArrayLike, block: int) -> tuple[FloatArray, FloatArray, int]:
    m, f = _pair(ms_exp, fused, "ms_exp", "fused")
    b = _positive_int(block, "block", minimum=2)
    _check_blocks(f.shape, b, "fused")
    return f, m, b


def d_lambda_khan(
    fused: ArrayLike,
    ms_exp: ArrayLike,
    ms_gains: float | Sequence[float] | ArrayLike,
    ratio: int,
    block: int = DEFAULT_BLOCK,
) -> float:
    """Spectral distortion D_lambda of Khan et al. (2009), the toolbox's HQNR variant.

    ::

        D_lambda = 1 - Q2n(ms_exp, MTF_ms(fused))

    where ``MTF_ms`` filters each band of the fused image with its sensor MTF
    (:func:`bnnpan.data.wald.mtf_filter` with the MS Nyquist gains and ``ratio``), **without
    decimation**: the comparison is on the PAN grid with the expanded MS (23-tap interpolated)
    as the reference, using :func:`bnnpan.eval.metrics_rr.q2n` with ``block x block``
    non-overlapping blocks (uint16 cast, zero bands up to 2^k, reference statistics). 0 when
    ``MTF_ms(fused)`` rounds to ``ms_exp``; lower is better.

    Parameters
    ----------
    fused : array_like
        ``(C, H, W)`` fused image (DN), ``H`` and ``W`` multiples of ``block``.
    ms_exp : array_like
        ``(C, H, W)`` expanded MS.
    ms_gains : float or sequence of float
        MS Nyquist gains (one per band, or one for all).
    ratio : int
        Resolution ratio.
    block : int, default 32
        Block side.

    Returns
    -------
    float
        D_lambda in [0, 1].

    Raises
    ------
    ValueError
        On mismatching shapes, sides not multiples of ``block``, or bad gains/ratio.
    """
    f, m, b = _fr_inputs(fused, ms_exp, block)
    low = wald.mtf_filter(f, ms_gains, ratio)
    return float(1.0 - np.mean(_q2n_blocks(m, low, b, b)))


def _pan_image(pan: ArrayLike, shape: tuple[int, ...]) -> FloatArray:
    p = np.asarray(pan, dtype=np.float64)
    if p.ndim == 3 and p.shape[0] == 1:
        p = p[0]
    if p.ndim != 2:
        raise ValueError(f"pan must be (H, W) or (1, H, W), got shape {np.shape(pan)}")
    if p.shape != tuple(shape[-2:]):
        raise ValueError(f"pan shape {p.shape} does not match the fused image's {tuple(shape)}")
    return p


def _pan_low(p: FloatArray, ratio: int, pan_degradation: str, pan_gain: float | None) -> FloatArray:
    """``PAN_L = interp23(degrade(PAN, R), R)``: the bicubic shrink (toolbox) or MTF_PAN + decimation."""
    if pan_degradation not in PAN_DEGRADATIONS:
        raise ValueError(f"pan_degradation must be one of {PAN_DEGRADATIONS}, got {pan_degradation!r}")
    if pan_degradation == "mtf" and pan_gain is None:
        raise ValueError("d_s: pan_degradation='mtf' needs the sensor's pan_gain")
    return wald.interp23(wald.degrade_pan(p, ratio, pan_degradation, gain=pan_gain), ratio)


def _d_s_from(q_high: FloatArray, m: FloatArray, pan_l: FloatArray, block: int) -> float:
    q_low = _mean_blocks(_uiqi_block_map(m, pan_l[np.newaxis], block), "D_s Q(ms_exp_b, PAN_L)")
    return float(np.mean(np.abs(q_high - q_low)))


def d_s(
    fused: ArrayLike,
    pan: ArrayLike,
    ms_exp: ArrayLike,
    ratio: int,
    block: int = DEFAULT_BLOCK,
    pan_degradation: str = "bicubic",
    pan_gain: float | None = None,
) -> float:
    """Spatial distortion D_s (Alparone et al. 2008), the toolbox's HQNR variant (q = 1).

    ::

        D_s   = mean_b | Q(F_b, PAN) - Q(ms_exp_b, PAN_L) |
        PAN_L = interp23(bicubic_shrink(PAN, R), R)

    with Q the UIQI on non-overlapping ``block x block`` blocks averaged over blocks
    (:func:`uiqi_blocks`), ``bicubic_shrink`` MATLAB's antialiased ``imresize(PAN, 1/R)`` and
    ``interp23`` the 23-tap interpolator (:mod:`bnnpan.data.wald`). The expanded MS against
    the low-pass PAN gives the inter-scale relation the fused image should keep against the
    PAN. Blocks flat in both images give NaN (see the module docstring). Lower is better.
    With the default ``pan_degradation="bicubic"`` this is the toolbox's D_s (protocol.md), the
    index reported as ``d_s`` on every dataset.

    ``pan_degradation="mtf"`` is our variant (reported as ``d_s_mtf`` beside it, never instead):
    ``PAN_L`` from the PAN's MTF filter and decimation at offset R/2, matching a dataset prepared
    that way. At ratio 2 on Landsat, where PAN and MS pixel *centres* coincide, the bicubic shrink
    sits a quarter MS pixel off the MS grid, so the toolbox's ``Q(ms_exp_b, PAN_L)`` drops for
    misregistration alone and its D_s rewards methods that add no detail (EXP).

    Parameters
    ----------
    fused : array_like
        ``(C, H, W)`` fused image (DN), sides multiples of ``block`` and of ``ratio``.
    pan : array_like
        ``(H, W)`` or ``(1, H, W)`` PAN.
    ms_exp : array_like
        ``(C, H, W)`` expanded MS.
    ratio : int
        Resolution ratio (a power of two, for ``interp23``).
    block : int, default 32
        Block side.
    pan_degradation : {'bicubic', 'mtf'}, default 'bicubic'
        How ``PAN_L`` is made: the toolbox's bicubic shrink, or our MTF variant.
    pan_gain : float, optional
        The PAN's Nyquist gain, required for ``pan_degradation="mtf"``.

    Returns
    -------
    float
        D_s in [0, 1] (NaN with flat blocks).

    Raises
    ------
    ValueError
        On mismatching shapes, sides not multiples of ``block``, a bad ratio, an unknown
        ``pan_degradation``, or ``"mtf"`` without ``pan_gain``.
    """
    f, m, b = _fr_inputs(fused, ms_exp, block)
    p = _pan_image(pan, f.shape)
    pan_l = _pan_low(p, ratio, pan_degradation, pan_gain)
    q_high = _mean_blocks(_uiqi_block_map(f, p[np.newaxis], b), "D_s Q(fused_b, PAN)")
    return _d_s_from(q_high, m, pan_l, b)


def _pairwise_q(img: FloatArray, block: int, what: str) -> FloatArray:
    """UIQI of every band pair i < j (vector in ``np.triu_indices`` order)."""
    i, j = np.triu_indices(img.shape[0], k=1)
    return _mean_blocks(_uiqi_block_map(img[i], img[j], block), what)


def d_lambda_qnr(fused: ArrayLike, ms_exp: ArrayLike, block: int = DEFAULT_BLOCK) -> float:
    """Spectral distortion D_lambda of the QNR (Alparone et al. 2008), with the expanded MS.

    ::

        D_lambda_QNR = mean over band pairs i < j of | Q(F_i, F_j) - Q(ms_exp_i, ms_exp_j) |

    (the mean over ordered pairs ``i != j`` is the same, Q being symmetric), with Q the UIQI on
    non-overlapping ``block x block`` blocks (:func:`uiqi_blocks`) and the expanded MS on the
    PAN grid in place of the original MS. 0 for a single band or for ``fused = ms_exp``.

    Parameters
    ----------
    fused, ms_exp : array_like
        ``(C, H, W)`` images, sides multiples of ``block``.
    block : int, default 32
        Block side.

    Returns
    -------
    float
        D_lambda_QNR in [0, 1] (NaN with flat blocks).

    Raises
    ------
    ValueError
        On mismatching shapes or sides not multiples of ``block``.
    """
    f, m, b = _fr_inputs(fused, ms_exp, block)
    if f.shape[0] < 2:
        return 0.0
    qf = _pairwise_q(f, b, "D_lambda_QNR Q(F_i, F_j)")
    qm = _pairwise_q(m, b, "D_lambda_QNR Q(ms_exp_i, ms_exp_j)")
    return float(np.mean(np.abs(qf - qm)))


def full_resolution(
    fused: ArrayLike,
    pan: ArrayLike,
    ms_exp: ArrayLike,
    ms_gains: float | Sequence[float] | ArrayLike,
    ratio: int,
    block: int = DEFAULT_BLOCK,
    pan_degradation: str = "bicubic",
    pan_gain: float | None = None,
) -> dict[str, float]:
    """All full-resolution indices of a fused image.

    ::

        d_lambda     = d_lambda_khan(fused, ms_exp, ms_gains, ratio, block)
        d_s          = d_s(fused, pan, ms_exp, ratio, block)   (PAN_L: bicubic shrink, the toolbox's)
        hqnr         = (1 - d_lambda) (1 - d_s)            (Arienzo et al. 2022, toolbox HQNR)
        d_lambda_qnr = d_lambda_qnr(fused, ms_exp, block)
        qnr          = (1 - d_lambda_qnr) (1 - d_s)        (Alparone et al. 2008)

    ``d_s``, ``hqnr`` and ``qnr`` are always the toolbox's (protocol.md), whatever the dataset's PAN
    degradation. For a dataset whose reduced-resolution PAN was made by the MTF filter
    (``pan_degradation="mtf"``) our variant is added under its own keys::

        d_s_mtf      = d_s(fused, pan, ms_exp, ratio, block, "mtf", pan_gain)
        hqnr_mtf     = (1 - d_lambda) (1 - d_s_mtf)

    Everything is on the PAN grid and the DN scale; no border is cut. ``H`` and ``W`` must be
    multiples of ``block``. Flat (nodata) blocks make ``d_s``, ``d_lambda_qnr``, ``hqnr`` and
    ``qnr`` (and the ``_mtf`` keys) NaN (with a ``RuntimeWarning``).

    Parameters
    ----------
    fused : array_like
        ``(C, H, W)`` fused image (DN).
    pan : array_like
        ``(H, W)`` or ``(1, H, W)`` PAN.
    ms_exp : array_like
        ``(C, H, W)`` expanded MS (``lms`` of the full-resolution test set).
    ms_gains : float or sequence of float
        MS Nyquist gains of the sensor.
    ratio : int
        Resolution ratio.
    block : int, default 32
        Block side.
    pan_degradation : {'bicubic', 'mtf'}, default 'bicubic'
        The dataset's PAN degradation: ``"mtf"`` adds ``d_s_mtf`` and ``hqnr_mtf``.
    pan_gain : float, optional
        The PAN's Nyquist gain, required for ``pan_degradation="mtf"``.

    Returns
    -------
    dict[str, float]
        Keys ``d_lambda``, ``d_s``, ``hqnr``, ``qnr``, ``d_lambda_qnr`` (then ``d_s_mtf``, ``hqnr_mtf``
        with ``pan_degradation="mtf"``).

    Raises
    ------
    ValueError
        On bad or mismatching shapes, sides not multiples of ``block``, bad gains or ratio, an
        unknown ``pan_degradation``, or ``"mtf"`` without ``pan_gain``.
    """
    f, m, b = _fr_inputs(fused, ms_exp, block)
    p = _pan_image(pan, f.shape)
    if pan_degradation not in PAN_DEGRADATIONS:
        raise ValueError(f"pan_degradation must be one of {PAN_DEGRADATIONS}, got {pan_degradation!r}")
    variants = {"d_s": "bicubic", **({"d_s_mtf": "mtf"} if pan_degradation == "mtf" else {})}
    pan_low = {k: _pan_low(p, ratio, how, pan_gain) for k, how in variants.items()}  # checks before the work
    dl = d_lambda_khan(f, m, ms_gains, ratio, b)
    q_high = _mean_blocks(_uiqi_block_map(f, p[np.newaxis], b), "D_s Q(fused_b, PAN)")  # shared by both D_s
    ds = {k: _d_s_from(q_high, m, pl, b) for k, pl in pan_low.items()}
    dlq = d_lambda_qnr(f, m, b)
    out = {
        "d_lambda": dl,
        "d_s": ds["d_s"],
        "hqnr": (1.0 - dl) * (1.0 - ds["d_s"]),
        "qnr": (1.0 - dlq) * (1.0 - ds["d_s"]),
        "d_lambda_qnr": dlq,
    }
    if "d_s_mtf" in ds:
        out["d_s_mtf"] = ds["d_s_mtf"]
        out["hqnr_mtf"] = (1.0 - dl) * (1.0 - ds["d_s_mtf"])
    return out
