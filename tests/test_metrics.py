import numpy as np
import pytest

from conftest import brute_force_boundary
from nerve import metrics


def test_mean_dice_on_hand_computed_cases():
    empty = np.zeros((1, 4, 4), np.uint8)
    a = np.zeros((1, 4, 4), np.uint8)
    a[0, :2, :2] = 1  # 4 pixels
    b = np.zeros((1, 4, 4), np.uint8)
    b[0, :2, :1] = 1  # 2 pixels, both inside a
    assert metrics.mean_dice(empty, empty) == 1.0
    assert metrics.mean_dice(empty, a) == 0.0
    assert metrics.mean_dice(a, empty) == 0.0
    assert metrics.mean_dice(a, a) == 1.0
    assert metrics.mean_dice(a, b) == pytest.approx(2 * 2 / (4 + 2))
    # the mean is per image, not over pooled pixels
    assert metrics.mean_dice(np.concatenate([a, empty]), np.concatenate([b, a])) == pytest.approx((2 / 3 + 0) / 2)


def test_roc_auc_on_hand_computed_cases():
    assert metrics.roc_auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert metrics.roc_auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert metrics.roc_auc([0.5, 0.5], [1, 0]) == 0.5
    assert np.isnan(metrics.roc_auc([0.3, 0.4], [1, 1]))


def test_scores_from_pixel_counts():
    # image 0: nerve of 10 px, 6 found, 2 extra; image 1: empty and predicted empty;
    # image 2: empty but 5 px predicted; image 3: nerve of 4 px missed
    tp, fp, fn = np.array([6, 0, 0, 0]), np.array([2, 0, 5, 0]), np.array([4, 0, 0, 4])
    m = metrics.scores(tp, fp, fn, present=np.array([0.9, 0.1, 0.6, 0.4]))
    assert m["with_structure"] == 2
    assert m["dice_nonempty"] == pytest.approx((12 / 18 + 0) / 2)
    assert m["leaderboard"] == pytest.approx((12 / 18 + 1 + 0 + 0) / 4)
    assert m["presence_accuracy"] == 0.5 and m["presence_auc"] == 0.75
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5  # image 0 found, 3 missed; 1 left empty, 2 not
    assert m["iou_nonempty"] == pytest.approx((6 / 12 + 0) / 2)
    assert m["precision"] == pytest.approx(6 / 13) and m["recall"] == pytest.approx(6 / 14)
    assert m["false_positive_pixels"] == 7 and m["false_negative_pixels"] == 8


def test_pixel_counts_and_presence_of_masks():
    truth = np.zeros((2, 3, 3), np.uint8)
    truth[0, 0, :] = 1
    masks = np.zeros_like(truth)
    masks[0, :, 0] = 1
    tp, fp, fn = metrics.pixel_counts(truth, masks)
    assert (tp.tolist(), fp.tolist(), fn.tolist()) == ([1, 0], [2, 0], [2, 0])
    assert metrics.presence(truth).tolist() == [True, False]
    np.testing.assert_allclose(metrics.leaderboard_dice(truth, masks), [2 / 6, 1.0])


def test_expected_calibration_error_on_hand_computed_cases():
    labels = np.array([1, 1, 1, 0] * 25, bool)
    assert metrics.expected_calibration_error(np.full(100, 0.75), labels) == pytest.approx(0.0)
    assert metrics.expected_calibration_error(np.full(100, 0.95), labels) == pytest.approx(0.2)
    # two bins: 0.1 claimed where none are positive, 0.9 where all are: 0.1 off in each
    probs, labels = np.r_[np.full(50, 0.1), np.full(50, 0.9)], np.r_[np.zeros(50), np.ones(50)]
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.1)
    count, confidence, frequency = metrics.calibration_bins(probs, labels)
    assert count[[1, 9]].tolist() == [50, 50] and count.sum() == 100 and frequency[9] == 1.0
    assert metrics.calibration_bins([1.0], [True])[0][-1] == 1  # a probability of 1 is in the last bin


def test_presence_of_each_structure_in_label_maps():
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[0, 0, 0], labels[1, 1, 1], labels[1, 2, 2] = 1, 1, 2
    assert metrics.structure_presence(labels, 2).tolist() == [[True, False], [True, True], [False, False]]


def disc(shape, centre, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_boundary_distances_of_shapes_with_known_answers():
    square = np.zeros((40, 50), bool)
    square[10:30, 10:30] = True
    same = metrics.boundary_scores(square, square)
    assert (same["hd95"], same["assd"], same["nsd"]) == (0.0, 0.0, 1.0)
    shifted = np.roll(square, 3, axis=1)  # the left and right sides 3 pixels apart, the rest overlapping
    assert 0 < metrics.boundary_scores(square, shifted)["hd95"] <= 3.0
    assert metrics.boundary_scores(square, shifted, tolerance=3.0)["nsd"] == 1.0
    assert metrics.boundary_scores(square, shifted, tolerance=2.9)["nsd"] < 1.0
    # concentric discs k pixels apart: every border pixel about k from the other border
    for k in (2, 5):
        inner, outer = disc((80, 80), (40, 40), 15), disc((80, 80), (40, 40), 15 + k)
        scores = metrics.boundary_scores(inner, outer)
        assert scores["hd95"] == pytest.approx(k, abs=0.75) and scores["assd"] == pytest.approx(k, abs=0.75)
    # a mm is a mm: rows 0.2 mm apart, so 3 rows of shift are 0.6 mm whatever the columns' spacing
    down = np.roll(square, 3, axis=0)
    assert metrics.boundary_scores(square, down, spacing=(0.2, 1.0), tolerance=0.61)["nsd"] == 1.0
    assert max(np.concatenate(metrics.border_distances(square, down, (0.2, 1.0)))) == pytest.approx(0.6)


def test_boundary_conventions_when_a_mask_is_empty():
    empty, square = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    square[5:10, 5:10] = True
    both = metrics.boundary_scores(empty, empty)
    assert np.isnan(both["hd95"]) and np.isnan(both["assd"]) and both["nsd"] == 1.0
    for truth, mask in ((square, empty), (empty, square)):
        one = metrics.boundary_scores(truth, mask)
        assert np.isnan(one["hd95"]) and np.isnan(one["assd"]) and one["nsd"] == 0.0


def test_boundary_distances_agree_with_independent_implementations_on_random_masks():
    binary = pytest.importorskip("medpy.metric.binary", reason="medpy is in requirements-dev.txt")
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = disc((60, 70), rng.integers(15, 45, 2), rng.integers(4, 14)) | (rng.random((60, 70)) < 0.01)
        mask = disc((60, 70), rng.integers(15, 45, 2), rng.integers(4, 14))
        spacing, tolerance = tuple(rng.uniform(0.05, 0.5, 2)), rng.uniform(0.2, 2.0)
        ours = metrics.boundary_scores(truth, mask, spacing, tolerance)
        assert ours["hd95"] == pytest.approx(binary.hd95(mask, truth, spacing), rel=1e-9)
        assert ours["assd"] == pytest.approx(binary.assd(mask, truth, spacing), rel=1e-9)
        hd95, assd, nsd = brute_force_boundary(truth, mask, spacing, tolerance)
        assert (ours["hd95"], ours["assd"], ours["nsd"]) == pytest.approx((hd95, assd, nsd), rel=1e-9)
