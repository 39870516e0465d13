import csv
import json
import shutil

import cv2
import numpy as np
import pytest

import export
from conftest import (
    ROOT,
    TINY,
    TWO_FOLD_SPECS,
    assert_picture,
    brute_force_boundary,
    run_main,
    run_script,
    stats_case,
    two_fold_case,
)
from nerve import common, crossval, deploy, inference, postprocess
from nerve.predictor import Predictor


def out_of_fold(index):
    """The two-fold out-of-fold predictions of stats_case's four images, stored in `index` order."""
    probs, truth, present = stats_case()
    oof = {
        "probs": probs[..., None],
        "probs_flip": probs[..., None],
        "present": present[:, None],
        "present_flip": present[:, None],
        "ood": np.array([0.5, 0.9, 1.5, np.nan], np.float32),
        "ood_flip": np.array([0.5, 0.9, 1.5, np.nan], np.float32),
        "fold": np.array([0, 1, 0, 1]),
        "index": np.asarray(index),
        "crop": np.full((4, 4), -1),  # frames, no crop views
    }
    return oof, truth


def test_cross_validation_tunes_each_fold_on_the_others_only():
    probs, truth, present, fold = two_fold_case()
    order = np.random.default_rng(0).permutation(len(fold))  # rows stored in another order than data.py's
    oof = {
        "probs": probs[order, ..., None],
        "present": present[order, None],
        "ood": np.zeros(len(fold), np.float32),
        "fold": fold[order],
        "index": order,
        "crop": np.full((len(fold), 4), -1),
    }
    report = crossval.cross_validate(oof, truth, ["nerve"], tta="none")
    assert report["fold_postprocess"]["nerve"] == dict(enumerate(TWO_FOLD_SPECS))
    assert report["postprocess"]["nerve"] == TWO_FOLD_SPECS[1] and report["default_gate"] == []
    rows = report["rows"]["nerve"]
    # fold 1's gate (0.65) empties fold 1's false detections (0.3); fold 0's (0.35) keeps fold 0's (0.6)
    assert rows["fold 1"]["leaderboard"] > 0.99 and rows["fold 0"]["leaderboard"] < 0.1
    lines = crossval.table(report["rows"]).splitlines()
    assert "dice_nonempty" in lines[0] and lines[1].split()[:2] == ["fold", "0"]  # one structure: no name


def test_too_few_images_without_the_structure_keep_the_default_gate():
    oof, truth = out_of_fold([1, 3, 2, 0])
    report = crossval.cross_validate(oof, truth[[3, 0, 2, 1]], ["nerve"])  # the masks in data.py's order
    assert report["default_gate"] == ["nerve"]  # two images without a nerve are too few to tune a gate on
    specs = report["fold_postprocess"]["nerve"].values()
    gates = [(spec["presence_threshold"], spec["min_area_fraction"]) for spec in specs]
    assert gates == [(postprocess.DEFAULT["presence_threshold"], postprocess.DEFAULT["min_area_fraction"])] * 2
    assert set(report["rows"]["nerve"]) == {"fold 0", "fold 1", "all folds"}


def test_crop_views_are_scored_on_their_own_row_against_their_crop_and_tuned_with_the_frames():
    oof, truth = out_of_fold(np.arange(4))
    # a crop view of each nerve frame: the top left quarter, which the nerve (rows 100-200, columns 100-250 at
    # 420x580) misses, predicted empty with a low presence, then the frames' own predictions again
    view = {key: oof[key][:2] for key in ("probs", "probs_flip", "present", "present_flip", "ood", "ood_flip")}
    view["probs"] = view["probs_flip"] = np.zeros((2, 42, 58, 1), np.float32)
    view["present"] = view["present_flip"] = np.array([[0.1], [0.2]])
    views = {key: np.concatenate([oof[key], view[key]]) for key in view}
    views.update(fold=np.r_[oof["fold"], 0, 1], index=np.r_[oof["index"], 0, 1])
    views["crop"] = np.concatenate([oof["crop"], [[0, 0, 90, 90]] * 2])
    report = crossval.cross_validate(views, truth, ["nerve"])
    rows = report["rows"]["nerve"]
    assert rows["all folds"] == crossval.cross_validate(oof, truth, ["nerve"])["rows"]["nerve"]["all folds"]
    assert rows["crop views"]["images"] == 2 and rows["crop views"]["with_structure"] == 0  # the crop misses it
    assert rows["crop views"]["specificity"] == 1.0 and rows["crop views"]["leaderboard"] == 1.0
    assert np.isinf(report["dice"][4:]).all()  # the worst cases are frames
    assert [labels.shape for labels in crossval.row_labels(truth, views)][3:] == [(420, 580), (90, 90), (90, 90)]


