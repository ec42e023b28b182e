"""Tests for featsweep.blur: per-image box and Gaussian kernels against OpenCV (independent)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from featsweep.blur import batch_kernels, blur_batch, blur_kernel, opencv_sigma
from featsweep.spec import BlurSpec

TOL = 1e-5
H, W = 23, 31  # odd, non-square: catches transposed kernels and off-by-one borders


def box(k: int) -> BlurSpec:
    return BlurSpec(kind="box", k=k, sigma=None, every=1)


def gauss(k: int, sigma: float | None = None) -> BlurSpec:
    return BlurSpec(kind="gaussian", k=k, sigma=sigma, every=1)


def images(batch: int, seed: int = 0, h: int = H, w: int = W) -> torch.Tensor:
    """(B, 3, h, w) float32 in [-2, 3]: not only [0, 1], as normalized-space images are not."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g) * 5 - 2


def to_hwc(img: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(img.permute(1, 2, 0).numpy())


def cv2_reference(img: torch.Tensor, spec: BlurSpec) -> torch.Tensor:
    """OpenCV's blur of one (3, H, W) image, reflect-101 borders (OpenCV's default, the notes')."""
    a = to_hwc(img)
    if spec.kind == "box":
        out = cv2.blur(a, (spec.k, spec.k), borderType=cv2.BORDER_REFLECT_101)
    else:
        # The rule featsweep documents for sigma=null, written out here independently of blur.py.
        sigma = spec.sigma if spec.sigma is not None else 0.3 * ((spec.k - 1) * 0.5 - 1) + 0.8
        out = cv2.GaussianBlur(a, (spec.k, spec.k), sigmaX=sigma, sigmaY=sigma,
                               borderType=cv2.BORDER_REFLECT_101)
    return torch.from_numpy(out).permute(2, 0, 1)


def blur_one(img: torch.Tensor, spec: BlurSpec) -> torch.Tensor:
    """featsweep's blur of one (3, H, W) image."""
    return blur_batch(img[None], batch_kernels([spec]))[0]


class TestKernels:
    def test_smoke_shapes(self) -> None:
        k = batch_kernels([box(3), gauss(7), box(1), BlurSpec("none", 1, None, 1)])
        assert k.shape == (4, 7, 7)
        assert k.dtype == torch.float32

    @pytest.mark.parametrize("spec", [box(3), box(7), gauss(5), gauss(7, 3.0)], ids=str)
    def test_kernels_sum_to_one_and_are_symmetric(self, spec: BlurSpec) -> None:
        kern = blur_kernel(spec)
        assert kern.shape == (spec.k, spec.k)
        assert kern.sum().item() == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(kern, kern.flip(0))
        torch.testing.assert_close(kern, kern.T)

    def test_padded_kernel_is_centred(self) -> None:
        k = batch_kernels([box(3), box(7)])
        torch.testing.assert_close(k[0, 2:5, 2:5], torch.full((3, 3), 1 / 9))
        inner = torch.zeros(7, 7, dtype=torch.bool)
        inner[2:5, 2:5] = True
        assert torch.all(k[0][~inner] == 0)

    @pytest.mark.parametrize("k", [3, 5, 7, 9])
    def test_opencv_sigma_rule(self, k: int) -> None:
        assert opencv_sigma(k) == pytest.approx(0.3 * ((k - 1) * 0.5 - 1) + 0.8)


class TestBlurAgainstOpenCV:
    @pytest.mark.parametrize("k", [3, 5, 7])
    def test_box_equals_cv2_blur(self, k: int) -> None:
        for img in images(3, seed=k):
            torch.testing.assert_close(blur_one(img, box(k)), cv2_reference(img, box(k)),
                                       rtol=0, atol=TOL)

    @pytest.mark.parametrize("sigma", [None, 0.6, 1.5, 4.0])
    @pytest.mark.parametrize("k", [3, 5, 7])
    def test_gaussian_equals_cv2_gaussian_blur(self, k: int, sigma: float | None) -> None:
        spec = gauss(k, sigma)
        for img in images(3, seed=10 * k):
            torch.testing.assert_close(blur_one(img, spec), cv2_reference(img, spec),
                                       rtol=0, atol=TOL)

    def test_small_image_borders(self) -> None:
        """Reflect-101 on an image barely larger than the kernel's reach."""
        img = images(1, seed=3, h=5, w=6)[0]
        for spec in (box(7), gauss(7, 2.0)):
            torch.testing.assert_close(blur_one(img, spec), cv2_reference(img, spec),
                                       rtol=0, atol=TOL)


class TestPerImageKernels:
    SPECS = [box(3), gauss(7), box(1), box(5), gauss(3, 2.0), BlurSpec("none", 1, None, 1), box(7)]

    def test_batched_equals_per_item(self) -> None:
        x = images(len(self.SPECS), seed=5)
        together = blur_batch(x, batch_kernels(self.SPECS))
        assert together.shape == x.shape
        for i, spec in enumerate(self.SPECS):
            alone = blur_batch(x[i:i + 1], batch_kernels([spec]))
            torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=TOL)

    def test_batched_equals_opencv_per_item(self) -> None:
        x = images(len(self.SPECS), seed=6)
        together = blur_batch(x, batch_kernels(self.SPECS))
        for i, spec in enumerate(self.SPECS):
            want = x[i] if spec.kind == "none" or spec.k == 1 else cv2_reference(x[i], spec)
            torch.testing.assert_close(together[i], want, rtol=0, atol=TOL)

    @pytest.mark.parametrize("spec", [box(1), gauss(1), BlurSpec("none", 1, None, 1)], ids=str)
    def test_k1_is_identity(self, spec: BlurSpec) -> None:
        x = images(2, seed=7)
        assert torch.equal(blur_batch(x, batch_kernels([spec, spec])), x)

    def test_k1_in_mixed_batch_is_identity(self) -> None:
        x = images(2, seed=8)
        out = blur_batch(x, batch_kernels([box(1), box(5)]))
        torch.testing.assert_close(out[0], x[0], rtol=0, atol=1e-6)
        assert not torch.allclose(out[1], x[1])

    def test_shared_kernel_broadcasts(self) -> None:
        """A (1, k, k) kernel blurs every image of the batch the same way."""
        x = images(3, seed=9)
        out = blur_batch(x, batch_kernels([box(3)]))
        for i in range(3):
            torch.testing.assert_close(out[i], cv2_reference(x[i], box(3)), rtol=0, atol=TOL)

    def test_blur_preserves_mean_of_constant(self) -> None:
        x = torch.full((2, 3, 9, 9), 0.37)
        out = blur_batch(x, batch_kernels([box(5), gauss(7)]))
        torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
