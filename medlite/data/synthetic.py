"""Synthetic breast-ultrasound-like datasets, generated on the spot in the MedMNIST ``.npz`` format.

Why this exists: medlite's default job must train on a fresh offline machine, so its default
dataset is one the package can make itself. The images imitate B-mode breast ultrasound: layered
tissue with multiplicative speckle, depth attenuation and a little blur, plus a hypoechoic (dark)
lesion whose *margin shape* carries the label — round/smooth (benign-like) or irregular/spiculated
(malignant-like). Everything that is not shape (lesion area, contrast, position, gain, shadowing,
calcifications) is drawn from the same distribution for every class, so a model has to learn the
outline; mean intensity or dark area alone are near chance.

The lesion outline is a radial function ``r(u) = s * (1 + sum_j h_j exp(k_j (u . u_j - 1)))`` over
directions ``u`` (a circle in 2D, a sphere in 3D): broad low bumps give smooth lobes, many sharp
narrow bumps give spicules. ``s`` is solved so that every lesion has exactly its drawn area (or
volume), independent of its shape. The mask is rendered at a higher internal resolution and
area-averaged down, so thin spicules survive at 28 px as partial-coverage pixels.

This is SYNTHETIC data, not real patient data; it is meant for smoke tests, tutorials and
benchmarks of the training machinery, never for clinical conclusions.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import zlib
from dataclasses import dataclass

import numpy as np

from medlite import atomic
from medlite.errors import ConfigError

log = logging.getLogger(__name__)

SIZES_2D: tuple[int, ...] = (28, 64, 128, 224)
SIZES_3D: tuple[int, ...] = (28, 64)
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FLAG = "synthlesion"

# Margin classes (BI-RADS-like wording); the binary label is "irregular or spiculated".
CIRCUMSCRIBED, LOBULATED, IRREGULAR, SPICULATED = range(4)
_MARGIN_NAMES = ("circumscribed", "lobulated", "irregular", "spiculated")

# Radius floor (relative to the lesion scale) so indentations never pinch a lesion to nothing.
_R_FLOOR = 0.25
# Largest lesion radius, as a fraction of the image side (keeps lesions mostly in view).
_R_MAX = 0.46
# Direction grids on which the radial function is tabulated: angles (2D); polar x azimuth (3D).
_GRID_2D = 384
_GRID_3D = (48, 96)
# 3D only (2D draws are unchanged). A bump of concentration k covers about 1/k of a sphere but
# 1/sqrt(k) of a circle, so with 2D sharpness 3D spicules are thinner than a voxel at 28^3; and
# per-voxel speckle plus tissue texture hide a 28^3 surface from a small 3D CNN (1,000 volumes:
# val AUC ~0.6 at full noise, 0.92 at these settings; clean masks alone 0.99). So 3D bumps are
# blunter, lesions larger, and speckle and texture weaker than in 2D.
_KAPPA_3D = 0.35
_RBAR_3D = (0.17, 0.25)
_SPECKLE_3D = 0.15
_TEXTURE_3D = 0.25
# Warm, sepia-like tint for the optional RGB copy (same content in every channel).
_RGB_TINT = np.array([1.0, 0.93, 0.80], dtype=np.float32)


@dataclass(frozen=True)
class _Variant:
    """What one synthetic flag generates: label kind, dimensionality and default split sizes."""

    kind: str  # "binary" | "multiclass" | "multilabel" | "ordinal"
    ndim: int
    task: str
    labels: dict[str, str]
    n_samples: dict[str, int]
    python_class: str
    what: str
    #: bumped when the generator changes what a flag's files hold, so caches are not reused
    version: int = 1


_BINARY_LABELS = {"0": "benign-like (round/smooth)", "1": "malignant-like (irregular/spiculated)"}

_VARIANTS: dict[str, _Variant] = {
    "synthlesion": _Variant(
        "binary",
        2,
        "binary-class",
        _BINARY_LABELS,
        {"train": 1000, "val": 200, "test": 400},
        "SynthLesion",
        "benign-like (circumscribed or lobulated) vs malignant-like (irregular or spiculated) "
        "lesion margins",
    ),
    "synthlesion_multiclass": _Variant(
        "multiclass",
        2,
        "multi-class",
        {str(i): n for i, n in enumerate(_MARGIN_NAMES)},
        {"train": 400, "val": 100, "test": 200},
        "SynthLesionMultiClass",
        "4 lesion margin shapes: circumscribed, lobulated, irregular, spiculated",
    ),
    "synthlesion_multilabel": _Variant(
        "multilabel",
        2,
        "multi-label, binary-class",
        {
            "0": "irregular or spiculated margin",
            "1": "posterior acoustic shadowing",
            "2": "calcifications (bright echogenic foci)",
            "3": "multiple lesions",
        },
        {"train": 400, "val": 100, "test": 200},
        "SynthLesionMultiLabel",
        "4 independent findings: irregular/spiculated margin, posterior shadowing, "
        "calcifications, multiple lesions",
    ),
    "synthlesion_ordinal": _Variant(
        "ordinal",
        2,
        "ordinal-regression",
        {str(i): f"margin irregularity grade {i}" for i in range(5)},
        {"train": 400, "val": 100, "test": 200},
        "SynthLesionOrdinal",
        "5 ordered grades of margin irregularity (0 = smooth ... 4 = strongly spiculated)",
    ),
    "synthlesion3d": _Variant(
        "binary",
        3,
        "binary-class",
        _BINARY_LABELS,
        {"train": 1000, "val": 200, "test": 400},
        "SynthLesion3D",
        "3D volumes; benign-like (smooth/lobulated) vs malignant-like (irregular/spiculated) "
        "lesion surfaces",
        version=2,  # v1 (300 training volumes, 2D noise levels) was not learnable
    ),
}


def _info(flag: str, v: _Variant) -> dict:
    dims = "3D volumes" if v.ndim == 3 else "2D images"
    return {
        "python_class": v.python_class,
        "description": (
            f"SYNTHETIC dataset generated by medlite (not real patient data): procedurally "
            f"generated breast-ultrasound-like {dims} with speckle, depth attenuation and a "
            f"hypoechoic lesion; task: {v.what}. Intensity, lesion area, contrast and position "
            f"are drawn identically for every class, so only the lesion shape carries the label. "
            f"For testing and benchmarking the training machinery, not for clinical use."
        ),
        "url": None,
        "MD5": None,
        "task": v.task,
        "label": dict(v.labels),
        "n_channels": 1,
        "n_samples": dict(v.n_samples),
        "license": "synthetic, generated by medlite (no restrictions)",
    }


SYNTHETIC_INFO: dict[str, dict] = {flag: _info(flag, v) for flag, v in _VARIANTS.items()}


def is_synthetic(flag: str) -> bool:
    """Whether ``flag`` names a dataset medlite generates itself (rather than downloads)."""
    return isinstance(flag, str) and flag.lower() in _VARIANTS


def _variant(flag: str) -> _Variant:
    if not is_synthetic(flag):
        raise ConfigError(
            f"unknown synthetic dataset {flag!r}; valid synthetic flags: {', '.join(_VARIANTS)}"
        )
    return _VARIANTS[flag.lower()]


def _check_size(flag: str, v: _Variant, size: int) -> int:
    allowed = SIZES_3D if v.ndim == 3 else SIZES_2D
    if (
        isinstance(size, bool)
        or not isinstance(size, (int, np.integer))
        or int(size) not in allowed
    ):
        raise ConfigError(f"size {size!r} is not available for {flag!r}; choose one of {allowed}")
    return int(size)


def _check_n_samples(flag: str, n_samples: dict[str, int] | None, v: _Variant) -> dict[str, int]:
    if n_samples is None:
        return dict(v.n_samples)
    if set(n_samples) != set(SPLITS):
        raise ConfigError(
            f"n_samples for {flag!r} needs exactly the keys {SPLITS}, got {sorted(n_samples)}"
        )
    out = {}
    for split in SPLITS:
        n = n_samples[split]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"n_samples[{split!r}] must be an integer >= 0, got {n!r}")
        out[split] = int(n)
    return out


def _rng(seed: int, flag: str, split: str, stream: str) -> np.random.Generator:
    """An independent, reproducible stream per (seed, flag, split, purpose).

    crc32 instead of ``hash()`` because Python salts string hashes per process.
    """
    key = [seed, zlib.crc32(flag.encode()), SPLITS.index(split), zlib.crc32(stream.encode())]
    return np.random.default_rng(key)


# --------------------------------------------------------------------------------------------
# Lesion geometry
# --------------------------------------------------------------------------------------------


@dataclass
class _Lesions:
    """One lesion per sample (``present`` false = no lesion): pose, outline bumps and size."""

    present: np.ndarray  # (n,) bool
    center: np.ndarray  # (n, ndim) in [0, 1] image units, axis order of the array (depth = -2)
    rot: np.ndarray  # (n, ndim, ndim) shape frame -> image frame (columns are the shape axes)
    axes: np.ndarray  # (n, ndim) anisotropic stretch, product 1 (area preserving)
    dirs: np.ndarray  # (n, J, ndim) bump directions in the shape frame (unit vectors)
    heights: np.ndarray  # (n, J) relative bump heights (0 = unused slot)
    kappas: np.ndarray  # (n, J) bump sharpness (von Mises concentration)
    rbar: np.ndarray  # (n,) equivalent radius (area = pi rbar^2, volume = 4/3 pi rbar^3)
    scale: np.ndarray  # (n,) s in r(u) = s * radial(u); set by _solve_scale
    table: np.ndarray  # (n, G) unit radial function on the direction grid; set by _solve_scale


def _random_dirs(rng: np.random.Generator, shape: tuple[int, ...], ndim: int) -> np.ndarray:
    if ndim == 2:
        a = rng.uniform(-np.pi, np.pi, shape)
        return np.stack([np.cos(a), np.sin(a)], axis=-1)
    g = rng.standard_normal((*shape, 3))
    return g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)


def _bump_group(
    rng: np.random.Generator,
    counts: np.ndarray,
    slots: int,
    h: tuple[float, float],
    k: tuple[float, float],
    ndim: int,
    p_notch: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``slots`` bumps per sample of which the first ``counts[i]`` are active (fixed draw sizes
    keep the random stream independent of the labels drawn); a ``p_notch`` share of them are
    indentations instead of protrusions."""
    n = len(counts)
    active = np.arange(slots)[None, :] < counts[:, None]
    sign = np.where(rng.random((n, slots)) < p_notch, -1.0, 1.0)
    heights = rng.uniform(h[0], h[1], (n, slots)) * sign * active
    kappas = rng.uniform(k[0], k[1], (n, slots)) * (_KAPPA_3D if ndim == 3 else 1.0)
    return _random_dirs(rng, (n, slots), ndim), heights, kappas


