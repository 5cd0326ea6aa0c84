"""Seeded train/val/test splits that keep class proportions and keep each patient in one split.

Why medlite has its own splitter: a medical dataset usually has a few rare classes and several
images per patient. A random split can leave a rare class out of the validation or test set, and
a per-image split puts one patient's images on both sides, so the test score measures how well
the model recognises patients it has seen (leakage). Library helpers do not fit either: MONAI's
``partition_dataset`` rounds each class down and drops the remainder (two images of a class
give ``[1, 0, 0]``: one image lost), and scikit-learn's splitters want at least one example per
class and split.

How :func:`stratified_split` works:

1. Samples are grouped (by patient when ``groups`` is given, else each sample alone). A group is
   never divided.
2. Each group gets a stratum: its most common class (ties: the class rarer in the whole data);
   for multi-label data the rarest (in the whole data) label any of its samples is positive
   for, or ``"none"``.
3. Each stratum's sample count ``n`` is apportioned to the splits: each split gets
   ``floor(fraction * n)`` or one more, so every stratum is within one sample of its target.
   Who gets the leftover samples is decided across strata (the rounding so far is carried
   over), so many small classes still add up to the requested overall fractions instead of all
   rounding towards train. A stratum's first sample always goes to train: a class must be seen
   in training.
4. Within a stratum, groups are listed in a fixed order (sorted by group key, or by position),
   shuffled with ``np.random.default_rng(seed)``, then taken largest first (ties in shuffled
   order); each goes to the split furthest below its quota. One-sample groups meet the quotas
   exactly; bigger groups come as close as their sizes allow.

The result depends only on the labels, the group keys, the fractions and the seed, never on
the global random state, so building a dataset does not change what a training run draws.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

NO_POSITIVE = "none"  # stratum of a multi-label group without any positive label
_EPS = 1e-9


def check_fractions(fractions: Sequence[float]) -> np.ndarray:
    """The split fractions as an array, or ValueError: numbers > 0 that sum to 1."""
    try:
        values = [float(f) for f in fractions]
    except (TypeError, ValueError):
        raise ValueError(f"split fractions must be numbers, got {fractions!r}") from None
    if any(isinstance(f, bool) for f in fractions) or not values:
        raise ValueError(f"split fractions must be numbers, got {fractions!r}")
    if any(not np.isfinite(f) or f <= 0 for f in values):
        raise ValueError(f"every split fraction must be > 0, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {values} (sum {sum(values):g})")
    return np.asarray(values, dtype=np.float64)


def stratified_split(
    labels: Sequence[Hashable] | np.ndarray,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
    multilabel: bool = False,
) -> np.ndarray:
    """The split of each sample: an int array of indices into ``fractions`` (0 = train, ...).

    ``labels``: one class per sample (any hashable: index or name), or with ``multilabel`` an
    ``(N, L)`` 0/1 array. ``groups``: one key per sample (e.g. the patient id); samples sharing
    a key always land in the same split. Every sample is assigned; none is dropped.
    """
    frac = check_fractions(fractions)
    n = len(labels)
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} group keys for {n} samples")
    if n == 0:
        return np.zeros(0, dtype=np.int64)

    members, keys = _groups(n, groups)
    strata = _group_strata(labels, members, multilabel)
    by_stratum: dict[Hashable, list[int]] = {}
    for g, stratum in enumerate(strata):
        by_stratum.setdefault(stratum, []).append(g)
    order = sorted(by_stratum, key=lambda s: (str(type(s)), str(s)))
    sizes = [sum(len(members[g]) for g in by_stratum[s]) for s in order]
    quotas = _apportion(sizes, frac)

    rng = np.random.default_rng(seed)
    out = np.full(n, -1, dtype=np.int64)
    for stratum, quota in zip(order, quotas, strict=True):
        listed = sorted(by_stratum[stratum], key=lambda g: keys[g])
        shuffled = [listed[i] for i in rng.permutation(len(listed))]
        shuffled.sort(key=lambda g: -len(members[g]))  # stable: ties keep the shuffled order
        filled = np.zeros(len(frac), dtype=np.int64)
        for g in shuffled:
            k = int(np.argmax(quota - filled))  # ties: the earlier split (train first)
            out[members[g]] = k
            filled[k] += len(members[g])
    assert (out >= 0).all()
    return out


def _groups(n: int, groups: Sequence[Hashable] | None) -> tuple[list[list[int]], list]:
    """Sample indices per group and each group's sort key (first appearance order kept)."""
    if groups is None:
        return [[i] for i in range(n)], list(range(n))
    index: dict[Hashable, int] = {}
    members: list[list[int]] = []
    for i, key in enumerate(groups):
        g = index.setdefault(key, len(members))
        if g == len(members):
            members.append([])
        members[g].append(i)
    keys = [str(k) for k in index]  # str: group keys of mixed types still sort
    return members, keys


def _group_strata(labels, members: list[list[int]], multilabel: bool) -> list[Hashable]:
    """One stratum per group (see the module docstring)."""
    if multilabel:
        y = np.asarray(labels)
        if y.ndim != 2:
            raise ValueError(f"multi-label labels must be an (N, L) array, got shape {y.shape}")
        positives = (y > 0).sum(axis=0)
        strata: list[Hashable] = []
        for idx in members:
            present = np.flatnonzero((y[idx] > 0).any(axis=0))
            if present.size == 0:
                strata.append(NO_POSITIVE)
            else:
                strata.append(int(min(present, key=lambda j: (positives[j], j))))
        return strata
    flat = [_hashable(v) for v in labels]
    total = Counter(flat)
    strata = []
    for idx in members:
        counts = Counter(flat[i] for i in idx)
        strata.append(min(counts, key=lambda c: (-counts[c], total[c], str(c))))
    return strata


def _hashable(value) -> Hashable:
    """A label as a dict key: numpy scalars and length-1 rows become plain Python values."""
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(
                f"a single-label split needs one label per sample, got {value.shape}; "
                "pass multilabel=True for (N, L) labels"
            )
        value = value.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _apportion(sizes: list[int], frac: np.ndarray) -> list[np.ndarray]:
    """Per stratum, the samples each split should get: ``floor(f * n)`` or one more.

    The leftover samples of a stratum go to the splits with the largest remainder plus the
    rounding carried from earlier strata (so totals track the fractions too); a split the
    stratum would otherwise miss wins ties; train always gets at least one sample.
    """
    carry = np.zeros(len(frac))
    quotas = []
    for n in sizes:
        target = frac * n
        quota = np.floor(target + _EPS).astype(np.int64)
        extra = int(n - quota.sum())
        if extra > 0:
            remainder = target - quota
            candidates = [k for k in range(len(frac)) if remainder[k] > _EPS]
            if len(candidates) < extra:  # float round-off only
                candidates = list(range(len(frac)))
            ranked = sorted(
                candidates,
                key=lambda k: (
                    0 if (k == 0 and quota[0] == 0) else 1,  # a class is trained on
                    -round(float(remainder[k] + carry[k]), 9),
                    0 if quota[k] == 0 else 1,  # coverage: a split without this stratum yet
                    -frac[k],
                    k,
                ),
            )
            for k in ranked[:extra]:
                quota[k] += 1
        carry += target - quota
        quotas.append(quota)
    return quotas
