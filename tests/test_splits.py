from nerve.common import UserError

import numpy as np
import pytest

from nerve import splits


def _subjects(seed=0, n=30):
    """n subjects of 20-80 frames, each subject's frames 70-100% with a nerve."""
    rng = np.random.default_rng(seed)
    subjects = np.repeat(np.arange(1, n + 1), rng.integers(20, 80, n))
    present = rng.random(len(subjects)) < np.repeat(rng.uniform(0.7, 1.0, n), np.bincount(subjects)[1:])
    return subjects, present


def test_folds_hold_every_subject_exactly_once_balanced_and_deterministic():
    subjects, present = _subjects()
    fold = splits.assign_folds(present, subjects, 5, seed=3)
    assert sorted(set(fold.tolist())) == [0, 1, 2, 3, 4]
    for s in np.unique(subjects):
        assert len(set(fold[subjects == s].tolist())) == 1, "a subject on both sides"
    sizes = np.bincount(fold)
    assert sizes.max() < 1.3 * sizes.min(), sizes
    rates = [present[fold == k].mean() for k in range(5)]
    assert max(rates) - min(rates) < 0.05
    np.testing.assert_array_equal(fold, splits.assign_folds(present, subjects, 5, seed=3))
    assert not np.array_equal(fold, splits.assign_folds(present, subjects, 5, seed=4))


def test_too_few_subjects_for_the_folds_is_one_clear_error():
    with pytest.raises(UserError, match="3 subjects cannot fill 5"):
        splits.assign_folds(np.ones(30, bool), np.repeat([1, 2, 3], 10), 5, seed=0)


def test_single_split_is_grouped_stratified_seeded_and_about_the_fraction():
    subjects, present = _subjects()
    val = splits.validation_split(present, subjects, 0.1, seed=7)
    assert set(subjects[val]).isdisjoint(subjects[~val])
    assert 0.05 < val.mean() < 0.15
    assert abs(present[val].mean() - present.mean()) < 0.05
    np.testing.assert_array_equal(val, splits.validation_split(present, subjects, 0.1, seed=7))
    # fewer subjects than 1 / fraction: one subject's worth is held out
    few = splits.validation_split(np.ones(40, bool), np.repeat([1, 2, 3, 4], 10), 0.1, seed=0)
    assert few.sum() == 10


def test_single_subject_needs_the_image_split():
    with pytest.raises(UserError, match="--split image"):
        splits.validation_split(np.zeros(10, bool), np.ones(10), 0.1, 0)


def test_image_split_is_stratified():
    present = np.arange(100) < 40
    val = splits.validation_split(present, np.ones(100), 0.1, seed=0, by="image")
    assert val.sum() == 10 and present[val].sum() == 4
    fold = splits.assign_folds(present, np.ones(100), 4, seed=0, by="image")
    assert np.bincount(fold).tolist() == [25] * 4 and [present[fold == k].sum() for k in range(4)] == [10] * 4