def _counts(rng: np.random.Generator, use: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Bump counts in [lo, hi] where ``use`` is true, else 0."""
    return np.where(use, rng.integers(lo, hi + 1, len(use)), 0)


def _margin_bumps(
    rng: np.random.Generator, margin: np.ndarray, ndim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bumps for the four margin classes; every group is drawn for every sample (masked)."""
    m3 = 2 if ndim == 3 else 1  # a sphere needs more bumps than a circle to look the same
    lobe_count = _counts(rng, margin == LOBULATED, 3 * m3, 5 * m3)
    lobes = _bump_group(rng, lobe_count, 5 * m3, (0.3, 0.55), (5.0, 10.0), ndim)
    if ndim == 2:  # spread lobes around the outline so they do not merge into one bulge
        start = rng.uniform(-np.pi, np.pi, (len(margin), 1))
        jitter = rng.uniform(-0.25, 0.25, (len(margin), 5))
        a = start + 2 * np.pi * np.arange(5)[None, :] / np.maximum(lobe_count, 1)[:, None] + jitter
        lobes = (np.stack([np.cos(a), np.sin(a)], axis=-1), lobes[1], lobes[2])
    groups = [
        # gentle wobble: every lesion, so even circumscribed ones are not perfect ellipses
        _bump_group(rng, np.full(len(margin), 3 * m3), 3 * m3, (0.0, 0.06), (1.0, 3.0), ndim, 0.5),
        # macro-lobulation: a few smooth lobes
        lobes,
        # irregular: many medium bumps and notches
        _bump_group(
            rng,
            _counts(rng, margin == IRREGULAR, 7 * m3, 10 * m3),
            10 * m3,
            (0.15, 0.42),
            (8.0, 24.0),
            ndim,
            p_notch=0.35,
        ),
        # microlobulation on irregular margins
        _bump_group(
            rng,
            _counts(rng, margin == IRREGULAR, 6 * m3, 10 * m3),
            10 * m3,
            (0.08, 0.18),
            (40.0, 100.0),
            ndim,
        ),
        # spicules: narrow, tall spikes
        _bump_group(
            rng,
            _counts(rng, margin == SPICULATED, 6 * m3, 12 * m3),
            12 * m3,
            (0.55, 1.1),
            (30.0, 90.0),
            ndim,
        ),
    ]
    dirs, heights, kappas = (np.concatenate(parts, axis=1) for parts in zip(*groups, strict=True))
    return dirs, heights, kappas


def _ordinal_bumps(
    rng: np.random.Generator, grade: np.ndarray, ndim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grade g scales the irregular and spiculated components by ~g/4 (grade 0 is smooth)."""
    n = len(grade)
    m3 = 2 if ndim == 3 else 1
    amp = np.clip(grade / 4.0 + rng.uniform(-0.06, 0.06, n) * (grade > 0), 0.0, 1.1)
    wob = _bump_group(rng, np.full(n, 3 * m3), 3 * m3, (0.0, 0.06), (1.0, 3.0), ndim, 0.5)
    irr = _bump_group(
        rng, rng.integers(6 * m3, 9 * m3 + 1, n), 9 * m3, (0.15, 0.4), (8.0, 24.0), ndim, 0.35
    )
    spk = _bump_group(
        rng, rng.integers(5 * m3, 10 * m3 + 1, n), 10 * m3, (0.45, 1.0), (30.0, 90.0), ndim
    )
    dirs = np.concatenate([wob[0], irr[0], spk[0]], axis=1)
    heights = np.concatenate([wob[1], irr[1] * amp[:, None], spk[1] * amp[:, None]], axis=1)
    kappas = np.concatenate([wob[2], irr[2], spk[2]], axis=1)
    return dirs, heights, kappas


def _random_rotations(rng: np.random.Generator, n: int, ndim: int) -> np.ndarray:
    if ndim == 2:
        a = rng.uniform(0, np.pi, n)
        c, s = np.cos(a), np.sin(a)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], axis=1)
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def _make_lesions(
    rng: np.random.Generator,
    bumps: tuple[np.ndarray, np.ndarray, np.ndarray],
    ndim: int,
    rbar_range: tuple[float, float],
) -> _Lesions:
    """Pose and size of the primary lesions: identical distributions for every class."""
    n = bumps[0].shape[0]
    center = np.empty((n, ndim))
    center[:, -2] = rng.uniform(0.32, 0.62, n)  # depth
    for a in range(ndim):
        if a != ndim - 2:
            center[:, a] = rng.uniform(0.3, 0.7, n)
    if ndim == 2:
        aspect = np.exp(rng.uniform(0.0, np.log(1.6), n))
        axes = np.stack([np.sqrt(aspect), 1 / np.sqrt(aspect)], axis=1)
    else:
        e = rng.uniform(-0.22, 0.22, (n, 3))
        axes = np.exp(e - e.mean(axis=1, keepdims=True))
    les = _Lesions(
        present=np.ones(n, bool),
        center=center,
        rot=_random_rotations(rng, n, ndim),
        axes=axes,
        dirs=bumps[0],
        heights=bumps[1],
        kappas=bumps[2],
        rbar=rng.uniform(*rbar_range, n),
        scale=np.zeros(n),
        table=np.zeros((n, 0)),
    )
    _solve_scale(les, ndim)
    return les


def _radial(dirs_eval: np.ndarray, les: _Lesions, idx: np.ndarray) -> np.ndarray:
    """Unit radial function at directions ``dirs_eval`` ((G, ndim) shared or (n, G, ndim))."""
    dirs = les.dirs[idx].astype(np.float32)  # (n, J, d)
    ev = dirs_eval.astype(np.float32)
    ev = np.swapaxes(ev, -1, -2)  # (d, G) or (n, d, G)
    cos = dirs @ ev  # (n, J, G)
    cos -= 1.0
    cos *= les.kappas[idx].astype(np.float32)[:, :, None]
    bumps = np.exp(cos, out=cos)
    r = 1.0 + (les.heights[idx].astype(np.float32)[:, None, :] @ bumps)[:, 0, :]
    return np.maximum(r, _R_FLOOR)


def _grid(ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Direction grid (G, ndim) and its quadrature weights (sum 1)."""
    if ndim == 2:
        a = (np.arange(_GRID_2D) + 0.5) / _GRID_2D * 2 * np.pi - np.pi
        return np.stack([np.cos(a), np.sin(a)], axis=1), np.full(_GRID_2D, 1.0 / _GRID_2D)
    nt, nphi = _GRID_3D
    t = (np.arange(nt) + 0.5) / nt * np.pi
    p = (np.arange(nphi) + 0.5) / nphi * 2 * np.pi - np.pi
    tt, pp = np.meshgrid(t, p, indexing="ij")
    u = np.stack([np.sin(tt) * np.cos(pp), np.sin(tt) * np.sin(pp), np.cos(tt)], axis=-1)
    w = np.sin(tt).ravel()
    return u.reshape(-1, 3), w / w.sum()


def _solve_scale(les: _Lesions, ndim: int) -> None:
    """Scale each outline so its area (volume) is exactly the drawn one, whatever its shape.

    This is what makes lesion area useless as a class cue: spikes do not add area. The unit
    outline is kept, tabulated on the direction grid, for rendering.
    """
    u, w = _grid(ndim)
    n = len(les.rbar)
    les.table = np.empty((n, len(w)), np.float32)
    for start in range(0, n, 256):
        idx = np.arange(start, min(start + 256, n))
        les.table[idx] = _radial(u, les, idx)
    moment = (les.table.astype(np.float64) ** ndim) @ w  # mean r^2 on the circle, r^3 on the sphere
    les.scale = les.rbar / moment ** (1.0 / ndim)


def _radius_table(les: _Lesions, idx: np.ndarray) -> np.ndarray:
    """r(u) on the direction grid, in image units, capped so lesions stay mostly in view."""
    r = les.table[idx] * les.scale[idx, None].astype(np.float32)
    cap = (_R_MAX / les.axes[idx].max(axis=1, keepdims=True)).astype(np.float32)
    return np.minimum(r, cap)


def _supersample(size: int, ndim: int) -> int:
    if ndim == 3:
        return 2 if size <= 32 else 1
    return max(1, min(4, 128 // size))


def _lookup(table: np.ndarray, v: list[np.ndarray], rho: np.ndarray, ndim: int) -> np.ndarray:
    """r(direction of v) from the per-sample direction table (linear in 2D, nearest in 3D)."""
    n = table.shape[0]
    g = table.shape[1]
    flat = table.ravel()
    offset = (np.arange(n) * g).reshape([n] + [1] * ndim)
    if ndim == 2:
        t = (np.arctan2(v[1], v[0]) + np.pi) * (g / (2 * np.pi)) - 0.5
        i0 = np.floor(t)
        w = (t - i0).astype(np.float32)
        i0 = i0.astype(np.int64) % g
        i1 = (i0 + 1) % g
        return flat[offset + i0] * (1 - w) + flat[offset + i1] * w
    nt, nphi = _GRID_3D
    polar = np.arccos(np.clip(v[2] / np.maximum(rho, 1e-12), -1.0, 1.0))
    it = np.minimum((polar * (nt / np.pi)).astype(np.int64), nt - 1)
    ip = np.minimum(
        ((np.arctan2(v[1], v[0]) + np.pi) * (nphi / (2 * np.pi))).astype(np.int64), nphi - 1
    )
    return flat[offset + it * nphi + ip]


def _render_masks(les: _Lesions, idx: np.ndarray, size: int, ndim: int) -> np.ndarray:
    """Lesion coverage in [0, 1] at ``size``: drawn ``f`` times finer, then area-averaged.

    Only a window around each lesion is drawn (the same side for the whole call, so it stays
    vectorised); the window is shifted, never cut, at the image border.
    """
    out = np.zeros((len(idx), *([size] * ndim)), np.float32)
    rows = np.flatnonzero(les.present[idx])
    if rows.size == 0:
        return out
    sel = idx[rows]
    f = _supersample(size, ndim)
    big = size * f
    table = _radius_table(les, sel)
    reach = float((table.max(axis=1) * les.axes[sel].max(axis=1)).max())
    side = min(size, int(np.ceil(2 * reach * size)) + 2)
    sf = side * f
    step = max(1, 2_000_000 // sf**ndim)
    base = ((np.arange(sf) + 0.5) / big).astype(np.float32)
    bshape = [1] * ndim
    for s0 in range(0, len(sel), step):
        part = slice(s0, s0 + step)
        ids = sel[part]
        n = len(ids)
        c = les.center[ids]
        origin = np.clip(np.round(c * size - side / 2), 0, size - side).astype(np.int64)
        d = []
        for a in range(ndim):
            comp = ((origin[:, a] / size - c[:, a])[:, None]).astype(np.float32) + base[None, :]
            d.append(comp.reshape([n] + [sf if k == a else 1 for k in range(ndim)]))
        rot = les.rot[ids].astype(np.float32)
        inv_axes = (1.0 / les.axes[ids]).astype(np.float32)
        v = []
        for k in range(ndim):
            acc = sum(rot[:, a, k].reshape([n] + bshape) * d[a] for a in range(ndim))
            v.append(acc * inv_axes[:, k].reshape([n] + bshape))
        rho = np.sqrt(sum(x * x for x in v))
        r = _lookup(table[part], v, rho, ndim)
        m = np.clip((r - rho) * big + 0.5, 0.0, 1.0)
        m = m.reshape([n] + [side, f] * ndim).mean(axis=tuple(range(2, 2 + 2 * ndim, 2)))
        for j, row in enumerate(rows[part]):
            window = tuple(slice(o, o + side) for o in origin[j])
            np.maximum(out[(row, *window)], m[j], out=out[(row, *window)])
    return out


# --------------------------------------------------------------------------------------------
# Scene parameters (drawn once per split, before any pixel noise)
# --------------------------------------------------------------------------------------------


@dataclass
class _Scene:
    """Everything about a split except pixel noise, so shapes match across image sizes."""

    labels: np.ndarray  # (n, L) uint8
    lesions: list[_Lesions]  # primary first, then optional extra lesions
    contrast: np.ndarray  # (n,) lesion / tissue echo ratio
    post_mode: np.ndarray  # (n,) 0 none, 1 shadow, 2 enhancement
    post_strength: np.ndarray  # (n,)
    calc_pos: np.ndarray  # (n, K, ndim) image units
    calc_amp: np.ndarray  # (n, K) 0 = no calcification in that slot
    tissue: dict[str, np.ndarray]  # (n,) arrays


def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Labels 0..k-1 as evenly as n allows, in random order (every class present when n >= k)."""
    return rng.permutation(np.arange(n) % k)


def _sample_scene(v: _Variant, n: int, rng: np.random.Generator) -> _Scene:
    """Labels and outlines first; every nuisance parameter is drawn without looking at them."""
    ndim = v.ndim
    shadow_label = calc_label = multi_label = None
    if v.kind == "ordinal":
        grade = _balanced(rng, n, 5)
        labels = grade[:, None]
        bumps = _ordinal_bumps(rng, grade, ndim)
        margin = None
    else:
        margin = _balanced(rng, n, 4)
        bumps = _margin_bumps(rng, margin, ndim)
        if v.kind == "multiclass":
            labels = margin[:, None]
        elif v.kind == "binary":
            labels = (margin >= IRREGULAR)[:, None]
        else:
            shadow_label = rng.random(n) < 0.5
            calc_label = rng.random(n) < 0.5
            multi_label = rng.random(n) < 0.5
            labels = np.stack([margin >= IRREGULAR, shadow_label, calc_label, multi_label], axis=1)
    rbar_range = _RBAR_3D if ndim == 3 else (0.12, 0.21)
    primary = _make_lesions(rng, bumps, ndim, rbar_range)

    contrast = rng.uniform(0.08, 0.4, n)
    u = rng.random(n)
    if shadow_label is not None:
        post_mode = np.where(shadow_label, 1, np.where(u < 0.3, 2, 0))
    else:
        post_mode = np.where(u < 0.3, 1, np.where(u < 0.55, 2, 0))
    post_strength = np.where(post_mode == 1, rng.uniform(0.35, 0.65, n), rng.uniform(0.2, 0.5, n))

    # calcifications: bright foci inside the lesion core
    k = 8
    has_calc = calc_label if calc_label is not None else rng.random(n) < 0.2
    lo, hi = (3, 8) if calc_label is not None else (2, 6)
    count = np.where(has_calc, rng.integers(lo, hi + 1, n), 0)
    cdirs = _random_dirs(rng, (n, k), ndim)
    frac = rng.uniform(0.1, 0.7, (n, k))
    r_at = _radial(cdirs, primary, np.arange(n)) if n else np.zeros((0, k))
    radius = frac * np.minimum(r_at, 1.0) * primary.scale[:, None]
    local = cdirs * radius[..., None] * primary.axes[:, None, :]
    calc_pos = primary.center[:, None, :] + np.einsum("nak,njk->nja", primary.rot, local)
    calc_amp = rng.uniform(0.5, 1.1, (n, k)) * (np.arange(k)[None, :] < count[:, None])

    lesions = [primary]
    if multi_label is not None:  # 1-2 smaller lesions of the same margin type, beside the first
        assert margin is not None
        extra_count = rng.integers(1, 3, n)
        base_angle = rng.uniform(0, 2 * np.pi, n)
        for e in range(2):
            les = _make_lesions(rng, _margin_bumps(rng, margin, ndim), ndim, (0.45, 0.7))
            les.rbar *= primary.rbar  # drawn as a fraction of the primary's size
            les.present = multi_label & (extra_count > e)
            dist = (primary.rbar + les.rbar) * rng.uniform(1.25, 1.7, n)
            direction = _random_dirs(rng, (n,), ndim)
            if ndim == 2:  # the second extra lesion goes roughly opposite the first one
                ang = base_angle + e * np.pi + rng.uniform(-0.5, 0.5, n)
                direction = np.stack([np.sin(ang), np.cos(ang)], axis=1)
            les.center = np.clip(primary.center + direction * dist[:, None], 0.12, 0.88)
            _solve_scale(les, ndim)
            lesions.append(les)

    tissue = {
        "skin_depth": rng.uniform(0.015, 0.04, n),
        "skin_amp": rng.uniform(0.5, 1.0, n),
        "fat_depth": rng.uniform(0.1, 0.26, n),
        "wave_amp": rng.uniform(0.0, 0.05, n),
        "wave_freq": rng.uniform(0.5, 2.0, n),
        "wave_phase": rng.uniform(0, 2 * np.pi, n),
        "fat": rng.uniform(0.35, 0.6, n),
        "gland": rng.uniform(0.75, 1.05, n),
        "wall": (rng.random(n) < 0.45).astype(float),
        "wall_depth": rng.uniform(0.82, 0.95, n),
        "muscle": rng.uniform(0.25, 0.45, n),
        "lf_sigma": rng.uniform(0.15, 0.3, n),
        "mf_sigma": rng.uniform(0.08, 0.18, n),
        "alpha": rng.uniform(0.2, 1.2, n),
        "speckle": rng.uniform(0.35, 0.6, n),
        "gain": rng.uniform(0.5, 0.75, n),
    }
    return _Scene(
        labels=labels.astype(np.uint8),
        lesions=lesions,
        contrast=contrast,
        post_mode=post_mode,
        post_strength=post_strength,
        calc_pos=calc_pos,
        calc_amp=calc_amp,
        tissue=tissue,
    )


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def _col(x: np.ndarray, ndim: int) -> np.ndarray:
    """Per-sample values shaped to broadcast against (n, *spatial) arrays."""
    return x.astype(np.float32).reshape([-1] + [1] * ndim)


def _axis_coord(size: int, axis: int, ndim: int) -> np.ndarray:
    c = ((np.arange(size) + 0.5) / size).astype(np.float32)
    return c.reshape([1] + [size if k == axis else 1 for k in range(ndim)])


def _basis(size: int, coarse: int) -> np.ndarray:
    """(size, coarse) smooth interpolation weights: Gaussian bumps on a coarse, even grid."""
    pos = (np.arange(size) + 0.5) / size
    knots = (np.arange(coarse) + 0.5) / coarse
    b = np.exp(-0.5 * ((pos[:, None] - knots[None, :]) * coarse) ** 2)
    return (b / np.sqrt((b**2).sum(axis=1, keepdims=True))).astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, n: int, coarse: tuple[int, ...], size: int
) -> np.ndarray:
    """Low-frequency random texture with about unit std: coarse noise, smoothly upsampled.

    Separable matrix products instead of spline zooming: same look, several times faster.
    """
    g = rng.standard_normal((n, *coarse), dtype=np.float32)
    if len(coarse) == 2:
        return _basis(size, coarse[0]) @ g @ _basis(size, coarse[1]).T
    b0, b1, b2 = (_basis(size, c) for c in coarse)
    return np.einsum("ia,jb,kc,nabc->nijk", b0, b1, b2, g, optimize=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _render_chunk(
    sc: _Scene, idx: np.ndarray, size: int, ndim: int, rng: np.random.Generator
) -> np.ndarray:
    """Compose echo image = tissue x lesion x posterior x attenuation x speckle (+ foci), blurred."""
    from scipy import ndimage

    n = len(idx)
    t = {key: _col(val[idx], ndim) for key, val in sc.tissue.items()}
    depth_axis = ndim - 2
    y = _axis_coord(size, depth_axis, ndim)
    x = _axis_coord(size, ndim - 1, ndim)

    # layered tissue: skin line, subcutaneous fat, glandular tissue, optional chest wall
    boundary = t["fat_depth"] + t["wave_amp"] * np.sin(
        2 * np.pi * t["wave_freq"] * x + t["wave_phase"]
    )
    tissue = t["fat"] + (t["gland"] - t["fat"]) * _sigmoid((y - boundary) / 0.02)
    tissue = tissue + t["skin_amp"] * np.exp(-(((y - t["skin_depth"]) / 0.012) ** 2))
    wall = _sigmoid((y - t["wall_depth"]) / 0.015)
    tissue = tissue + t["wall"] * (
        (t["muscle"] - tissue) * wall + 0.5 * np.exp(-(((y - t["wall_depth"]) / 0.01) ** 2))
    )
    coarse_lf = (8, 4) if ndim == 2 else (4, 8, 4)
    coarse_mf = (16, 8) if ndim == 2 else (8, 16, 8)
    field = t["lf_sigma"] * _smooth_field(rng, n, coarse_lf, size) + t["mf_sigma"] * _smooth_field(
        rng, n, coarse_mf, size
    )
    if ndim == 3:
        field *= _TEXTURE_3D
    echo = tissue * np.exp(field)

    # hypoechoic lesion(s)
    mask = _render_masks(sc.lesions[0], idx, size, ndim)
    for extra in sc.lesions[1:]:
        np.maximum(mask, _render_masks(extra, idx, size, ndim), out=mask)
    echo *= 1.0 - (1.0 - _col(sc.contrast[idx], ndim)) * mask

    # posterior shadowing / enhancement below the primary lesion; its width follows the
    # lesion's equivalent radius (not its outline) so it carries no shape cue
    p = sc.lesions[0]
    rbar = _col(p.rbar[idx], ndim)
    lateral = sum(
        ((_axis_coord(size, a, ndim) - _col(p.center[idx, a], ndim)) / (0.95 * rbar)) ** 2
        for a in range(ndim)
        if a != depth_axis
    )
    below = _sigmoid((y - _col(p.center[idx, depth_axis], ndim) - 0.35 * rbar) / (0.12 * rbar))
    post = np.exp(-(lateral**2)) * below
    mode = sc.post_mode[idx]
    sign = np.where(mode == 1, -1.0, np.where(mode == 2, 1.0, 0.0))
    echo *= 1.0 + _col(sign * sc.post_strength[idx], ndim) * post

    # calcifications: bright foci, splatted then blurred to a small spot
    amp = sc.calc_amp[idx]
    if amp.any():
        foci = np.zeros((n, *([size] * ndim)), np.float32)
        rows, slots = np.nonzero(amp)
        pix = np.clip((sc.calc_pos[idx][rows, slots] * size).astype(np.int64), 0, size - 1)
        np.add.at(foci, (rows, *pix.T), amp[rows, slots].astype(np.float32))
        sigma = max(0.5, size / 110)
        delta = np.zeros([9] * ndim, np.float32)
        delta[(4,) * ndim] = 1.0
        peak = ndimage.gaussian_filter(delta, sigma).max()
        foci = ndimage.gaussian_filter(foci, (0,) + (sigma,) * ndim) / peak
        echo += foci

    echo *= np.exp(-t["alpha"] * y)  # depth attenuation (imperfect time-gain compensation)

    # speckle: magnitude of a (spatially correlated) complex Gaussian field, mean 1
    shape = (n, *([size] * ndim))
    re = rng.standard_normal(shape, dtype=np.float32)
    im = rng.standard_normal(shape, dtype=np.float32)
    if size >= 64:  # grain of a fixed physical size: ~white at 28 px, elongated laterally at 224
        grain = [0.0] + [size / 100.0] * ndim
        grain[1 + depth_axis] = size / 200.0
        re = ndimage.gaussian_filter(re, grain)
        im = ndimage.gaussian_filter(im, grain)
    amp_speckle = np.sqrt(re * re + im * im)
    amp_speckle /= amp_speckle.mean(axis=tuple(range(1, ndim + 1)), keepdims=True)
    echo *= 1.0 + t["speckle"] * (_SPECKLE_3D if ndim == 3 else 1.0) * (amp_speckle - 1.0)

    # system blur (lateral resolution worse than axial), then display mapping
    lat = max(0.45, size / 110)
    psf = [0.0] + [lat] * ndim
    psf[1 + depth_axis] = 0.7 * lat
    echo = ndimage.gaussian_filter(echo, psf)
    shown = np.clip(t["gain"] * np.maximum(echo, 0.0) ** 0.85, 0.0, 1.0)
    return np.rint(shown * 255.0).astype(np.uint8)


def _render_split(sc: _Scene, n: int, size: int, ndim: int, rng: np.random.Generator) -> np.ndarray:
    """All images of a split, in fixed-size chunks (bounded memory, deterministic)."""
    out = np.empty((n, *([size] * ndim)), np.uint8)
    f = _supersample(size, ndim)
    step = max(1, min(3_000_000 // (size * f) ** ndim, 4_000_000 // size**ndim))
    for s0 in range(0, n, step):
        idx = np.arange(s0, min(n, s0 + step))
        out[idx] = _render_chunk(sc, idx, size, ndim, rng)
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"synthetic data seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def generate(
    flag: str,
    size: int = 28,
    *,
    seed: int = 0,
    n_samples: dict[str, int] | None = None,
    as_rgb: bool = False,
) -> dict[str, np.ndarray]:
    """The six MedMNIST arrays of a synthetic dataset, deterministic in all arguments.

    Lesion shapes and labels depend only on (flag, seed, split, n_samples), so the same sample
    has the same lesion at every size; ``as_rgb`` gives a tinted copy of the same pixels.
    """
    v = _variant(flag)
    flag = flag.lower()
    size = _check_size(flag, v, size)
    seed = _check_seed(seed)
    counts = _check_n_samples(flag, n_samples, v)
    if as_rgb and v.ndim == 3:
        raise ConfigError(
            f"{flag!r} is a 3D dataset; MedMNIST 3D files are single-channel (as_rgb is 2D only)"
        )
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        n = counts[split]
        scene = _sample_scene(v, n, _rng(seed, flag, split, "scene"))
        images = _render_split(scene, n, size, v.ndim, _rng(seed, flag, split, "noise"))
        if as_rgb:
            images = np.rint(images[..., None] * _RGB_TINT).astype(np.uint8)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = scene.labels
    return {key: arrays[key] for split in SPLITS for key in (f"{split}_images", f"{split}_labels")}


def file_name(flag: str, size: int, seed: int = 0) -> str:
    """MedMNIST naming (``flag.npz`` at 28 px, ``flag_64.npz`` ...); a generator version after
    the first and non-zero seeds get a suffix."""
    name = flag.lower() if size == 28 else f"{flag.lower()}_{size}"
    version = _VARIANTS[flag.lower()].version if flag.lower() in _VARIANTS else 1
    if version > 1:
        name = f"{name}_v{version}"
    return f"{name}.npz" if seed == 0 else f"{name}_seed{seed}.npz"


def write_npz(target: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Compressed in memory, then written atomically (:mod:`medlite.atomic`): a crash, a full
    disk or a concurrent run never leaves half a file under the final name."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic.write_bytes(target, buf.getbuffer())


def ensure_synthetic(
    flag: str, size: int, root: str | os.PathLike, *, seed: int = 0
) -> pathlib.Path:
    """Path of the synthetic ``.npz`` under ``root/synthetic``, generating it first if missing.

    Written atomically (:func:`write_npz`).
    """
    v = _variant(flag)
    size = _check_size(flag, v, size)
    seed = _check_seed(seed)
    target = pathlib.Path(root) / "synthetic" / file_name(flag, size, seed)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = generate(flag, size, seed=seed)
    write_npz(target, arrays)
    sizes = ", ".join(f"{s} {len(arrays[f'{s}_labels'])}" for s in SPLITS)
    log.info(
        "Generated SYNTHETIC dataset %r (%d px, seed %d; %s; not real patient data) at %s",
        flag.lower(),
        size,
        seed,
        sizes,
        target,
    )
    return target
