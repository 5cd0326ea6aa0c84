"""Image transforms: uint8 images -> normalised float tensors at the model's input size.

The same :class:`Preprocess` is used for validation, test, export calibration and local
inference, so a deployed model sees exactly what it saw in training: an image of another size is
first fitted to the dataset's stored size (as the training images were), then to the model's
input size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torch.nn import functional as F
from torchvision import tv_tensors

from medlite.errors import ConfigError

FIT_MODES = ("resize", "pad")
#: per-channel mean and std when neither the config nor pretrained weights give any (MedMNIST)
DEFAULT_NORM = 0.5


def normalisation(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: int,
    pretrained: tuple[Sequence[float], Sequence[float]] | None = None,
) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` for ``channels`` inputs: ``data.mean``/``data.std`` when set,
    else the pretrained weights' RGB statistics (averaged for 1-channel input, which the summed
    RGB kernels of the first conv see as R = G = B), else 0.5."""
    if mean or std:
        m = list(mean) if mean else [DEFAULT_NORM] * channels
        s = list(std) if std else [DEFAULT_NORM] * channels
    elif pretrained is not None:
        m, s = (list(v) for v in pretrained)
        if channels == 1 and len(m) == 3:
            m, s = [sum(m) / 3], [sum(s) / 3]
    else:
        m, s = [DEFAULT_NORM] * channels, [DEFAULT_NORM] * channels
    if len(m) != channels or len(s) != channels:
        raise ConfigError(
            f"data.mean/data.std need {channels} value(s) for {channels}-channel input"
        )
    return [float(v) for v in m], [float(v) for v in s]


def to_tensor(image: np.ndarray, as_rgb: bool, spatial_dims: int = 2) -> torch.Tensor:
    """uint8 -> (C, *spatial) float in [0, 1]; grayscale repeated to 3 channels on request.

    2D: (H, W) or (H, W, C). 3D: (D, H, W) (volumes are single-channel, as MedMNIST 3D)."""
    t = torch.from_numpy(np.ascontiguousarray(image))
    if t.ndim == spatial_dims:
        t = t.unsqueeze(0)
    elif spatial_dims == 2:
        t = t.permute(2, 0, 1)
    else:
        raise ValueError(f"a volume must be (D, H, W), got shape {tuple(image.shape)}")
    t = t.float().div_(255.0)
    if as_rgb and t.shape[0] == 1:
        t = t.expand(3, *t.shape[1:])
    return t