def test_several_structures_are_scored_and_tuned_each_on_its_own_labels():
    oof, truth = out_of_fold(np.arange(4))
    second = {
        key: np.concatenate([oof[key]] * 2, axis=-1) for key in ("probs", "probs_flip", "present", "present_flip")
    }
    report = crossval.cross_validate({**oof, **second}, truth * 2, ["nerve", "vessel"])  # label 2: the vessel
    nerve, vessel = (report["rows"][name]["all folds"] for name in ("nerve", "vessel"))
    assert nerve["with_structure"] == 0 and vessel["with_structure"] == 2 and vessel["dice_nonempty"] > 0.5
    assert crossval.table(report["rows"]).splitlines()[-1].split()[:3] == ["vessel", "all", "folds"]


@pytest.mark.slow
def test_kfold_training_evaluation_and_ensemble_submission(tiny_input, tmp_path):
    results = tmp_path / "results"
    train = run_script(
        ROOT / "train.py",
        "--input",
        tiny_input,
        "--results",
        results,
        "--logs",
        tmp_path / "logs",
        "--folds",
        3,
        "--epochs",
        1,
        *TINY,
        "--conflicts",
        "drop",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads((results / "ensemble.json").read_text()) == {"format": 2, "models": ["fold0", "fold1", "fold2"]}
    oof = np.load(results / "oof.npz")
    views = crossval.is_view(oof)
    frames = ~views
    assert sorted(oof["index"][frames].tolist()) == list(range(48))  # every image predicted once, out of fold
    assert views.any() and set(oof["index"][views]) <= set(range(48))  # and some by a crop view, in their fold
    fold_of = dict(zip(oof["index"][frames], oof["fold"][frames]))
    assert all(fold_of[i] == k for i, k in zip(oof["index"][views], oof["fold"][views]))
    val_ids = [json.loads((results / f"fold{k}" / "settings.json").read_text())["val_ids"] for k in range(3)]
    fold_subjects = [{i.split("_")[0] for i in ids} for ids in val_ids]
    assert all(len(s) == 1 for s in fold_subjects) and set.union(*fold_subjects) == {"1", "2", "3"}
    assert set(json.loads((results / "postprocess.json").read_text())["structures"]["nerve"]) == set(
        postprocess.DEFAULT
    )
    assert "all folds" in train.stdout and "--conflicts drop: 0 frames" in train.stdout

    ev = run_script(ROOT / "evaluate.py", "--data", tiny_input, "--results", results)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "as train.py wrote it" in ev.stdout  # the tuning train.py ran is read, not computed again
    table = ev.stdout.splitlines()[:6]  # the header, three folds, all folds, crop views
    assert all(line in train.stdout.splitlines() for line in table)  # the very table train.py printed
    report = json.loads((results / "evaluation.json").read_text(), parse_constant=strict_json_only)
    # 26 of the 48 frames lack a nerve, and so do the crop views that leave it out: the gate is tuned on them all
    # where they are 30 or more, and both scripts say when it is not
    absent = sum(r["images"] - r["with_structure"] for k, r in report["metrics"]["nerve"].items() if "fold " not in k)
    default_gate = absent < postprocess.MIN_EMPTY_TO_GATE
    assert ("the gate of nerve keeps its default" in train.stdout) == default_gate
    assert ("the gate of nerve keeps its default" in ev.stdout) == default_gate
    assert set(report["metrics"]["nerve"]) == {"fold 0", "fold 1", "fold 2", "all folds", "crop views"}
    assert report["tta"] == "hflip"
    assert_picture(results / "worst_cases.png", 300, 700)
    # every frame has its fold model's out-of-distribution score, and the report counts those over the threshold
    assert np.isfinite(oof["ood"]).all() and np.isfinite(oof["ood_flip"]).all()
    flagged = report["out_of_distribution"]
    assert flagged["frames"] == 48 and 0 <= flagged["flagged"] <= 48 and "out-of-distribution threshold" in ev.stdout
    assert flagged["flagged"] == np.count_nonzero(((oof["ood"] + oof["ood_flip"]) / 2 > 1)[frames])
    assert report["metrics"]["nerve"]["crop views"]["images"] == np.count_nonzero(views)
    calibration = json.loads((results / "calibration.json").read_text())
    assert set(calibration["nerve"]) == {"temperature", "ece_before", "ece_after"}
    assert "calibrated at temperature" in train.stdout and "expected calibration error" in train.stdout
    assert_picture(results / "reliability.png", 200, 200)
    for k in range(3):
        settings = json.loads((results / f"fold{k}" / "settings.json").read_text())
        assert settings["presence_temperature"] == [calibration["nerve"]["temperature"]]
        assert settings["ood"]["threshold_frames"] == len(val_ids[k])

    labelled = run_main("evaluate", "--input", tiny_input, "--results", results, "--tta", "none")
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    report = json.loads((results / "evaluation.json").read_text())
    assert report["metrics"]["nerve"][tiny_input.name]["images"] == 48 and report["tta"] == "none"
    # other views than the run's, or a report of another folder in evaluation.json: computed again from oof.npz
    again = run_main("evaluate", "--arrays", tiny_input, "--results", results, "--tta", "none")
    assert again.returncode == 0 and "as train.py wrote it" not in again.stdout, again.stderr[-3000:]
    report = json.loads((results / "evaluation.json").read_text())
    assert (report["evaluated"], report["tta"]) == ("cross-validated", "none")
    assert "fold 2" in report["metrics"]["nerve"]

    sub = run_main("submission", "--input", tiny_input, "--results", results)
    assert sub.returncode == 0, sub.stderr[-3000:]
    assert "3 model(s)" in sub.stdout

    # predict.py averages the three fold models and the mirror view; --fast is the first model alone
    ensemble, fast = Predictor(results), Predictor(results, fast=True)
    assert (len(ensemble.nets), ensemble.tta, len(fast.nets), fast.tta) == (3, "hflip", 1, "none")
    images = list(np.load(tiny_input / "test_images.npy")[:2])
    x = np.stack([deploy.resize(image, ensemble.size) for image in images])
    each = [inference.predict([net], x, "hflip")[0] for net in ensemble.nets]
    np.testing.assert_allclose(ensemble.probabilities(images)[0], np.mean(each, axis=0), atol=1e-5)
    np.testing.assert_allclose(fast.probabilities(images)[0], inference.predict(fast.nets, x, "none")[0], atol=1e-5)
    assert not np.allclose(each[0], each[1], atol=1e-3)  # the folds' models differ: the average is not vacuous
    with pytest.raises(common.UserError, match="--runtime onnx runs the views exported with it: drop --fast"):
        Predictor(results, fast=True, runtime="onnx")
    # and so does the ONNX export of the run: the three models and their mirror views in one artefact
    export.export(results, "onnx", results / "export" / "onnx")
    exported = Predictor(results, runtime="onnx")
    assert json.loads((results / "export" / "onnx" / "deploy.json").read_text())["models"] == 3
    np.testing.assert_allclose(exported.probabilities(images)[0], ensemble.probabilities(images)[0], atol=1e-4)

    # --resume on a run whose folds all finished skips their training and redoes only what follows it
    run = json.loads((results / "run.json").read_text())
    (results / "run.json").write_text(json.dumps({**run, "complete": False}))
    resumed = run_main("train", "--results", results, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("already trained") == 3 and "Epoch" not in resumed.stdout


def strict_json_only(constant):
    raise AssertionError(f"{constant} in a JSON file: strict readers reject it")


def test_non_finite_numbers_become_null_for_json():
    nan, inf = float("nan"), float("inf")
    assert crossval.finite({"auc": nan, "rows": [inf, 0.5, (1, -inf)], "name": "fold 0"}) == {
        "auc": None,
        "rows": [None, 0.5, [1, None]],
        "name": "fold 0",
    }


def test_the_report_counts_the_frames_the_out_of_distribution_score_flags():
    oof, truth = out_of_fold(np.arange(4))
    report = crossval.cross_validate(oof, truth, ["nerve"])
    assert report["ood"] == {"frames": 4, "flagged": 1, "threshold": 1.0}  # 1.5 is over; nan (no score) is not
    assert crossval.flagged_line(report).startswith("1 of 4 frames (25.0%)")
    without = {**oof, "ood": np.full(4, np.nan), "ood_flip": np.full(4, np.nan)}  # models of an earlier release
    report = crossval.cross_validate(without, truth, ["nerve"])
    assert report["ood"] is None and crossval.flagged_line(report) is None


def test_a_fixed_spec_is_scored_without_gate_or_tuning():
    oof, truth = out_of_fold(np.arange(4))
    report = crossval.cross_validate(oof, truth, ["nerve"], "none", postprocess.NO_GATE, tuned=False)
    plain = postprocess.NO_GATE
    assert report["postprocess"]["nerve"] == plain
    assert all(s == plain for s in report["fold_postprocess"]["nerve"].values())
    assert report["rows"]["nerve"]["all folds"]["false_positive_pixels"] > 0  # the false detections stay
    assert report["default_gate"] == []  # nothing was tuned


def test_out_of_fold_predictions_of_the_previous_release_load_without_a_score(tmp_path):
    oof, _ = out_of_fold(np.arange(4))
    previous = {key: value for key, value in oof.items() if not key.startswith("ood")}
    np.savez(tmp_path / "oof.npz", **previous, ids=np.array(["1_1", "1_2", "1_3", "1_4"]))
    loaded = crossval.load_oof(tmp_path / "oof.npz")
    assert np.isnan(loaded["ood"]).all() and np.isnan(loaded["ood_flip"]).all() and len(loaded["ood"]) == 4


def read_cases(results):
    with open(results / "cases.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_new_labelled_folder_gets_cases_intervals_and_a_report_with_mm_given_three_ways(trained, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(trained[0], results)
    # the tiny model's probabilities spread over [0.3, 0.9]: its largest blob over 0.7 is a mask of some shape
    postprocess.save(results, {"nerve": {**postprocess.NO_GATE, "pixel_threshold": 0.7, "keep_largest": True}})
    folder = tmp_path / "new"  # two synthetic subjects that training never saw
    made = run_main("data", "--synthetic", "--dataset", folder, "--arrays", tmp_path / "plain", "--subjects", 2,
                    "--frames", 10, "--test-subjects", 1, "--seed", 7)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    ids = [p.stem for p in sorted((folder / "train").glob("*.tif")) if not p.stem.endswith("_mask")]
    (tmp_path / "groups.csv").write_text("case,group,spacing\n" + "".join(f"{i},{i.split('_')[0]},0.1\n" for i in ids))
    with_spacing = run_main("data", "--dataset", folder, "--arrays", tmp_path / "mm", "--spacing", "0.1")
    assert with_spacing.returncode == 0, with_spacing.stderr[-2000:]
    tables = {}
    for way, flags in {
        "--spacing": ["--labelled", folder, "--spacing", "0.1"],
        "groups CSV": ["--labelled", folder, "--groups", tmp_path / "groups.csv"],
        "data.py's arrays": ["--labelled", tmp_path / "mm"],
    }.items():
        ev = run_main("evaluate", "--results", results, *flags)
        assert ev.returncode == 0, ev.stderr[-3000:]
        tables[way] = read_cases(results)
    rows = tables["--spacing"]
    assert len(rows) == len(ids) == 20 and {r["group"] for r in rows} == {"1", "2"}
    assert all(table == rows for table in tables.values())  # the same mm however the spacing was given
    report = json.loads((results / "evaluation.json").read_text())
    figures = report["summary"]["nerve"]["figures"]
    assert {"hd95_mm", "assd_mm", "nsd_2mm", "sensitivity", "specificity"} <= set(figures)
    # the per-case Dice averages to the table's figure: the existing scores are unchanged
    dice = [float(r["dice"]) for r in rows if r["truth_present"] == "True"]
    (scores,) = report["metrics"]["nerve"].values()
    assert np.mean(dice) == pytest.approx(scores["dice_nonempty"], abs=1e-6)
    assert figures["dice_nonempty"]["low"] <= figures["dice_nonempty"]["value"] <= figures["dice_nonempty"]["high"]
    page = (results / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "95% interval" in page and "hd95_mm" in page
    assert "in mm" in page and "<script" not in page  # self-contained

    # HD95 and NSD recomputed by other code from predict.py's masks (predicted one image at a time, where
    # evaluate.py predicts batches: a few pixels at the threshold can differ by rounding)
    binary = pytest.importorskip("medpy.metric.binary", reason="medpy is in requirements-dev.txt")
    images = tmp_path / "images"
    images.mkdir()
    for i in ids:
        shutil.copy(folder / "train" / f"{i}.tif", images / f"{i}.tif")
    predicted = run_main("predict", images, "--results", results, "--output", tmp_path / "out")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    scored = 0
    for row in rows:
        truth = cv2.imread(str(folder / "train" / f"{row['id']}_mask.tif"), cv2.IMREAD_GRAYSCALE) > 0
        mask = cv2.imread(str(tmp_path / "out" / "images" / f"{row['id']}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
        assert (row["shown"] == "True") == mask.any()
        if truth.any() and mask.any():
            hd95, _, nsd = brute_force_boundary(truth, mask, (0.1, 0.1), 2.0)
            assert hd95 == pytest.approx(binary.hd95(mask, truth, 0.1), rel=1e-9)
            assert float(row["hd95_mm"]) == pytest.approx(hd95, rel=0.02)
            assert float(row["nsd_2mm"]) == pytest.approx(nsd, abs=0.02)
            scored += 1
    assert scored >= 3  # not vacuous: several images with both masks
