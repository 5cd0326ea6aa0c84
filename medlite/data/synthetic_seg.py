"""Synthetic lesion segmentation: the embedded ultrasound-like images with their true masks.

The same scenes as :mod:`medlite.data.synthetic` (speckle, depth attenuation, shadowing,
calcifications, a hypoechoic lesion with a smooth or spiculated margin), rendered together with
the lesion outline they were drawn from: the ground truth is exact, not annotated. A tenth of the
images have no lesion, so a model is also judged on not seeing one where there is none.

Variants: ``synthseg`` (background / lesion) and ``synthseg_multiclass`` (background / lesion
margin / lesion core: the core is the lesion's outline shrunk to 55 % of its radius). Sizes 64,
128 and 256 px. SYNTHETIC data, not patient data: for smoke tests, tutorials and benchmarks of
the training machinery.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

import numpy as np

from medlite.data import synthetic as syn
from medlite.errors import ConfigError

log = logging.getLogger(__name__)

SIZES = (64, 128, 256)
SPLITS = syn.SPLITS
#: share of images without any lesion (their mask is all background)
EMPTY_FRACTION = 0.1
#: the core class: the lesion outline scaled by this factor
CORE_SCALE = 0.55

VARIANTS: dict[str, dict] = {
    "synthseg": {
        "labels": ("background", "lesion"),
        "n_samples": {"train": 600, "val": 100, "test": 200},
        "what": "lesion vs background",
    },
    "synthseg_multiclass": {
        "labels": ("background", "lesion margin", "lesion core"),
        "n_samples": {"train": 600, "val": 100, "test": 200},
        "what": "lesion core, lesion margin and background",
    },
}


def is_synthetic_seg(flag: str) -> bool:
    return isinstance(flag, str) and flag.lower() in VARIANTS


def _check(flag: str, size: int) -> tuple[str, int]:
    key = str(flag).lower()
    if key not in VARIANTS:
        raise ConfigError(
            f"unknown synthetic segmentation dataset {flag!r}; valid: {', '.join(VARIANTS)}"
        )
    if isinstance(size, bool) or size not in SIZES:
        raise ConfigError(
            f"data.size={size!r} is not available for {key}; valid sizes: "
            f"{', '.join(map(str, SIZES))}"
        )
    return key, int(size)


def generate(
    flag: str, size: int = 64, *, seed: int = 0, n_samples: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """``{split}_images`` (N, S, S) uint8 and ``{split}_masks`` (N, S, S) uint8 class indices,
    deterministic in all arguments."""
    key, size = _check(flag, size)
    counts = dict(n_samples or VARIANTS[key]["n_samples"])
    scene_variant = syn._VARIANTS[syn.DEFAULT_FLAG]  # binary margins: smooth and spiculated
    multiclass = key == "synthseg_multiclass"
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        n = counts[split]
        scene = syn._sample_scene(scene_variant, n, syn._rng(seed, key, split, "scene"))
        empty = syn._rng(seed, key, split, "empty").random(n) < EMPTY_FRACTION
        for lesion in scene.lesions:
            lesion.present &= ~empty
        scene.post_mode[empty] = 0  # no shadow or enhancement below a lesion that isn't there
        scene.calc_amp[empty] = 0.0
        images = syn._render_split(scene, n, size, 2, syn._rng(seed, key, split, "noise"))
        masks = np.zeros((n, size, size), np.uint8)
        core = [dataclasses.replace(les, scale=les.scale * CORE_SCALE) for les in scene.lesions]
        step = 256
        for start in range(0, n, step):
            idx = np.arange(start, min(n, start + step))
            lesion = _coverage(scene.lesions, idx, size) >= 0.5
            masks[idx] = lesion
            if multiclass:
                masks[idx] += (_coverage(core, idx, size) >= 0.5) & lesion
        arrays[f"{split}_images"] = images
        arrays[f"{split}_masks"] = masks
    return arrays


def _coverage(lesions: list, idx: np.ndarray, size: int) -> np.ndarray:
    out = syn._render_masks(lesions[0], idx, size, 2)
    for extra in lesions[1:]:
        np.maximum(out, syn._render_masks(extra, idx, size, 2), out=out)
    return out


def file_name(flag: str, size: int, seed: int = 0) -> str:
    name = f"{flag.lower()}_{size}"
    return f"{name}.npz" if seed == 0 else f"{name}_seed{seed}.npz"


def ensure(flag: str, size: int, root: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Path of the generated ``.npz`` under ``root/synthetic``, generating it when missing
    (written to a temporary file, then renamed: never half a file under the final name)."""
    key, size = _check(flag, size)
    target = pathlib.Path(root) / "synthetic" / file_name(key, size, seed)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = generate(key, size, seed=seed)
    syn.write_npz(target, arrays)
    log.info(
        "Generated SYNTHETIC segmentation dataset %r (%d px, seed %d; not patient data) at %s",
        key,
        size,
        seed,
        target,
    )
    return target
