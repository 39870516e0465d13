import numpy as np
import pytest

import train
import utils


@pytest.mark.parametrize("flag", [["--size", "95x130"], ["--epochs", "0"], ["--val-fraction", "1.5"],
                                  ["--lr", "-1"], ["--size", "big"], ["--flips", "diagonal"]])
def test_bad_flags_are_one_clear_error(flag):
    with pytest.raises(utils.UserError):
        train.parse_args(flag)


def test_subject_split_is_grouped_stratified_and_seeded():
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(1, 21), 50)
    present = rng.random(len(subjects)) < 0.4
    val = train.split_by_subject(subjects, present, 0.1, seed=7)
    assert set(subjects[val]).isdisjoint(subjects[~val])          # no subject on both sides
    assert val.sum() == 100                                       # 2 of 20 equal subjects
    assert abs(present[val].mean() - present.mean()) < 0.05
    np.testing.assert_array_equal(val, train.split_by_subject(subjects, present, 0.1, seed=7))
    assert not np.array_equal(val, train.split_by_subject(subjects, present, 0.1, seed=8))


def test_single_subject_needs_the_image_split():
    with pytest.raises(utils.UserError, match="--split image"):
        train.split_by_subject(np.ones(10), np.zeros(10, bool), 0.1, 0)


def test_image_split_is_stratified():
    present = np.arange(100) < 40
    val = train.split_by_image(present, 0.1, seed=0)
    assert val.sum() == 10 and present[val].sum() == 4
