"""Image metrics: numbers that stand in for judging a channel visualization by eye.

Every metric is a pure function of one H×W×3 RGB image (float, nominally in [0, 1]); see the
docs/metrics.md (the definitions this module implements). Y = 0.299 R + 0.587 G + 0.114 B is the Rec. 601 luma.

===============  ==========================================================================
metric           meaning (unit)
===============  ==========================================================================
brightness       mean(Y)  (luma, 0..1)
contrast         std(Y), population std: RMS contrast  (luma, 0..1)
clip_fraction    share of the 3·H·W channel values ≤ 1/255 or ≥ 254/255  (0..1)
dominance        share of Σ_p ‖I_p − mean(I)‖² carried by the top 1 % of pixels  (0..1)
hf_energy        share of non-DC luma power above half Nyquist, r > 0.25 cycles/pixel  (0..1)
spectral_slope   slope of log radial-mean power vs log r over 0.02 ≤ r ≤ 0.4  (≈ −2 photos,
                 ≈ 0 white noise)
checkerboard     share of non-DC luma power within 1/16 cycles/pixel (per axis) of the
                 period-2 frequencies (½,½), (½,0), (0,½)  (0..1; stride-2 artifacts)
sharpness        variance of the 3×3 Laplacian of Y over the valid region  (luma²)
colorfulness     Hasler & Süsstrunk (2003) on the 0..1 scale (the paper's number / 255)
===============  ==========================================================================

Definitional choices (docs/metrics.md states the definitions; these details make them exact):

- Spectrum: P = |FFT2(w · (Y − mean Y))|² with ``w`` the outer product of two *periodic* Hann
  windows, w[k] = ½ − ½ cos(2πk/n) (scipy's ``get_window('hann', n)``). Its DFT is exactly three
  bins wide, so a pure frequency that falls on a bin leaks into its 3×3 neighbourhood only: a
  pure checkerboard scores exactly 1. Frequencies come from ``np.fft.fftfreq`` (cycles/pixel),
  r = √(fx² + fy²), x along the width W, y along the height H.
- checkerboard windows use the circular distance on the frequency axis, so −½ and +½ are the same
  frequency: a bin is near ½ on an axis when ½ − |f| ≤ δ, near 0 when |f| ≤ δ, δ = 1/16. The
  bounds are inclusive, so for white noise the expected score is (number of bins in the three
  windows) / (H·W − 1), e.g. 867 / 16383 ≈ 0.0529 at 128×128, not the continuum 12δ² = 0.047.
- spectral_slope: radial mean power in 16 logarithmically spaced bins with edges from 0.02 to 0.4
  cycles/pixel (equal weight per octave, which is what a power law fit wants; linear annuli would
  let the many high-frequency bins dominate the fit). Each bin's abscissa is the mean log r of the
  frequency bins inside it. Radial bins that hold no frequency bin (small images) or whose mean
  power is at rounding level (≤ 1e-20 of the mean non-DC power, e.g. a pure checkerboard) are
  left out of the fit.
- dominance: the top 1 % is the ⌈H·W / 100⌉ pixels with the largest ‖I_p − mean(I)‖² (at least
  one pixel), with the mean RGB vector taken over the whole image.
- sharpness: the Laplacian kernel [[0, 1, 0], [1, −4, 1], [0, 1, 0]] on the valid region,
  (H − 2)×(W − 2) pixels, so no invented border pixels add edges.
- clip_fraction compares in the input's precision (the thresholds rounded to its dtype), so the
  8-bit levels 0, 1, 254, 255 count as clipped in a float32 image as in a float64 one.
- colorfulness: σ and μ are the population std and mean over the image.

Degenerate images never raise and never warn. When the luma is exactly constant there is no
spectrum: hf_energy, spectral_slope and checkerboard are NaN; contrast and sharpness are 0. When
all pixels have the same RGB vector there is nothing to share: dominance is NaN. spectral_slope is
also NaN when fewer than two radial bins carry power. Values outside [0, 1] (an unclamped
pixel-space image) are allowed; such values count as clipped.

:func:`image_stats_batch` does the work for N images at once (FFTs batched over N, memory kept
bounded by working through ~0.26 megapixel chunks); :func:`image_stats` calls it with N = 1.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["METRICS", "image_stats", "image_stats_batch"]

METRICS: tuple[str, ...] = (
    "brightness",
    "contrast",
    "clip_fraction",
    "dominance",
    "hf_energy",
    "spectral_slope",
    "checkerboard",
    "sharpness",
    "colorfulness",
)

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # Rec. 601, R, G, B
CLIP_LOW = 1.0 / 255.0  # channel values at or below this count as clipped to black
CLIP_HIGH = 254.0 / 255.0  # ... at or above this as clipped to white
DOMINANCE_TOP = 0.01  # share of pixels whose deviation energy dominance reports
HF_CUTOFF = 0.25  # cycles/pixel: half the Nyquist frequency
SLOPE_BAND = (0.02, 0.4)  # cycles/pixel: radii used by the spectral slope fit
SLOPE_BINS = 16  # logarithmic radial bins inside SLOPE_BAND
CHECKER_DELTA = 1.0 / 16.0  # cycles/pixel, half-width per axis of each checkerboard window
POWER_FLOOR = 1e-20  # radial bins with less than this × mean non-DC power count as empty
MIN_SIDE = 3  # the valid 3×3 Laplacian needs at least one output pixel

# Work on at most this many pixels per chunk (≈ 5 images of 224 px, 16 of 128 px): the float64
# working set stays a few MB, cache-sized, whatever N is, while the FFTs still run batched.
# Measured on 2 CPU cores: 2^18 was as fast as or faster than 2^16…2^22.
_CHUNK_PIXELS = 1 << 18


def image_stats(img: np.ndarray) -> dict[str, float]:
    """All metrics of one image.

    Args:
        img: (H, W, 3) RGB image, float, nominally in [0, 1]; H, W ≥ 3.

    Returns:
        ``{name: value}`` for every name in :data:`METRICS`, in that order, as Python floats
        (NaN where the module docstring says so).

    Raises:
        ValueError: if ``img`` is not (H, W, 3), not floating point, or not finite.
    """
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(
            f"image_stats expects one image of shape (H, W, 3), got shape {arr.shape}"
            + ("; use image_stats_batch for a batch" if arr.ndim == 4 else "")
        )
    batch = image_stats_batch(arr[None])
    return {name: float(batch[name][0]) for name in METRICS}


def image_stats_batch(imgs: np.ndarray) -> dict[str, np.ndarray]:
    """All metrics of N images, vectorized over N.

    Args:
        imgs: (N, H, W, 3) RGB images, float, nominally in [0, 1]; H, W ≥ 3; N may be 0.

    Returns:
        ``{name: (N,) float64 array}`` for every name in :data:`METRICS`, in that order
        (``pandas.DataFrame(result)`` gives one row per image).

    Raises:
        ValueError: if ``imgs`` is not (N, H, W, 3), not floating point, or not finite.
    """
    x = np.asarray(imgs)
    _check(x)
    n, h, w, _ = x.shape
    out = {name: np.empty(n, dtype=np.float64) for name in METRICS}
    # The clip thresholds in the input's precision: a float32 image read from 8-bit holds
    # float32(1/255), which is above the float64 1/255 and would otherwise not count as clipped.
    clip_low, clip_high = (float(np.asarray(t, dtype=x.dtype)) for t in (CLIP_LOW, CLIP_HIGH))
    step = max(1, _CHUNK_PIXELS // (h * w))
    for start in range(0, n, step):
        part_in = x[start : start + step].transpose(0, 3, 1, 2)  # (n, 3, H, W)
        chunk = np.ascontiguousarray(part_in, dtype=np.float64)
        part = _stats_chunk(chunk, clip_low, clip_high)
        for name in METRICS:
            out[name][start : start + step] = part[name]
    return out


def _check(x: np.ndarray) -> None:
    """Raise ValueError stating expected vs actual for anything the metrics cannot take."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"image_stats_batch expects images of shape (N, H, W, 3), got shape {x.shape}"
        )
    if x.shape[1] < MIN_SIDE or x.shape[2] < MIN_SIDE:
        raise ValueError(
            f"image metrics need H, W ≥ {MIN_SIDE} (shape (N, H, W, 3)), got shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        # An 8-bit image would silently score as if 255× too bright; make the caller scale it.
        raise ValueError(
            f"image metrics expect a floating-point image in [0, 1], got dtype {x.dtype} "
            f"(shape {x.shape}); divide 8-bit images by 255"
        )
    finite = np.isfinite(x).all(axis=(1, 2, 3))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"image metrics expect finite values, got NaN or inf in image(s) {bad[:10].tolist()} "
            f"of shape {x.shape}"
        )


