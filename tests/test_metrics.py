"""Tests for featsweep.metrics: every metric on synthetic images whose answer is known."""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
import pytest
from scipy import ndimage

from featsweep import metrics
from featsweep.metrics import METRICS, image_stats, image_stats_batch

N = 128  # side of most test images, pixels


# --------------------------------------------------------------------------- image factories


def grey(plane: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3) with R = G = B."""
    return np.repeat(plane[..., None], 3, axis=2).astype(np.float64)


def noise(seed: int, n: int = N) -> np.ndarray:
    """Uniform RGB white noise, (n, n, 3)."""
    return np.random.default_rng(seed).random((n, n, 3))


def checkerboard(n: int = N) -> np.ndarray:
    """Pixel (i + j) % 2: all power at (½, ½)."""
    return grey(np.add.outer(np.arange(n), np.arange(n)) % 2)


def column_stripes(n: int = N) -> np.ndarray:
    """Pixel j % 2 (alternating columns): all power at (fx, fy) = (½, 0)."""
    return grey(np.tile(np.arange(n) % 2, (n, 1)))


def gradient(n: int = N) -> np.ndarray:
    """Smooth horizontal ramp 0 -> 1."""
    return grey(np.tile(np.linspace(0.0, 1.0, n), (n, 1)))


def cosine(k: int, n: int = N) -> np.ndarray:
    """Horizontal cosine at exactly k/n cycles/pixel, in [0, 1]."""
    return grey(np.tile(0.5 + 0.5 * np.cos(2 * np.pi * k * np.arange(n) / n), (n, 1)))


def power_law(alpha: float, seeds: range, n: int = N) -> np.ndarray:
    """(len(seeds), n, n, 3) grey images whose expected power spectrum is 1/f^alpha."""
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.fftfreq(n)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    out = []
    for seed in seeds:
        spec = np.fft.fft2(np.random.default_rng(seed).standard_normal((n, n)))
        spec *= f ** (-alpha / 2)  # amplitude 1/f^(α/2) -> power 1/f^α
        spec[0, 0] = 0.0
        im = np.fft.ifft2(spec).real
        out.append(grey((im - im.min()) / (im.max() - im.min())))  # affine: slope unchanged
    return np.stack(out)


def luma(img: np.ndarray) -> np.ndarray:
    return 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]


# --------------------------------------------------------------------------- smoke / contract


def test_keys_types_and_order():
    stats = image_stats(noise(0, 32))
    assert list(stats) == list(METRICS)
    assert all(type(v) is float and math.isfinite(v) for v in stats.values())


def test_batch_returns_arrays_per_metric():
    out = image_stats_batch(np.stack([noise(0, 16), noise(1, 16), noise(2, 16)]))
    assert list(out) == list(METRICS)
    assert all(v.shape == (3,) and v.dtype == np.float64 for v in out.values())


def test_empty_batch():
    out = image_stats_batch(np.zeros((0, 16, 16, 3)))
    assert all(v.shape == (0,) for v in out.values())


def test_input_not_modified():
    img = noise(3, 20)
    before = img.copy()
    image_stats(img)
    np.testing.assert_array_equal(img, before)


# --------------------------------------------------------------------------- brightness / contrast


def test_brightness_and_contrast_are_luma_mean_and_std():
    img = noise(4, 40)
    stats = image_stats(img)
    assert stats["brightness"] == pytest.approx(luma(img).mean(), rel=1e-12)
    assert stats["contrast"] == pytest.approx(np.std(luma(img)), rel=1e-12)


def test_luma_weights_are_rec601():
    pure = {c: np.zeros((8, 8, 3)) for c in range(3)}
    for c, img in pure.items():
        img[..., c] = 1.0
    assert [image_stats(pure[c])["brightness"] for c in range(3)] == pytest.approx(
        [0.299, 0.587, 0.114], abs=1e-15
    )


def test_darkened_copy_halves_brightness_and_contrast():
    img = noise(5, 64)
    bright, dark = image_stats(img), image_stats(img * 0.5)
    # Scaling by 0.5 is exact in binary floating point, so the halving is too.
    assert dark["brightness"] == 0.5 * bright["brightness"]
    assert dark["contrast"] == 0.5 * bright["contrast"]
    assert dark["brightness"] < bright["brightness"] and dark["contrast"] < bright["contrast"]


# --------------------------------------------------------------------------- clip_fraction


def test_clip_fraction_exact_on_constructed_image():
    img = np.full((10, 10, 3), 0.5)
    flat = img.reshape(-1)
    flat[:7] = 0.0  # clipped
    flat[7:10] = 1.0 / 255.0  # clipped: the bound is inclusive
    flat[10:14] = 254.0 / 255.0  # clipped: inclusive
    flat[14:16] = 1.0  # clipped
    flat[16:18] = -0.2  # below range: clipped
    flat[18:19] = 1.3  # above range: clipped
    flat[19:25] = 1.0 / 255.0 + 1e-9  # just inside: not clipped
    flat[25:30] = 254.0 / 255.0 - 1e-9  # just inside: not clipped
    assert image_stats(img)["clip_fraction"] == 19 / 300


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_fraction_counts_8bit_levels_0_1_254_255_in_any_float_dtype(dtype):
    # All 256 8-bit levels as k/255 in the image's own dtype (what reading a PNG gives).
    levels = (np.arange(256, dtype=dtype) / dtype(255)).reshape(16, 16)
    img = np.repeat(levels[..., None], 3, axis=2)
    assert image_stats(img)["clip_fraction"] == 4 / 256


# --------------------------------------------------------------------------- dominance


def expected_dominance(n_pixels: int, n_white: int) -> float:
    """Dominance of a black image with n_white white pixels, worked out by hand."""
    q = n_white / n_pixels  # mean colour is (q, q, q)
    white, black = 3 * (1 - q) ** 2, 3 * q**2  # ‖I_p − mean‖² of each kind of pixel
    k = math.ceil(n_pixels / 100)  # top 1 %, rounded up
    top = min(k, n_white) * white + max(0, k - n_white) * black
    return top / (n_white * white + (n_pixels - n_white) * black)


def test_dominance_black_with_half_percent_white_pixels():
    n_white = round(0.005 * N * N)  # 82 of 16384
    img = np.zeros((N, N, 3))
    where = np.random.default_rng(6).choice(N * N, size=n_white, replace=False)
    img.reshape(-1, 3)[where] = 1.0
    dominance = image_stats(img)["dominance"]
    assert dominance > 0.9
    assert dominance == pytest.approx(expected_dominance(N * N, n_white), rel=1e-12)


def test_dominance_top_share_rounds_up():
    # 150 pixels: the top 1 % is ⌈1.5⌉ = 2 pixels, so both white pixels are in it.
    img = np.zeros((10, 15, 3))
    img[2, 3] = img[7, 9] = 1.0
    assert image_stats(img)["dominance"] == pytest.approx(expected_dominance(150, 2), rel=1e-12)
    assert image_stats(img)["dominance"] > 0.95  # with ⌊1.5⌋ = 1 pixel it would be ≈ 0.5


def test_dominance_of_white_noise_is_small():
    assert image_stats(noise(7))["dominance"] < 0.05


# --------------------------------------------------------------------------- spectrum


# White-noise baseline of `checkerboard`, derived for the 128×128 grid.
# Windowed white noise has a flat expected power spectrum, E P(k) = σ² Σ w², so the expected share
# is (bins inside the three windows) / (non-DC bins). Per axis the bins are f = k/128, and δ = 1/16
# is exactly 8 bins; the bounds are inclusive:
#   near 0:  |k| ≤ 8                               -> 17 values
#   near ½:  ½ − |f| ≤ 1/16, k ∈ {56..63, −64..−56}  -> 17 values (−64/128 = −½ is ½ aliased)
# Each window is 17 × 17 = 289 bins, the three are disjoint: 867 bins; non-DC bins: 128² − 1.
# (Subtracting the image mean removes a little expected power from the 8 bins next to DC —
# 5/9 of one bin in all for the periodic Hann window — changing the baseline by 3e-5 relative.)
CHECKER_BINS_128 = 3 * 17 * 17
# Baseline = 867 / 16383 = 0.052921 (the continuum 12δ² = 0.0469 misses the inclusive edges).
WHITE_NOISE_CHECKERBOARD_128 = CHECKER_BINS_128 / (N * N - 1)


def test_white_noise_checkerboard_baseline_derivation_counts_bins():
    # Check the hand count above against a brute-force count on the fftfreq grid.
    f = np.fft.fftfreq(N)
    near_half = 0.5 - np.abs(f) <= 1 / 16
    near_zero = np.abs(f) <= 1 / 16
    count = sum(
        np.outer(a, b).sum()
        for a, b in [(near_half, near_half), (near_half, near_zero), (near_zero, near_half)]
    )
    assert count == CHECKER_BINS_128
    assert WHITE_NOISE_CHECKERBOARD_128 == pytest.approx(0.052921, abs=1e-6)


def test_white_noise_checkerboard_near_baseline():
    one = image_stats(noise(8))["checkerboard"]
    assert abs(one / WHITE_NOISE_CHECKERBOARD_128 - 1) < 0.2
    # One image scatters by ~9 %; the mean of 32 (σ ≈ 1.6 %) pins the baseline itself.
    many = image_stats_batch(np.stack([noise(100 + s) for s in range(32)]))["checkerboard"]
    assert abs(many.mean() / WHITE_NOISE_CHECKERBOARD_128 - 1) < 0.05


def test_checkerboard_of_a_checkerboard():
    assert image_stats(checkerboard())["checkerboard"] > 0.9
    # Periodic Hann: the windowed pattern occupies the 3×3 bins around (½,½), all inside δ.
    assert image_stats(checkerboard())["checkerboard"] == pytest.approx(1.0, abs=1e-12)


def test_checkerboard_counts_period_2_stripes_both_ways():
    assert image_stats(column_stripes())["checkerboard"] > 0.9  # (½, 0)
    assert image_stats(column_stripes().transpose(1, 0, 2))["checkerboard"] > 0.9  # (0, ½)


def test_checkerboard_odd_size_still_found():
    # With 63 px, ½ is not on the grid; the power still lands within δ of it.
    assert image_stats(checkerboard(63))["checkerboard"] > 0.9


def test_checkerboard_ignores_period_4():
    # Period 4 (¼ cycle/pixel) is an ordinary frequency, 1/4 away from ½: not a checkerboard.
    assert image_stats(cosine(N // 4))["checkerboard"] < 1e-6


def test_smooth_gradient_has_no_checkerboard_and_no_high_frequencies():
    stats = image_stats(gradient())
    assert stats["checkerboard"] < 0.01
    assert stats["hf_energy"] < 1e-6
    assert stats["sharpness"] < 1e-20  # a linear ramp has zero Laplacian


def test_hf_energy_cutoff_at_quarter_cycle():
    # Periodic Hann spreads a bin-exact cosine over ±1 bin only: 0.25 ± 2/128 is clear of the cut.
    assert image_stats(cosine(34))["hf_energy"] == pytest.approx(1.0, abs=1e-12)  # 0.266 c/px
    assert image_stats(cosine(30))["hf_energy"] == pytest.approx(0.0, abs=1e-12)  # 0.234 c/px


def test_blur_lowers_hf_energy_and_sharpness():
    img = noise(9)
    blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=1.5)
    sharp, soft = image_stats(img), image_stats(blurred)
    assert soft["hf_energy"] < 0.1 * sharp["hf_energy"]
    assert soft["sharpness"] < 0.1 * sharp["sharpness"]
    soft_scipy = image_stats(ndimage.gaussian_filter(img, sigma=(1.5, 1.5, 0)))
    assert soft_scipy["hf_energy"] < 0.1 * sharp["hf_energy"]


def test_spectral_slope_of_white_noise_is_flat():
    assert abs(image_stats(noise(10))["spectral_slope"]) < 0.3


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_spectral_slope_of_power_law_noise(alpha):
    slopes = image_stats_batch(power_law(alpha, range(8)))["spectral_slope"]
    # Single images scatter by ~0.12 around −α; the mean of 8 is within ~0.05.
    assert np.all(np.abs(slopes + alpha) < 0.5)
    assert abs(slopes.mean() + alpha) < 0.15


def test_spectral_slope_one_over_f_squared():
    slope = image_stats_batch(power_law(2.0, range(20, 28)))["spectral_slope"].mean()
    assert slope == pytest.approx(-2.0, abs=0.3)


def reference_spectrum(img: np.ndarray) -> dict[str, float]:
    """Straightforward full-FFT implementation of the DESIGN definitions, for comparison."""
    h, w, _ = img.shape
    y = luma(img)
    hann = lambda n: 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)  # noqa: E731
    p = np.abs(np.fft.fft2(np.outer(hann(h), hann(w)) * (y - y.mean()))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    r = np.hypot(fx, fy)
    d = 1 / 16

    def near(f: np.ndarray, a: float) -> np.ndarray:
        return np.minimum(np.abs(f - a) % 1, 1 - np.abs(f - a) % 1) <= d  # circular distance

    window = (
        (near(fx, 0.5) & near(fy, 0.5))
        | (near(fx, 0.5) & near(fy, 0))
        | (near(fx, 0) & near(fy, 0.5))
    )
    edges = np.geomspace(0.02, 0.4, 17)
    xs, ys = [], []
    for lo, hi, last in zip(edges[:-1], edges[1:], [False] * 15 + [True]):
        sel = (r >= lo) & ((r <= hi) if last else (r < hi))
        if sel.any():
            xs.append(np.log(r[sel]).mean())
            ys.append(np.log(p[sel].mean()))
    return {
        "hf_energy": p[r > 0.25].sum() / p[r > 0].sum(),
        "checkerboard": p[window].sum() / p[r > 0].sum(),
        "spectral_slope": np.polyfit(xs, ys, 1)[0],
    }


@pytest.mark.parametrize("shape", [(64, 64), (37, 50), (50, 37), (63, 64)])
def test_spectral_metrics_match_full_fft_reference(shape):
    # The module uses rfft2 with mirrored-bin weights; the reference uses the whole fft2 grid.
    rng = np.random.default_rng(11)
    img = ndimage.uniform_filter(rng.random(shape + (3,)), size=(1, 2, 1))  # anisotropic, coloured
    got, want = image_stats(img), reference_spectrum(img)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-9), name


# ------------------------------------------------------------------------ sharpness / colorfulness


def test_sharpness_is_variance_of_valid_laplacian():
    img = noise(12, 40)
    lap = cv2.Laplacian(luma(img), cv2.CV_64F, ksize=1)  # ksize=1: [[0,1,0],[1,-4,1],[0,1,0]]
    assert image_stats(img)["sharpness"] == pytest.approx(lap[1:-1, 1:-1].var(), rel=1e-10)


def test_colorfulness_zero_for_grey():
    assert image_stats(grey(noise(13, 32)[..., 0]))["colorfulness"] == 0.0


def test_colorfulness_matches_hand_computation():
    img = noise(14, 32) * np.array([1.0, 0.6, 0.3])  # a warm cast, so the mean term matters
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    want = math.sqrt(np.std(rg) ** 2 + np.std(yb) ** 2) + 0.3 * math.sqrt(
        np.mean(rg) ** 2 + np.mean(yb) ** 2
    )
    assert image_stats(img)["colorfulness"] == pytest.approx(want, rel=1e-12)


def test_colorfulness_of_pure_red():
    # rg = 1, yb = ½, no spread: 0.3 · √(1 + ¼).
    red = np.zeros((8, 8, 3))
    red[..., 0] = 1.0
    assert image_stats(red)["colorfulness"] == pytest.approx(0.3 * math.sqrt(1.25), rel=1e-15)


# --------------------------------------------------------------------------- degenerate images


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0, 0.1 + 0.2])
def test_constant_image_is_nan_where_documented_and_silent(value):
    img = np.full((32, 48, 3), value)
    img[..., 1] = value / 3  # a colour, not grey: still constant
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = image_stats(img)
    for name in ("hf_energy", "spectral_slope", "checkerboard", "dominance"):
        assert math.isnan(stats[name]), name
    assert stats["contrast"] == 0.0 and stats["sharpness"] == 0.0
    for name in ("brightness", "clip_fraction", "colorfulness"):
        assert math.isfinite(stats[name]), name


def test_pattern_without_mid_band_power_has_nan_slope_not_garbage():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(image_stats(checkerboard())["spectral_slope"])


# --------------------------------------------------------------------------- batch behaviour


def test_batch_equals_per_image_and_is_independent_of_chunking(monkeypatch):
    imgs = np.stack(
        [
            noise(15, 24),
            checkerboard(24),
            gradient(24),
            np.full((24, 24, 3), 0.4),
            noise(16, 24) ** 3,
        ]
    )
    whole = image_stats_batch(imgs)
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 2 * 24 * 24)  # chunks of 2, 2, 1
    chunked = image_stats_batch(imgs)
    for i, img in enumerate(imgs):
        single = image_stats(img)
        for name in METRICS:
            np.testing.assert_allclose(whole[name][i], single[name], rtol=1e-12, err_msg=name)
            np.testing.assert_allclose(chunked[name][i], single[name], rtol=1e-12, err_msg=name)


def test_float32_input_matches_float64():
    img = noise(17, 32).astype(np.float32)
    a, b = image_stats(img), image_stats(img.astype(np.float64))
    assert a == pytest.approx(b, rel=1e-12, nan_ok=True)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "shape, pattern",
    [
        ((8, 8), r"shape \(H, W, 3\), got shape \(8, 8\)"),
        ((8, 8, 4), r"shape \(H, W, 3\), got shape \(8, 8, 4\)"),
        ((2, 8, 8, 3), r"shape \(H, W, 3\), got shape \(2, 8, 8, 3\); use image_stats_batch"),
        ((2, 8, 3), r"H, W ≥ 3 .*got shape \(1, 2, 8, 3\)"),
    ],
)
def test_image_stats_rejects_bad_shapes(shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        image_stats(np.zeros(shape))


def re_shape(shape: tuple[int, ...]) -> str:
    """Regex for a shape tuple as Python prints it."""
    return r"\(" + r", ".join(map(str, shape)) + r"\)"


@pytest.mark.parametrize("shape", [(8, 8, 3), (2, 8, 8, 1), (2, 3, 8, 8)])
def test_image_stats_batch_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\), got shape " + re_shape(shape)):
        image_stats_batch(np.zeros(shape))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_rejected_naming_the_image(bad):
    imgs = np.zeros((4, 8, 8, 3))
    imgs[2, 3, 4, 1] = bad
    message = r"finite values, got NaN or inf in image\(s\) \[2\] of shape \(4, 8, 8, 3\)"
    with pytest.raises(ValueError, match=message):
        image_stats_batch(imgs)
    with pytest.raises(ValueError, match=r"finite"):
        image_stats(imgs[2])


def test_integer_images_rejected():
    with pytest.raises(ValueError, match=r"floating-point image in \[0, 1\], got dtype uint8"):
        image_stats(np.zeros((8, 8, 3), dtype=np.uint8))
