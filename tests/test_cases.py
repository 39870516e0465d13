import csv

import cv2
import numpy as np
import pytest

from nerve import cases
from nerve.deploy import DEFAULT

NO_GATE = {**DEFAULT, "presence_threshold": 0.0}


def square(shape, top, left, side):
    mask = np.zeros(shape, np.uint8)
    mask[top : top + side, left : left + side] = 1
    return mask


def test_a_case_row_scores_the_mask_shown_at_the_images_own_size_in_mm():
    truth = square((40, 60), 10, 10, 20)  # label map at the image's size
    probs = square((20, 30), 5, 6, 10).astype(np.float32)[None, ..., None]  # the model's half size, 2 columns right
    rows = cases.case_rows(probs, np.ones((1, 1)), [np.nan], [truth], lambda i: [NO_GATE], ["a"], ["s1"],
                           np.array([[0.5, 0.25]]), ["nerve"])  # fmt: skip
    (row,) = rows
    assert row["truth_present"] and row["shown"] and not row["flagged_unknown"]
    assert (row["true_area_px"], row["predicted_area_px"]) == (400, 400)
    assert row["true_area_mm2"] == pytest.approx(400 * 0.5 * 0.25)
    assert row["dice"] == pytest.approx(2 * 360 / 800) and row["iou"] == pytest.approx(360 / 440)
    assert 0 < row["hd95_mm"] <= 2 * 0.25  # the sides two columns apart, a column 0.25 mm
    assert row["nsd_2mm"] == 1.0  # the default tolerance in mm


def test_one_image_at_two_sizes_has_the_same_distances_in_mm():
    small, big = (60, 80), (120, 160)
    truth = {size: cv2.resize(square(small, 20, 20, 24), size[::-1], interpolation=cv2.INTER_NEAREST) for size in
             (small, big)}  # fmt: skip
    probs = square((30, 40), 10, 12, 12).astype(np.float32)[None, ..., None]
    spacing = {small: (0.2, 0.2), big: (0.1, 0.1)}
    hd95 = {
        size: cases.case_rows(
            probs,
            np.ones((1, 1)),
            [np.nan],
            [truth[size]],
            lambda i: [NO_GATE],
            ["a"],
            ["s"],
            np.array([spacing[size]]),
            ["nerve"],
        )[0]["hd95_mm"]  # fmt: skip
        for size in (small, big)
    }
    assert hd95[small] == pytest.approx(hd95[big], abs=0.15)  # within a pixel of the coarser image


def test_without_spacing_every_distance_is_in_pixels_and_says_so():
    truth, probs = square((20, 20), 5, 5, 8), square((20, 20), 5, 5, 8).astype(np.float32)[None, ..., None]
    spacing = np.array([[0.1, 0.1], [np.nan, np.nan]])  # one image without: the set has no mm
    rows = cases.case_rows(np.repeat(probs, 2, axis=0), np.ones((2, 1)), [np.nan, 5.0], [truth, truth],
                           lambda i: [NO_GATE], ["a", "b"], [1, 2], spacing, ["nerve"])  # fmt: skip
    assert {"hd95_px", "assd_px", "nsd_10px"} <= set(rows[0]) and "true_area_mm2" not in rows[0]
    assert rows[1]["flagged_unknown"] and not rows[0]["flagged_unknown"]


def test_the_gate_decides_what_is_shown():
    probs = square((20, 20), 5, 5, 8).astype(np.float32)[None, ..., None]
    empty = np.zeros((20, 20), np.uint8)
    (row,) = cases.case_rows(probs, np.full((1, 1), 0.2), [np.nan], [empty], lambda i: [DEFAULT], ["a"], ["s"],
                             np.full((1, 2), np.nan), ["nerve"])  # fmt: skip
    assert not row["shown"] and row["dice"] == 1.0 and row["nsd_10px"] == 1.0 and np.isnan(row["hd95_px"])


def test_intervals_resample_groups_not_frames():
    rng = np.random.default_rng(0)
    values = np.r_[np.zeros(100), np.ones(100)]  # two subjects, every frame of one alike
    two = cases.interval(values, np.ones(200, bool), ["a"] * 100 + ["b"] * 100, rng)
    assert two["value"] == 0.5 and (two["low"], two["high"]) == (0.0, 1.0)
    frames = cases.interval(values, np.ones(200, bool), np.arange(200), rng)  # frames as their own groups
    assert 0.4 < frames["low"] < 0.5 < frames["high"] < 0.6
    one = cases.interval(values, np.ones(200, bool), ["a"] * 200, rng)  # a single subject: no spread to resample
    assert one["value"] == 0.5 and one["low"] is None and cases.span(one) == "one group: none"
    nothing = cases.interval(values, np.zeros(200, bool), np.arange(200), rng)
    assert nothing["value"] is None and nothing["images"] == 0


def test_summary_counts_detections_and_says_what_cannot_be_measured(tmp_path):
    rows = [
        {
            "structure": "nerve",
            "group": g,
            "truth_present": t,
            "shown": s,
            "dice": d,
            "hd95_px": h,
            "assd_px": h,
            "nsd_10px": d,
        }  # fmt: skip
        for g, t, s, d, h in [(1, True, True, 0.8, 3.0), (1, True, False, 0.0, np.nan), (2, True, True, 0.6, 5.0)]
    ]
    s = cases.summary(rows, ["nerve"])["nerve"]
    assert s["frames"] == {"true_positive": 2, "false_negative": 1, "false_positive": 0, "true_negative": 0}
    assert s["figures"]["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert s["figures"]["hd95_px"]["value"] == 4.0 and s["figures"]["hd95_px"]["images"] == 2
    assert s["figures"]["specificity"]["value"] is None and s["figures"]["npv"]["value"] == 0.0  # the miss
    assert "no image lacks it" in cases.headline_table({"nerve": s})
    path = cases.write_csv(tmp_path, rows)
    with open(path, newline="") as f:
        assert [r["dice"] for r in csv.DictReader(f)] == ["0.8", "0", "0.6"]
