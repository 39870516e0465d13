"""End to end, as a user runs it: data.py -> train.py -> submission.py on a tiny synthetic set."""

import csv
import json
import shutil

import cv2
import keras
import numpy as np

import utils
from conftest import ROOT, assert_picture, run_main, run_script
from nerve import figures


def test_training_writes_model_settings_and_logs(trained):
    results, logs, stdout = trained
    assert (results / "net.keras").stat().st_size > 0 and (results / "net.hdf5").stat().st_size > 0
    settings = json.loads((results / "settings.json").read_text())
    assert settings["size"] == [32, 48] and 0 < settings["std"] and 0 <= settings["val_leaderboard"] <= 1
    val_subjects = {i.split("_")[0] for i in settings["val_ids"]}
    assert len(val_subjects) == 1, "validation holds out whole subjects"
    rows = list(csv.DictReader(open(results / "training_log.csv")))
    assert len(rows) == 2 and {"val_leaderboard", "present_accuracy", "val_present_accuracy"} <= set(rows[0])
    assert any((logs / "e2e").rglob("*tfevents*"))
    assert "val: " in stdout and "best val_leaderboard" in stdout


def test_submission_lists_every_test_id_and_decodes_to_the_models_masks(trained, tiny_input):
    results, _, _ = trained
    threshold = 0.3  # low enough that the two-epoch model draws something
    flags = ["--presence-threshold", 0.0, "--pixel-threshold", threshold, "--tta", "none"]
    result = run_script(ROOT / "submission.py", "--input", tiny_input, "--results", results, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(results / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img", "pixels"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 17))
    # the model's own masks, predicted here: its input size, back to 420x580, thresholded
    net = keras.saving.load_model(results / "net.keras")
    images = np.load(tiny_input / "test_images.npy")[np.argsort(np.load(tiny_input / "test_ids.npy"))]
    x = np.stack([cv2.resize(i, (48, 32), interpolation=cv2.INTER_AREA) for i in images])[..., None]
    probs = net.predict(x.astype(np.float32), verbose=0)["mask"][..., 0]
    drawn = 0
    for (_, pixels), prob in zip(rows[1:], probs):
        mask = utils.rle_decode(pixels)
        assert utils.rle_encode(mask) == pixels
        want = cv2.resize(prob, (580, 420), interpolation=cv2.INTER_LINEAR) >= threshold
        assert np.mean(mask.astype(bool) != want) < 0.001  # the same mask, up to pixels on the threshold
        drawn += bool(mask.any())
    assert drawn, "every mask is empty: the comparison proves nothing"
    # a second run, in bf16 (the fp32 weights copied into a bf16 network), keeps the first CSV
    again = run_script(ROOT / "submission.py", "--input", tiny_input, "--results", results, "--precision", "bf16")
    assert again.returncode == 0 and "kept the earlier submission" in again.stdout
    assert len(list(results.glob("submission*.csv"))) == 2


def test_submission_without_a_model_is_one_clear_error(tiny_input, tmp_path):
    result = run_main("submission", "--input", tiny_input, "--results", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "run `python train.py` first" in result.stderr


def test_truncated_or_mismatched_model_is_one_clear_error(trained, tiny_input, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(trained[0], results)
    settings = json.loads((results / "settings.json").read_text())
    (results / "settings.json").write_text(json.dumps({**settings, "size": [64, 96]}))
    result = run_main("submission", "--input", tiny_input, "--results", results)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "takes 32x48 images and predicts 1 structure(s) but its settings.json says 64x96" in result.stderr
    model = (results / "net.keras").read_bytes()
    (results / "net.keras").write_bytes(model[: len(model) // 2])
    result = run_main("submission", "--input", tiny_input, "--results", results)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot load {results / 'net.keras'}" in result.stderr


def test_train_on_arrays_from_another_run_is_one_clear_error(tiny_input, tmp_path):
    for name in ("train_images", "train_masks", "train_ids", "train_subjects", "train_sizes"):
        shutil.copy(tiny_input / f"{name}.npy", tmp_path)
    np.save(tmp_path / "train_masks.npy", np.zeros((5, 420, 580), np.uint8))
    result = run_main("train", "--input", tmp_path, "--results", tmp_path / "r")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "train_masks.npy holds 5 train images, expected 48" in result.stderr and "--force" in result.stderr


def test_train_without_arrays_is_one_clear_error(tmp_path):
    result = run_main("train", "--input", tmp_path, "--results", tmp_path / "r")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "run `python data.py` first" in result.stderr


def test_training_writes_curves_and_validation_overlays(trained):
    results, _, _ = trained
    assert_picture(results / "curves.png", 250, 1000)
    # the validation images show the nerve: its pixels are tinted as found or missed
    assert_picture(results / "val_overlays.png", 300, 700, tints=[figures.TRUE_POSITIVE, figures.FALSE_NEGATIVE])


def test_tensorboard_gets_validation_images_learning_rate_and_presence_accuracy(trained):
    import tensorflow as tf

    _, logs, _ = trained
    found = {}
    for events in (logs / "e2e").rglob("*tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(value)
    assert {"epoch_learning_rate", "epoch_present_accuracy", "epoch_leaderboard"} <= set(found)
    images = found["validation_overlays"]
    assert len(images) == 2, "one set of images per epoch"
    tiles = tf.make_ndarray(images[-1].tensor)  # [width, height, png, png, ...]
    assert len(tiles) - 2 == 8 and tiles[:2].astype(int).tolist() == [48, 32]
    picture = tf.io.decode_png(tiles[2]).numpy()
    assert picture.shape == (32, 48, 3) and picture.std() > 5
