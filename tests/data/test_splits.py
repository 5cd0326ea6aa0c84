"""The stratified, patient-grouped splitter: fractions per class, no sample lost, groups kept
whole, seeded and deterministic, and independent of the global random state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlite.data.splits import NO_POSITIVE, _group_strata, check_fractions, stratified_split

FRACTIONS = (0.7, 0.1, 0.2)


def _counts(split: np.ndarray) -> np.ndarray:
    return np.bincount(split, minlength=3)


@pytest.mark.parametrize("fractions", [FRACTIONS, (0.8, 0.1, 0.1), (0.5, 0.25, 0.25)])
def test_each_class_within_one_sample_of_its_fractions(fractions):
    rng = np.random.default_rng(0)
    sizes = [1, 2, 3, 4, 5, 7, 9, 10, 13, 31, 100, 257]
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    split = stratified_split(labels, fractions, seed=1)
    assert split.shape == labels.shape and set(np.unique(split)) <= {0, 1, 2}
    for c, n in enumerate(sizes):
        counts = _counts(split[labels == c])
        assert counts.sum() == n
        assert np.all(np.abs(counts - np.asarray(fractions) * n) < 1), (n, counts)


@pytest.mark.parametrize("n", range(1, 9))
def test_tiny_classes_lose_no_sample_and_are_trained_on(n):
    # MONAI's partition_dataset gives n=2 -> [1, 0, 0]: one sample silently dropped
    labels = ["rare"] * n + ["common"] * 50
    split = stratified_split(labels, FRACTIONS, seed=0)
    rare = _counts(split[:n])
    assert rare.sum() == n  # every sample assigned
    assert rare[0] >= 1  # a class is always in train
    assert np.all(np.abs(rare - np.asarray(FRACTIONS) * n) < 1)
    if n >= 2:
        assert rare[1] + rare[2] >= 1  # and, from two samples on, also evaluated


def test_known_small_class_allocations():
    # the leftover sample goes where it is most owed: n=2 -> train + test, n=5 -> 3/1/1
    assert _counts(stratified_split([0, 0], FRACTIONS)).tolist() == [1, 0, 1]
    assert _counts(stratified_split([0] * 3, FRACTIONS)).tolist() == [2, 0, 1]
    assert _counts(stratified_split([0] * 5, FRACTIONS)).tolist() == [3, 1, 1]
    assert _counts(stratified_split([0] * 10, FRACTIONS)).tolist() == [7, 1, 2]


def test_many_small_classes_still_add_up_overall():
    # 5 classes x 5 images: per class 3.5/0.5/1 -> rounding carried across classes, so val is
    # not empty (rounding every class the same way would give 20/0/5)
    labels = np.repeat(np.arange(5), 5)
    counts = _counts(stratified_split(labels, FRACTIONS, seed=0))
    assert np.all(np.abs(counts - np.asarray(FRACTIONS) * 25) < 1), counts
    labels = np.repeat(np.arange(40), 3)
    counts = _counts(stratified_split(labels, FRACTIONS, seed=0))
    assert np.all(np.abs(counts - np.asarray(FRACTIONS) * 120) < 1.5), counts


def test_groups_are_never_split_and_classes_stay_roughly_stratified():
    rng = np.random.default_rng(3)
    n_patients = 150
    per_patient = rng.integers(1, 6, n_patients)
    patient_class = rng.choice(3, n_patients, p=[0.6, 0.3, 0.1])
    groups = np.repeat([f"P{p:03d}" for p in range(n_patients)], per_patient)
    labels = np.repeat(patient_class, per_patient)
    split = stratified_split(labels, FRACTIONS, seed=5, groups=groups)
    for p in np.unique(groups):
        assert len(set(split[groups == p].tolist())) == 1, p
    for c in range(3):
        share = _counts(split[labels == c]) / (labels == c).sum()
        assert np.all(np.abs(share - FRACTIONS) < 0.08), (c, share)
    assert np.all(np.abs(_counts(split) / len(split) - FRACTIONS) < 0.04)


def test_group_stratum_is_its_most_common_class():
    labels = ["a", "b", "b", "a", "c"]
    members = [[0, 1, 2], [3, 4]]  # group 0: b twice; group 1: tie a/c -> c (rarer overall)
    assert _group_strata(labels, members, multilabel=False) == ["b", "c"]


def test_multilabel_stratum_is_the_rarest_positive_label():
    y = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 0, 0], [1, 0, 1], [1, 0, 0]])
    # positives per label: 5, 1, 2
    members = [[0], [1], [2], [3], [4, 5]]
    assert _group_strata(y, members, multilabel=True) == [0, 1, 2, NO_POSITIVE, 2]
    split = stratified_split(y, FRACTIONS, seed=0, multilabel=True)
    assert len(split) == len(y)
    assert split[1] == 0  # the only sample with label 1 is trained on


def test_seeded_and_deterministic():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    groups = rng.integers(0, 90, 300)
    a = stratified_split(labels, FRACTIONS, seed=11, groups=groups)
    b = stratified_split(labels, FRACTIONS, seed=11, groups=groups)
    c = stratified_split(labels, FRACTIONS, seed=12, groups=groups)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_group_order_does_not_depend_on_row_order():
    # groups are ordered by key before the seeded shuffle: listing the rows differently moves
    # nobody
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 80)
    keys = [f"img{i:03d}" for i in range(80)]
    perm = rng.permutation(80)
    a = stratified_split(labels, FRACTIONS, seed=4, groups=keys)
    b = stratified_split(labels[perm], FRACTIONS, seed=4, groups=[keys[i] for i in perm])
    assert np.array_equal(a[perm], b)


def test_global_random_state_untouched():
    np.random.seed(123)
    torch.manual_seed(123)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    stratified_split(np.arange(100) % 3, FRACTIONS, seed=0)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize(
    "fractions, match",
    [
        ((0.7, 0.3, 0.2), "sum to 1"),
        ((0.9, 0.1, 0.0), "> 0"),
        ((1.1, -0.1), "> 0"),
        (("a", "b"), "numbers"),
        ((True, 0.5), "numbers"),
    ],
)
def test_bad_fractions(fractions, match):
    with pytest.raises(ValueError, match=match):
        check_fractions(fractions)


def test_group_count_must_match():
    with pytest.raises(ValueError, match="3 group keys for 2 samples"):
        stratified_split([0, 1], FRACTIONS, groups=["a", "b", "c"])
    assert stratified_split([], FRACTIONS).shape == (0,)
