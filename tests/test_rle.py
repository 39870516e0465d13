import csv

import numpy as np
import pytest

from nerve.rle import rle_decode, rle_encode


def test_rle_reproduces_every_official_mask_string(shared_nerve):
    with open(shared_nerve / "train_masks.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["pixels"].strip()]
    assert len(rows) == 1983
    for row in rows:
        mask = rle_decode(row["pixels"])
        assert mask.shape == (420, 580) and mask.dtype == np.uint8
        assert rle_encode(mask) == row["pixels"].strip(), f"{row['subject']}_{row['img']}"


def test_rle_is_column_major_and_one_based():
    mask = np.zeros((420, 580), np.uint8)
    mask[0, 0] = mask[1, 0] = 1  # first two pixels of the first column
    mask[419, 0] = mask[0, 1] = 1  # last of the first column runs into the top of the second
    mask[5:8, 579] = 1
    assert rle_encode(mask) == f"1 2 420 2 {579 * 420 + 6} 3"
    assert rle_encode(np.zeros((420, 580))) == ""
    np.testing.assert_array_equal(rle_decode(rle_encode(mask)), mask)


def test_rle_round_trips_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = (rng.random((420, 580)) < rng.uniform(0, 1)).astype(np.uint8)
        np.testing.assert_array_equal(rle_decode(rle_encode(mask)), mask)


@pytest.mark.parametrize("bad", ["1", "0 5", "3 -1", f"{420 * 580} 2"])
def test_rle_decode_rejects_malformed_strings(bad):
    with pytest.raises(ValueError):
        rle_decode(bad)
