import csv

import numpy as np
import pytest

import utils


def test_rle_reproduces_every_official_mask_string(shared_nerve):
    with open(shared_nerve / "train_masks.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["pixels"].strip()]
    assert len(rows) == 1983
    for row in rows:
        mask = utils.rle_decode(row["pixels"])
        assert mask.shape == (420, 580) and mask.dtype == np.uint8
        assert utils.rle_encode(mask) == row["pixels"].strip(), f"{row['subject']}_{row['img']}"


def test_rle_is_column_major_and_one_based():
    mask = np.zeros((420, 580), np.uint8)
    mask[0, 0] = mask[1, 0] = 1       # first two pixels of the first column
    mask[419, 0] = mask[0, 1] = 1      # last of the first column runs into the top of the second
    mask[5:8, 579] = 1
    assert utils.rle_encode(mask) == f"1 2 420 2 {579 * 420 + 6} 3"
    assert utils.rle_encode(np.zeros((420, 580))) == ""
    np.testing.assert_array_equal(utils.rle_decode(utils.rle_encode(mask)), mask)


def test_rle_round_trips_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = (rng.random((420, 580)) < rng.uniform(0, 1)).astype(np.uint8)
        np.testing.assert_array_equal(utils.rle_decode(utils.rle_encode(mask)), mask)


@pytest.mark.parametrize("bad", ["1", "0 5", "3 -1", f"{420 * 580} 2"])
def test_rle_decode_rejects_malformed_strings(bad):
    with pytest.raises(ValueError):
        utils.rle_decode(bad)


def test_mean_dice_on_hand_computed_cases():
    empty = np.zeros((1, 4, 4), np.uint8)
    a = np.zeros((1, 4, 4), np.uint8)
    a[0, :2, :2] = 1                          # 4 pixels
    b = np.zeros((1, 4, 4), np.uint8)
    b[0, :2, :1] = 1                          # 2 pixels, both inside a
    assert utils.mean_dice(empty, empty) == 1.0
    assert utils.mean_dice(empty, a) == 0.0
    assert utils.mean_dice(a, empty) == 0.0
    assert utils.mean_dice(a, a) == 1.0
    assert utils.mean_dice(a, b) == pytest.approx(2 * 2 / (4 + 2))
    # the mean is per image, not over pooled pixels
    assert utils.mean_dice(np.concatenate([a, empty]), np.concatenate([b, a])) == pytest.approx((2 / 3 + 0) / 2)


def test_postprocess_gates_on_presence_and_area_and_keeps_the_largest_component():
    probs = np.zeros((3, 10, 10), np.float32)
    probs[:, 0:2, 0:2] = 0.9     # 4 pixels
    probs[:, 5:9, 5:9] = 0.6     # 16 pixels
    masks = utils.postprocess(probs, [0.2, 0.8, 0.8])
    assert masks[0].sum() == 0 and masks[1].sum() == 20
    assert utils.postprocess(probs, [0.8] * 3, {"pixel_threshold": 0.7}).sum(axis=(1, 2)).tolist() == [4] * 3
    assert utils.postprocess(probs, [0.8] * 3, {"keep_largest": True})[0, 5:9, 5:9].all()
    assert utils.postprocess(probs, [0.8] * 3, {"keep_largest": True}).sum() == 48
    assert utils.postprocess(probs, [0.8] * 3, {"min_area": 21}).sum() == 0
    assert utils.postprocess(probs, [0.8] * 3, {"min_area": 20}).sum() == 60


def test_parse_size():
    assert utils.parse_size("96x128") == (96, 128)
    for bad in ("96", "ax5", "0x16"):
        with pytest.raises(utils.UserError):
            utils.parse_size(bad)


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with utils.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_turns_a_failed_write_into_one_message(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(utils.UserError, match="could not write .*out.txt .*earlier out.txt is unchanged"):
        with utils.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def write_arrays(folder, n=3, **replace):
    arrays = {"train_images": np.zeros((n, 420, 580), np.uint8), "train_masks": np.zeros((n, 420, 580), np.uint8),
              "train_ids": np.array([f"1_{i}" for i in range(n)]), "train_subjects": np.ones(n, np.int32)}
    for name, array in {**arrays, **replace}.items():
        np.save(folder / f"{name}.npy", array)
    return list(arrays)


@pytest.mark.parametrize("replace, problem", [
    ({"train_images": np.zeros((3, 96, 128), np.uint8)}, r"train_images.npy is \(3, 96, 128\) uint8"),
    ({"train_masks": np.zeros((3, 420, 580), np.float32)}, "train_masks.npy is .* float32"),
    ({"train_ids": np.array(["1_1", "1_2"])}, "train_ids.npy holds 2 train images, expected 3"),
    ({"train_subjects": np.ones((3, 2))}, "train_subjects.npy has shape"),
])
def test_arrays_from_another_run_are_refused(tmp_path, replace, problem):
    names = write_arrays(tmp_path, **replace)
    with pytest.raises(utils.UserError, match=f"(?s)data.py --input {tmp_path} --force.*{problem}"):
        utils.load_arrays(tmp_path, names)


def test_arrays_must_match_the_manifest_and_be_readable(tmp_path):
    names = write_arrays(tmp_path)
    assert len(utils.load_arrays(tmp_path, names)["train_images"]) == 3
    (tmp_path / utils.MANIFEST).write_text('{"train": 5, "test": 2}')
    with pytest.raises(utils.UserError, match="train_images.npy holds 3 train images, expected 5"):
        utils.load_arrays(tmp_path, names)
    (tmp_path / utils.MANIFEST).unlink()
    data = (tmp_path / "train_images.npy").read_bytes()
    (tmp_path / "train_images.npy").write_bytes(data[:len(data) // 2])
    with pytest.raises(utils.UserError, match="train_images.npy cannot be read"):
        utils.load_arrays(tmp_path, names)


def test_overlay_colours_true_and_false_positives_and_false_negatives():
    image = np.full((2, 2), 100, np.uint8)
    truth, prediction = np.array([[1, 1], [0, 0]]), np.array([[1, 0], [1, 0]])
    rgb = utils.overlay(image, truth, prediction)
    expected = [[utils.TRUE_POSITIVE, utils.FALSE_NEGATIVE], [utils.FALSE_POSITIVE, None]]
    for i in range(2):
        for j in range(2):
            colour = expected[i][j]
            want = [100] * 3 if colour is None else [int(0.5 * 100 + 0.5 * c) for c in colour]
            assert rgb[i, j].tolist() == want
