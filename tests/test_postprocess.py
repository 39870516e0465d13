import json

import numpy as np
import pytest

from conftest import TWO_FOLD_SPECS, stats_case, two_fold_case
from nerve import common, deploy, metrics, postprocess
from nerve.deploy import full_size
from nerve.metrics import dice_from_counts, pixel_counts


def test_the_gate_is_one_rule_for_masks_and_for_tuning():
    # the counts tuning scores a spec by are those of the masks apply() makes with it, gate included
    rng = np.random.default_rng(0)
    probs = rng.random((6, 42, 58)).astype(np.float32) ** 4
    truth = (rng.random((6, 420, 580)) < 0.05).astype(np.uint8)
    present = rng.random(6)
    stats = postprocess.mask_stats(probs, truth)
    for spec in (
        {**postprocess.DEFAULT, "presence_threshold": 0.4, "min_area_fraction": 0.033, "keep_largest": True},
        {**postprocess.DEFAULT, "pixel_threshold": 0.3},
        postprocess.NO_GATE,
    ):
        masks = deploy.apply(np.stack([full_size(p, (420, 580)) for p in probs]), present, spec)
        counts = postprocess.counts_under(stats, present, spec, np.arange(6))
        for got, want in zip(counts, pixel_counts(truth, masks)):
            np.testing.assert_array_equal(got, want)


def test_tuning_learns_to_gate_false_detections():
    probs, truth, present = stats_case(empty=postprocess.MIN_EMPTY_TO_GATE)
    everything = np.arange(len(probs))
    stats = postprocess.mask_stats(probs, truth)
    spec = postprocess.tune(stats, present, everything)
    tp, fp, fn = postprocess.counts_under(stats, present, spec, everything)
    assert fp[2:].sum() == 0 and dice_from_counts(tp, fp, fn).mean() > 0.95
    ungated = postprocess.counts_under(stats, present, postprocess.NO_GATE, everything)
    assert dice_from_counts(*ungated).mean() < 0.2


def test_too_few_images_without_the_structure_leave_the_gate_at_its_default():
    probs, truth, present = stats_case(empty=postprocess.MIN_EMPTY_TO_GATE)
    stats = postprocess.mask_stats(probs, truth)
    fewer = np.arange(1 + postprocess.MIN_EMPTY_TO_GATE)  # both nerve images and one empty image too few
    assert postprocess.can_gate(stats, np.arange(len(probs))) and not postprocess.can_gate(stats, fewer)
    for prior in (postprocess.DEFAULT, postprocess.NO_GATE):
        spec = postprocess.tune(stats, present, fewer, prior)
        gate = (spec["presence_threshold"], spec["min_area_fraction"])
        assert gate == (prior["presence_threshold"], prior["min_area_fraction"])


def test_cross_fitting_tunes_each_fold_on_the_others_only_or_keeps_a_fixed_spec():
    probs, truth, present, fold = two_fold_case()
    stats = postprocess.mask_stats(probs, truth)
    specs, final = postprocess.cross_fit(stats, present, fold)
    assert specs == dict(enumerate(TWO_FOLD_SPECS))  # tuned on the held-out fold itself, each would be the other's
    assert final == TWO_FOLD_SPECS[1]  # on both folds: above the higher false presence
    specs, final = postprocess.cross_fit(stats, present, fold, postprocess.NO_GATE, tuned=False)
    assert final == postprocess.NO_GATE and all(s == postprocess.NO_GATE for s in specs.values())
    specs, _ = postprocess.cross_fit(stats, present, np.zeros(len(fold)), postprocess.NO_GATE)
    assert specs == {0: postprocess.NO_GATE}  # one fold: nothing to tune it on


def test_a_run_without_a_presence_head_is_never_gated():
    assert postprocess.untuned(0.0) == postprocess.NO_GATE and postprocess.untuned(0.1) == postprocess.DEFAULT
    assert postprocess.for_run({"postprocess": "tuned", "presence_weight": 0.0}) == (postprocess.NO_GATE, True)
    assert postprocess.for_run({"postprocess": "fixed", "presence_weight": 0.0}) == (postprocess.NO_GATE, False)


def test_the_tuned_specs_are_saved_and_loaded_per_structure(tmp_path):
    spec = {**postprocess.DEFAULT, "min_area_fraction": 0.006}
    postprocess.save(tmp_path, {"nerve": spec, "vessel": postprocess.NO_GATE})
    stored = json.loads((tmp_path / "postprocess.json").read_text())
    assert stored == {"format": 2, "structures": {"nerve": spec, "vessel": postprocess.NO_GATE}}
    assert postprocess.load(tmp_path, ["vessel", "nerve"]) == [postprocess.NO_GATE, spec]
    assert postprocess.load(tmp_path / "nothing", ["nerve"]) == [postprocess.DEFAULT]
    with pytest.raises(common.UserError, match="no spec for artery"):
        postprocess.load(tmp_path, ["artery"])


def test_release_2s_single_spec_is_the_first_structures(tmp_path):
    (tmp_path / "postprocess.json").write_text(json.dumps({"format": 2, **postprocess.NO_GATE}))
    assert postprocess.load(tmp_path, ["nerve"]) == [postprocess.NO_GATE]


def test_an_earlier_releases_minimum_area_in_pixels_of_a_kaggle_frame_becomes_a_share_of_the_image(tmp_path):
    old = {"presence_threshold": 0.25, "pixel_threshold": 0.4, "min_area": 3000, "keep_largest": True}
    (tmp_path / "postprocess.json").write_text(json.dumps({"format": 2, "structures": {"nerve": old}}))
    [spec] = postprocess.load(tmp_path, ["nerve"])
    assert spec == {
        "presence_threshold": 0.25,
        "pixel_threshold": 0.4,
        "min_area_fraction": 3000 / (420 * 580),
        "keep_largest": True,
    }


def test_a_temperature_calibrates_an_overconfident_presence_and_is_fitted_out_of_fold():
    rng = np.random.default_rng(0)
    honest = rng.uniform(0.02, 0.98, (2000, 1))
    truth = rng.random(honest.shape) < honest  # a presence of p is right p of the time
    overconfident = postprocess.calibrate(honest, [0.25])  # logits x4
    fold = np.arange(2000) % 4
    temperature, held_out = postprocess.temperatures([overconfident, overconfident], truth, fold)
    assert 2.0 < temperature[0] < 8.0
    ece = metrics.expected_calibration_error
    assert ece(held_out[:, 0], truth[:, 0]) < ece(overconfident[:, 0], truth[:, 0]) / 2
    np.testing.assert_allclose(postprocess.calibrate(postprocess.calibrate(honest, [2.0]), [0.5]), honest, atol=1e-6)
    assert postprocess.fit_temperature(overconfident[None, :, 0], np.ones(2000, bool)) == 1.0  # nothing to learn
