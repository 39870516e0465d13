import csv

import numpy as np

import duplicates
from conftest import assert_picture
from nerve import neardup


def frames_with_twins():
    """Two subjects of independent noise frames. In subject 1, frame 1 nearly repeats frame 0 (masks agree)
    and frame 3 nearly repeats frame 2 with its mask left empty; frame 6, in subject 2, repeats frame 0
    exactly but must not pair with it across subjects."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 420, 580)).astype(np.uint8)
    images[1] = np.clip(images[0] + rng.normal(0, 4, (420, 580)), 0, 255)
    images[3] = np.clip(images[2] + rng.normal(0, 4, (420, 580)), 0, 255)
    images[6] = images[0]
    masks = np.zeros((8, 420, 580), np.uint8)
    masks[[0, 1, 2, 6], 100:200, 200:300] = 1
    subjects = np.array([1, 1, 1, 1, 1, 2, 2, 2])
    return images, masks, subjects


def test_finds_twins_within_subjects_only_and_flags_the_conflict():
    images, masks, subjects = frames_with_twins()
    pairs, distances, every = neardup.near_pairs(images, subjects)
    assert pairs.tolist() == [[0, 1], [2, 3]]
    assert (distances < 0.005).all() and len(every) == 10 + 3  # all within-subject pairs, for the histogram
    stats = neardup.pair_stats(masks, pairs)
    assert stats["one_empty"].tolist() == [False, True] and stats["conflict"].tolist() == [False, True]
    assert stats["area"].tolist() == [[10000, 10000], [10000, 0]] and stats["dice"][0] == 1.0


def test_conflicts_are_kept_dropped_or_relabelled():
    images, masks, subjects = frames_with_twins()
    pairs, distances, _ = neardup.near_pairs(images, subjects)
    one_empty = neardup.pair_stats(masks, pairs)["one_empty"]
    use, same = neardup.resolve_conflicts(masks, pairs, distances, one_empty, "keep")
    assert use.all() and np.array_equal(same, masks)
    use, same = neardup.resolve_conflicts(masks, pairs, distances, one_empty, "drop")
    assert np.flatnonzero(~use).tolist() == [3] and np.array_equal(same, masks)
    use, fixed = neardup.resolve_conflicts(masks, pairs, distances, one_empty, "relabel")
    assert (
        use.all()
        and np.array_equal(fixed[3], masks[2])
        and np.array_equal(np.delete(fixed, 3, 0), np.delete(masks, 3, 0))
    )


def test_command_writes_the_pairs_csv_histogram_and_side_by_side_pictures(tmp_path):
    images, masks, subjects = frames_with_twins()
    arrays = {
        "train_images": images,
        "train_masks": masks,
        "train_ids": np.array([f"{s}_{i}" for i, s in enumerate(subjects)]),
        "train_subjects": subjects.astype(np.int32),
    }
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    duplicates.main(["--input", str(tmp_path), "--results", str(tmp_path / "results")])
    rows = list(csv.DictReader(open(tmp_path / "results" / "duplicates.csv")))
    assert [(r["id_a"], r["id_b"], r["conflict"]) for r in rows] == [("1_0", "1_1", "0"), ("1_2", "1_3", "1")]
    assert_picture(tmp_path / "results" / "duplicates_hist.png", 250, 500)
    assert_picture(tmp_path / "results" / "duplicates_pairs.png", 150, 700)


def test_each_nerve_mask_is_compared_with_its_closest_frame_in_the_subject():
    images, masks, subjects = frames_with_twins()
    agreement, duplicate = neardup.nearest_frame_agreement(images, masks, subjects)
    # frames 0 and 1: twins marked alike; frame 2: its twin 3 left empty; frame 6: its subject's other
    # frames are unrelated and empty (its exact copy, frame 0, belongs to another subject)
    assert agreement.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert duplicate.tolist() == [True, True, True, False]