def _stats_chunk(c: np.ndarray, clip_low: float, clip_high: float) -> dict[str, np.ndarray]:
    """Metrics of a chunk: c is (n, 3, H, W) float64, channel-planar; returns {name: (n,) array}.

    Channel-planar so that every reduction runs over one contiguous axis of H·W values (reducing
    the middle axis of (n, H·W, 3) is several times slower).
    """
    n, _, h, w = c.shape
    planes = c.reshape(n, 3, h * w)  # (n, 3, P) view, P = H·W
    r, g, b = planes[:, 0], planes[:, 1], planes[:, 2]
    wr, wg, wb = LUMA_WEIGHTS
    y = wr * r + wg * g + wb * b  # (n, P) luma
    mean_y = y.mean(axis=1)
    yc = y - mean_y[:, None]
    # An exactly constant luma can still leave ±1 ulp after subtracting a rounded mean; zero it so
    # constant images give an empty spectrum (NaN shares) and exactly 0 contrast and sharpness.
    yc[y.max(axis=1) == y.min(axis=1)] = 0.0
    # Contrast from the centered luma: the same number as np.std(y), without the ulp residue.
    contrast = np.sqrt(np.einsum("np,np->n", yc, yc) / (h * w))

    clipped = (planes <= clip_low) | (planes >= clip_high)
    clip = np.count_nonzero(clipped.reshape(n, -1), axis=1) / (3 * h * w)

    dominance = _dominance(planes)

    # Laplacian of the centered luma equals that of y (the kernel sums to 0) but is exact 0 for
    # constant images. Valid region only: (H − 2)×(W − 2) outputs.
    y2 = yc.reshape(n, h, w)
    lap = (
        y2[:, :-2, 1:-1] + y2[:, 2:, 1:-1] + y2[:, 1:-1, :-2] + y2[:, 1:-1, 2:]
        - 4.0 * y2[:, 1:-1, 1:-1]
    ).reshape(n, -1)
    sharpness = lap.var(axis=1)

    rg = r - g
    yb = 0.5 * (r + g) - b
    colorfulness = np.sqrt(rg.var(axis=1) + yb.var(axis=1)) + 0.3 * np.sqrt(
        rg.mean(axis=1) ** 2 + yb.mean(axis=1) ** 2
    )

    hf, slope, checker = _spectral(y2)
    return {
        "brightness": mean_y,
        "contrast": contrast,
        "clip_fraction": clip,
        "dominance": dominance,
        "hf_energy": hf,
        "spectral_slope": slope,
        "checkerboard": checker,
        "sharpness": sharpness,
        "colorfulness": colorfulness,
    }


