import numpy as np
import pytest

from conftest import assert_picture
from nerve import figures


def test_overlay_colours_true_and_false_positives_and_false_negatives():
    image = np.full((2, 2), 100, np.uint8)
    truth, prediction = np.array([[1, 1], [0, 0]]), np.array([[1, 0], [1, 0]])
    rgb = figures.overlay(image, truth, prediction)
    expected = [[figures.TRUE_POSITIVE, figures.FALSE_NEGATIVE], [figures.FALSE_POSITIVE, None]]
    for i in range(2):
        for j in range(2):
            colour = expected[i][j]
            want = [100] * 3 if colour is None else [int(0.5 * 100 + 0.5 * c) for c in colour]
            assert rgb[i, j].tolist() == want


def test_cases_png_and_training_curves_are_readable_pictures(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 42, 58), np.uint8)
    truth = np.zeros((4, 42, 58), np.uint8)
    truth[:, 10:20, 10:30] = 1
    shown = figures.cases_png(images, truth, np.roll(truth, 3, axis=2), list("abcd"), tmp_path / "c.png")
    assert_picture(shown, tints=[figures.TRUE_POSITIVE])  # the overlap of truth and prediction tinted
    assert_picture(shown, tints=[figures.FALSE_POSITIVE])
    untinted = figures.cases_png(images, 0 * truth, 0 * truth, list("abcd"), tmp_path / "e.png")  # nothing to tint
    with pytest.raises(AssertionError, match="no tint"):
        assert_picture(untinted, tints=[figures.TRUE_POSITIVE])
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss,val_loss,val_leaderboard,learning_rate\n0,1.0,0.9,0.5,0.001\n1,0.8,0.7,0.6,0.0005\n")
    assert_picture(figures.training_curves(log, tmp_path / "curves.png"), 250, 1000)
