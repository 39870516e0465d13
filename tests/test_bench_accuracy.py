import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import accuracy  # noqa: E402


def test_label_agreement_compares_each_mask_with_its_nearest_frame():
    rng = np.random.default_rng(0)
    view, other = rng.integers(0, 255, (2, 42, 58)).astype(np.uint8)
    left, right = np.zeros((2, 42, 58), np.uint8)
    left[10:20, 5:15] = 1
    right[10:20, 40:50] = 1
    # subject 1: the same view labelled twice alike, then another view labelled elsewhere;
    # subject 2: a single frame (no other to compare with) and an image without a nerve
    images = np.stack([view, view, other, other, view])
    masks = np.stack([left, left, right, left, np.zeros_like(left)])
    subjects = np.array([1, 1, 1, 2, 3])
    overall, near = accuracy.label_agreement(images, masks, subjects)
    assert overall == pytest.approx(2 / 3)  # 1, 1, and 0 for the other view (nearest: a differently placed mask)
    assert near == 1.0


def test_label_agreement_of_a_half_shifted_mask():
    view = np.random.default_rng(1).integers(0, 255, (42, 58)).astype(np.uint8)
    a, b = np.zeros((2, 42, 58), np.uint8)
    a[10:20, 10:20] = 1
    b[10:20, 15:25] = 1
    overall, near = accuracy.label_agreement(np.stack([view, view]), np.stack([a, b]), np.array([7, 7]))
    assert overall == near == pytest.approx(0.5)