def fit_to_size(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Bring a (C, H, W) image or (C, D, H, W) volume to side ``size`` on every spatial axis.

    ``resize``: bilinear / trilinear (antialiased when shrinking an image; a volume's axes that
    shrink by more than 2x are area-averaged first, as 3D interpolation has no antialiasing),
    aspect ratio not kept. ``pad``: keep the aspect ratio: an input larger than ``size`` is first shrunk so
    its longest side is ``size``, then centred on zeros (black).
    """
    shape = tuple(x.shape[1:])
    if all(s == size for s in shape):
        return x
    if mode == "pad":
        if max(shape) > size:
            scale = size / max(shape)
            shape = tuple(max(1, round(s * scale)) for s in shape)
            x = _resize(x, shape)
        pads: list[int] = []
        for s in reversed(shape):  # F.pad lists the last axis first
            before = (size - s) // 2
            pads += [before, size - s - before]
        return F.pad(x, pads)
    return _resize(x, (size,) * len(shape))


def _resize(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 3:
        old_shape = tuple(x.shape[1:])
        v = x.unsqueeze(0)
        if any(old > 2 * new for new, old in zip(shape, old_shape, strict=True)):
            # area-average the axes that shrink (no aliasing), leave the others for trilinear
            shrunk = tuple(min(new, old) for new, old in zip(shape, old_shape, strict=True))
            v = F.interpolate(v, size=shrunk, mode="area")
        if tuple(v.shape[2:]) != shape:
            v = F.interpolate(v, size=shape, mode="trilinear", align_corners=False)
        return v[0]
    shrink = any(new < old for new, old in zip(shape, x.shape[1:], strict=True))
    return F.interpolate(
        x.unsqueeze(0), size=shape, mode="bilinear", antialias=shrink, align_corners=False
    )[0]


def fit_image(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """A uint8 (H, W) or (H, W, C) image at (size, size), by the same rule as :func:`fit_to_size`
    (how sources of images of any size store them at the dataset's size)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    if image.shape[0] * image.shape[1] > STRIP_PIXELS and max(image.shape[:2]) > size:
        x = _fit_in_strips(image, size, mode)
    else:
        x = fit_to_size(to_tensor(image, as_rgb=False), size, mode)
    out = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return out[0].numpy() if image.ndim == 2 else out.permute(1, 2, 0).contiguous().numpy()


#: images with more pixels than this are fitted strip by strip (:func:`_fit_in_strips`)
STRIP_PIXELS = 1 << 22
#: values per strip of :func:`_fit_in_strips` (4 MB as float32)
_STRIP_VALUES = 1 << 20


def _fit_in_strips(image: np.ndarray, size: int, mode: str) -> torch.Tensor:
    """:func:`fit_to_size` of a large uint8 image without a full-size float copy (4 bytes per
    pixel and channel): the width is resized strip by strip, then the narrow result's height.
    torch's antialiased bilinear is separable (width first), so the result is bit-identical."""
    height, width = image.shape[:2]
    shape = (size, size)
    if mode == "pad":
        scale = size / max(height, width)
        shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    strips = []
    rows = max(1, _STRIP_VALUES // (image[0].size or 1))
    for top in range(0, height, rows):
        x = to_tensor(image[top : top + rows], as_rgb=False)
        strips.append(_resize_aa(x, (x.shape[1], shape[1]), antialias=True))
    x = _resize_aa(torch.cat(strips, dim=1), shape, antialias=True)
    return fit_to_size(x, size, mode) if mode == "pad" else x


def _resize_aa(x: torch.Tensor, shape: tuple[int, int], antialias: bool) -> torch.Tensor:
    return F.interpolate(
        x.unsqueeze(0), size=shape, mode="bilinear", antialias=antialias, align_corners=False
    )[0]


def fit_volume(volume: np.ndarray, size: int, mode: str) -> np.ndarray:
    """A uint8 (D, H, W) volume at size³ by the rule of :func:`fit_to_size` (how a source of
    volumes of any shape stores them at the dataset's size)."""
    if all(s == size for s in volume.shape):
        return volume
    x = fit_to_size(to_tensor(volume, as_rgb=False, spatial_dims=3), size, mode)
    return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)[0].numpy()


def fit_mask(mask: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """A (H, W) integer mask at (size, size) by the geometry of :func:`fit_to_size`, with
    nearest-neighbour sampling (class indices never blend) and background (0) padding."""
    h, w = mask.shape[-2:]
    if h == size and w == size:
        return mask
    m = mask.reshape(1, 1, h, w).float()
    if mode == "pad":
        if h > size or w > size:
            scale = size / max(h, w)
            h, w = max(1, round(h * scale)), max(1, round(w * scale))
            m = F.interpolate(m, size=(h, w), mode="nearest-exact")
        top, left = (size - h) // 2, (size - w) // 2
        m = F.pad(m, (left, size - w - left, top, size - h - top))
    else:
        m = F.interpolate(m, size=(size, size), mode="nearest-exact")
    return m[0, 0].to(mask.dtype)


def _nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array (pixel centres, as torch's ``nearest-exact``)."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


class Preprocess:
    """Deterministic part: to float, channels, input size, normalisation. Picklable for workers.

    ``load_size`` is the size the dataset stores its images at: an image of another size (a file
    given to ``predict.py``) is fitted to it first, as a source fits the files it reads.
    ``spatial_dims`` 3: inputs are uint8 (D, H, W) volumes, fitted to ``input_size``³.
    """

    def __init__(
        self,
        input_size: int,
        as_rgb: bool,
        mean: Sequence[float],
        std: Sequence[float],
        fit: str = "resize",
        load_size: int | None = None,
        spatial_dims: int = 2,
    ):
        if fit not in FIT_MODES:
            raise ConfigError(f"data.fit must be one of {FIT_MODES}, got {fit!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.input_size, self.as_rgb, self.fit = input_size, as_rgb, fit
        self.load_size, self.spatial_dims = load_size, spatial_dims
        view = (-1,) + (1,) * spatial_dims
        self.mean = torch.tensor(mean, dtype=torch.float32).view(view)
        self.std = torch.tensor(std, dtype=torch.float32).view(view)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input without the batch axis: (C, S, S) or (C, S, S, S)."""
        return (self.mean.numel(),) + (self.input_size,) * self.spatial_dims

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """Float [0, 1] at the input size: where augmentation happens (black fill stays black)."""
        if self.spatial_dims == 3:
            if self.load_size:
                image = fit_volume(image, self.load_size, self.fit)
            x = to_tensor(image, self.as_rgb, spatial_dims=3)
            return fit_to_size(x, self.input_size, self.fit)
        if self.load_size:
            image = fit_image(image, self.load_size, self.fit)
        return fit_to_size(to_tensor(image, self.as_rgb), self.input_size, self.fit)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """A segmentation mask (H, W) of class indices, fitted like its image: (S, S) long."""
        m = torch.from_numpy(np.ascontiguousarray(mask)).long()
        if self.load_size:
            m = fit_mask(m, self.load_size, self.fit)
        return fit_mask(m, self.input_size, self.fit)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.normalize(self.prepare(image))

    def restore_mask(self, mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A class map at the model's input size -> the same map at an original (H, W).

        The part of the (S, S) map the image occupies is where this preprocessing puts an
        image of that size (all of it for ``fit: resize``; the centred box inside the padding
        for ``fit: pad``); that part is resized back with nearest-neighbour sampling, so class
        indices never blend. Used to score and to write masks at the files' own size.
        """
        height, width = int(shape[0]), int(shape[1])
        mask = np.asarray(mask)
        box = self.mask(np.ones((height, width), dtype=np.uint8)).numpy() > 0
        if box.shape != mask.shape:
            raise ValueError(f"class map {mask.shape} is not at the input size {box.shape}")
        rows, cols = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
        if rows.size and cols.size:
            mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        return _nearest(mask, height, width).astype(np.uint8)

    def describe(self) -> dict:
        """The input spec a deployed model needs (goes into results and the model card)."""
        return {
            "input_size": self.input_size,
            "as_rgb": self.as_rgb,
            "fit": self.fit,
            "load_size": self.load_size,
            "spatial_dims": self.spatial_dims,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }


def build_augment(
    cfg: dict | None, spatial_dims: int = 2, seed: int | None = None, size: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Training augmentation from ``data.augment``; None or ``enabled: false`` turns it off.
    Volumes get the same keys' 3D meaning (:mod:`medlite.data.augment_3d`, MONAI)."""
    if not cfg or not cfg.get("enabled", True):
        return None
    if spatial_dims == 3:
        from medlite.data.augment_3d import build_augment_3d

        return build_augment_3d(cfg, seed=seed, size=size)
    ops: list[torch.nn.Module] = []
    if cfg.get("hflip", 0):
        ops.append(T.RandomHorizontalFlip(float(cfg["hflip"])))
    if cfg.get("vflip", 0):
        ops.append(T.RandomVerticalFlip(float(cfg["vflip"])))
    degrees, translate = float(cfg.get("rotate", 0)), float(cfg.get("translate", 0))
    scale = cfg.get("scale")
    if degrees or translate or scale:
        ops.append(
            T.RandomAffine(
                degrees=degrees,
                translate=(translate, translate) if translate else None,
                scale=tuple(scale) if scale else None,
            )
        )
    if cfg.get("brightness", 0) or cfg.get("contrast", 0):
        ops.append(_IntensityJitter(float(cfg.get("brightness", 0)), float(cfg.get("contrast", 0))))
    return T.Compose(ops) if ops else None


class _IntensityJitter(T.Transform):
    """Brightness/contrast jitter for 1- or 3-channel [0, 1] images (ColorJitter needs RGB);
    a segmentation mask passed along is left as it is."""

    def __init__(self, brightness: float, contrast: float):
        super().__init__()
        self.brightness, self.contrast = brightness, contrast

    def make_params(self, flat_inputs: list) -> dict:
        contrast = (torch.rand(()) * 2 - 1) * self.contrast if self.contrast else None
        brightness = (torch.rand(()) * 2 - 1) * self.brightness if self.brightness else None
        return {"contrast": contrast, "brightness": brightness}

    def transform(self, inpt, params: dict):
        if isinstance(inpt, tv_tensors.Mask):
            return inpt
        x = inpt
        if params["contrast"] is not None:
            x = x * (1 + params["contrast"])
        if params["brightness"] is not None:
            x = x + params["brightness"]
        x = x.clamp(0.0, 1.0)
        return tv_tensors.wrap(x, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else x
