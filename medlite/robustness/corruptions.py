"""Image corruptions at 5 severities, applied to stored uint8 images before preprocessing.

The generic set of ImageNet-C (Hendrycks & Dietterich, 2019) as MedMNIST-C (Di Salvo et al.,
2024) uses it on medical images: Gaussian noise, Gaussian blur, contrast, brightness, JPEG
compression and pixelation. Each works on a uint8 (H, W) or (H, W, C) image and returns one of
the same shape and dtype, so the run's own preprocessing (resize, channels, normalisation) comes
after it, as it would for an image from another scanner.

Severity parameters (index = severity - 1):

* ``gaussian_noise``: standard deviation of additive noise, as a fraction of the full range
  (0.04-0.26, MedMNIST-C's values; ImageNet-C's 0.08-0.38 are meant for 224 px photos).
* ``gaussian_blur``: sigma in pixels of a 28 px image (0.5-2), scaled with the image side, so a
  64 px image is blurred as much relative to its content.
* ``contrast``: ``(x - mean) * c + mean`` with c = 0.8-0.4 (MedMNIST-C's contrast reduction).
* ``brightness``: ``x + c`` with c = 0.1-0.5 of the full range (ImageNet-C; on grayscale the
  same as its shift of the HSV value channel), clipped.
* ``jpeg``: JPEG quality 25-7 (ImageNet-C).
* ``pixelate``: box downsampling to c = 0.6-0.25 of the side, then nearest upsampling
  (ImageNet-C's factors).

Only the noise is random; it draws from a generator seeded by (seed, severity, image index), so
a corruption of a given image is the same in every run and in any batch order.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

SEVERITIES = (1, 2, 3, 4, 5)

#: the parameter of each corruption at severities 1-5 (see the module docstring)
PARAMETERS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "gaussian_blur": (0.5, 0.75, 1.0, 1.5, 2.0),
    "contrast": (0.8, 0.7, 0.6, 0.5, 0.4),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "jpeg": (25, 18, 15, 10, 7),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
}
#: image side the blur sigmas are given for
BLUR_REFERENCE_SIDE = 28


def _to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def gaussian_noise(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = _to_float(image)
    return _to_uint8(x + rng.normal(0.0, c, size=x.shape).astype(np.float32))


def gaussian_blur(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    sigma = c * max(image.shape[:2]) / BLUR_REFERENCE_SIDE
    spatial = (sigma, sigma) + (0.0,) * (image.ndim - 2)  # never blur across channels
    return _to_uint8(gaussian_filter(_to_float(image), spatial, mode="reflect"))


def contrast(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = _to_float(image)
    mean = x.mean()
    return _to_uint8((x - mean) * c + mean)


def brightness(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(_to_float(image) + c)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)


def _back(pil: Image.Image, like: np.ndarray) -> np.ndarray:
    return np.asarray(pil, dtype=np.uint8).reshape(like.shape)


def jpeg(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="JPEG", quality=int(c))
    return _back(Image.open(buffer), image)


def pixelate(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    small = _pil(image).resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return _back(small.resize((w, h), Image.Resampling.NEAREST), image)


CORRUPTIONS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "jpeg": jpeg,
    "pixelate": pixelate,
}


def _rng(name: str, severity: int, index: int, seed: int) -> np.random.Generator:
    """One generator per (corruption, severity, image): independent of batching and order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), severity, index])


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0, index: int = 0):
    """``image`` (uint8) under corruption ``name`` at ``severity`` (1-5); same shape and dtype."""
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    c = PARAMETERS[name][severity - 1]
    return CORRUPTIONS[name](image, c, _rng(name, severity, index, seed))


def corrupt_all(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """A stack of uint8 images (N, H, W[, C]) under one corruption and severity."""
    out = np.empty_like(images)
    for i in range(len(images)):
        out[i] = corrupt(np.asarray(images[i]), name, severity, seed, index=i)
    return out