def _dominance(planes: np.ndarray) -> np.ndarray:
    """Share of Σ_p ‖I_p − mean I‖² in the top ⌈1 %⌉ of pixels; planes (n, 3, P) -> (n,)."""
    n, _, p = planes.shape
    dev = planes - planes.mean(axis=2, keepdims=True)
    # Same ulp guard as for luma: a channel that is exactly constant has no deviation.
    dev[planes.max(axis=2) == planes.min(axis=2)] = 0.0
    energy = (dev * dev).sum(axis=1)  # (n, P) squared distance of each pixel to the mean colour
    k = (p + 99) // 100  # ⌈1 % of pixels⌉ in integers (0.01 * p can round up past k)
    top = np.partition(energy, p - k, axis=1)[:, p - k :].sum(axis=1)
    total = energy.sum(axis=1)
    return _share(top, total)


def _share(part: np.ndarray, total: np.ndarray) -> np.ndarray:
    """part / total, NaN (without a warning) where total is 0."""
    out = np.full(part.shape, np.nan)
    np.divide(part, total, out=out, where=total > 0)
    return out


@lru_cache(maxsize=16)
def _spectral_plan(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Everything about the frequency grid of an H×W image that does not depend on the pixels.

    Returns (window (H, W), weights (H·Wr, 3 + SLOPE_BINS), bin_log_r (SLOPE_BINS,), bin_used
    (SLOPE_BINS,) bool), Wr = W // 2 + 1 the rfft width. Column 0 of ``weights`` selects the non-DC
    bins, column 1 those with r > HF_CUTOFF, column 2 the checkerboard windows, the rest the
    radial bins of the slope fit, each normalized to a mean. Every entry carries the bin's
    multiplicity in the full spectrum, so P_rfft @ weights gives sums over the full FFT.
    """
    window = np.outer(_hann(h), _hann(w))
    fy = np.fft.fftfreq(h)[:, None]  # (H, 1) cycles/pixel along the height
    fx = np.fft.rfftfreq(w)[None, :]  # (1, Wr) cycles/pixel along the width, ≥ 0
    # rfft keeps fx ≥ 0: every other column stands for itself and its mirror −fx (same power for a
    # real input), except fx = 0 and, for even W, the Nyquist column fx = ½.
    mult = np.full(fx.shape, 2.0)
    mult[0, 0] = 1.0
    if w % 2 == 0:
        mult[0, -1] = 1.0
    mult = np.broadcast_to(mult, (h, fx.shape[1]))
    r = np.sqrt(fx**2 + fy**2)

    nondc = r > 0
    high = r > HF_CUTOFF
    # Circular distance to ½ on an axis is ½ − |f| (−½ and ½ are one frequency); to 0 it is |f|.
    near_half_x, near_zero_x = 0.5 - np.abs(fx) <= CHECKER_DELTA, np.abs(fx) <= CHECKER_DELTA
    near_half_y, near_zero_y = 0.5 - np.abs(fy) <= CHECKER_DELTA, np.abs(fy) <= CHECKER_DELTA
    checker = (
        (near_half_x & near_half_y) | (near_half_x & near_zero_y) | (near_zero_x & near_half_y)
    )

    edges = np.geomspace(SLOPE_BAND[0], SLOPE_BAND[1], SLOPE_BINS + 1)
    in_band = (r >= SLOPE_BAND[0]) & (r <= SLOPE_BAND[1])
    # Right-closed last edge so r = 0.4 itself lands in the last bin, not past it.
    which = np.clip(np.searchsorted(edges, r, side="right") - 1, 0, SLOPE_BINS - 1)
    radial = np.zeros(r.shape + (SLOPE_BINS,))
    radial[in_band, which[in_band]] = 1.0
    radial *= mult[..., None]
    counts = radial.sum(axis=(0, 1))  # (SLOPE_BINS,) full-spectrum bins per radial bin
    bin_used = counts > 0
    with np.errstate(divide="ignore"):  # log 0 at DC, never selected by in_band
        log_r = np.log(r)
    bin_log_r = np.zeros(SLOPE_BINS)
    bin_log_r[bin_used] = (
        np.einsum("hwb,hw->b", radial, np.where(in_band, log_r, 0.0))[bin_used] / counts[bin_used]
    )
    radial[..., bin_used] /= counts[bin_used]  # sums become radial means

    shares = np.stack([nondc, high, checker], axis=-1) * mult[..., None]
    weights = np.concatenate([shares, radial], axis=-1).reshape(h * fx.shape[1], -1)
    return window, weights, bin_log_r, bin_used


def _hann(n: int) -> np.ndarray:
    """Periodic Hann window of length n, (n,): its DFT is nonzero on 3 bins only."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def _spectral(yc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """hf_energy, spectral_slope, checkerboard of centered luma yc (n, H, W); each (n,)."""
    n, h, w = yc.shape
    window, weights, bin_log_r, bin_used = _spectral_plan(h, w)
    spec = np.fft.rfft2(yc * window)  # (n, H, Wr), batched over n
    power = spec.real**2 + spec.imag**2
    sums = power.reshape(n, -1) @ weights  # (n, 3 + SLOPE_BINS): one pass over the spectrum
    total, high, checker = sums[:, 0], sums[:, 1], sums[:, 2]
    hf = _share(high, total)
    checkerboard = _share(checker, total)

    radial = sums[:, 3:][:, bin_used]  # (n, B) radial mean power
    x = bin_log_r[bin_used]
    mean_nondc = total / (h * w - 1)
    ok = radial > POWER_FLOOR * mean_nondc[:, None]  # False for all bins of a zero spectrum
    y = np.log(np.where(ok, radial, 1.0))
    # Least squares per image over its own usable bins: 0/1 weights keep it vectorized.
    m = ok.astype(np.float64)
    cnt = m.sum(axis=1)
    safe = np.maximum(cnt, 1.0)
    xm = (m * x).sum(axis=1) / safe
    ym = (m * y).sum(axis=1) / safe
    dx = x[None, :] - xm[:, None]
    sxy = (m * dx * (y - ym[:, None])).sum(axis=1)
    sxx = (m * dx * dx).sum(axis=1)
    slope = np.full(n, np.nan)
    fit = cnt >= 2
    slope[fit] = sxy[fit] / sxx[fit]
    return hf, slope, checkerboard
