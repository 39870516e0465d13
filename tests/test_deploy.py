import numpy as np

from nerve import deploy

DEFAULT, NO_GATE = deploy.DEFAULT, {**deploy.DEFAULT, "presence_threshold": 0.0}


def test_apply_gates_on_presence_and_area_and_keeps_the_largest_component():
    probs = np.zeros((3, 10, 10), np.float32)
    probs[:, 0:2, 0:2] = 0.9  # 4 pixels
    probs[:, 5:9, 5:9] = 0.6  # 16 pixels
    masks = deploy.apply(probs, [0.2, 0.8, 0.8])
    assert masks[0].sum() == 0 and masks[1].sum() == 20
    assert deploy.apply(probs, [0.8] * 3, {"pixel_threshold": 0.7}).sum(axis=(1, 2)).tolist() == [4] * 3
    assert deploy.apply(probs, [0.8] * 3, {"keep_largest": True})[0, 5:9, 5:9].all()
    assert deploy.apply(probs, [0.8] * 3, {"keep_largest": True}).sum() == 48
    assert deploy.apply(probs, [0.8] * 3, {"min_area_fraction": 0.21}).sum() == 0  # 20 of 100 pixels
    assert deploy.apply(probs, [0.8] * 3, {"min_area_fraction": 0.2}).sum() == 60
    assert deploy.apply(probs, [0.0] * 3, NO_GATE).sum() == 60


def test_each_structure_is_post_processed_with_its_own_spec_and_overlaps_go_to_the_likelier():
    probs = np.zeros((1, 4, 4, 2), np.float32)
    probs[0, :2, :, 0] = 0.9  # structure 1: top half
    probs[0, 1:3, :, 1] = 0.6  # structure 2: the middle rows, overlapping row 1
    masks = deploy.apply_each(probs, [[0.9, 0.9]], [DEFAULT, {**DEFAULT, "min_area_fraction": 9 / 16}])
    assert masks[..., 0].sum() == 8 and masks[..., 1].sum() == 0  # the second is under its minimum area
    both = deploy.apply_each(probs, [[0.9, 0.9]], [DEFAULT] * 2)
    labels = deploy.label_map(both, probs)[0]
    assert labels[:, 0].tolist() == [1, 1, 2, 0]


def test_an_image_goes_to_the_models_size_and_its_labels_come_back_at_its_own():
    image = np.full((50, 70), 200, np.uint8)
    x = deploy.model_input(image, (16, 32))
    assert x.shape == (1, 16, 32, 1) and x.dtype == np.float32 and (x == 200).all()
    probs = np.zeros((16, 32, 2), np.float32)
    probs[:8, :, 0] = 0.9
    labels = deploy.labels(probs, [0.9, 0.1], [DEFAULT, DEFAULT], image.shape)
    assert labels.shape == (50, 70) and set(np.unique(labels)) == {0, 1}  # the second is gated out
    assert (labels[:20] == 1).all() and (labels[30:] == 0).all()


def test_a_scan_the_model_does_not_know_gets_no_mask():
    probs = np.full((16, 32, 1), 0.9, np.float32)
    assert deploy.labels(probs, [0.9], [DEFAULT], (50, 70), ood=0.8).all()
    assert not deploy.labels(probs, [0.9], [DEFAULT], (50, 70), ood=1.2).any()
    assert deploy.labels(probs, [0.9], [DEFAULT], (50, 70), ood=1.2, ood_threshold=1.5).all()
    assert deploy.labels(probs, [0.9], [DEFAULT], (50, 70), ood=np.nan).all()  # no score: a model of before
    assert deploy.unknown([0.5, 1.0, 1.01, np.nan]).tolist() == [False, False, True, False]


def test_hysteresis_shows_a_structure_after_n_frames_and_hides_it_after_n():
    kept = [1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1]
    smooth = deploy.Hysteresis(3, 1)
    shown = [bool(smooth.update([k])[0]) for k in kept]
    assert shown == [False, False, False, False, True, True, True, True, True, False, False]
    plain = deploy.Hysteresis(0, 1)
    assert [bool(plain.update([k])[0]) for k in kept] == [bool(k) for k in kept]


def test_one_image_given_at_two_sizes_gets_the_same_gate_decision():
    small = np.zeros((1, 42, 58), np.float32)
    small[0, 10:20, 10:25] = 0.9  # 150 of 2436 pixels: 6.2% of the image
    large = deploy.full_size(small[0], (420, 580))[None]
    for fraction, kept in ((0.05, True), (0.08, False)):
        spec = {**DEFAULT, "min_area_fraction": fraction}
        assert [bool(deploy.apply(p, [0.9], spec).any()) for p in (small, large)] == [kept, kept]


def test_the_largest_component_is_the_first_of_equals_and_an_empty_mask_stays_empty():
    mask = np.zeros((40, 60), np.uint8)
    assert not deploy.largest_component(mask).any()
    mask[30:34, 5:9] = mask[2:6, 40:44] = 1  # equal areas: the first in raster order (the upper one) is kept
    mask[20, 20] = 1
    kept = deploy.largest_component(mask)
    assert kept[2:6, 40:44].all() and kept.sum() == 16
    mask[30:35, 5:9] = 1
    assert deploy.largest_component(mask)[30:35, 5:9].sum() == kept.sum() + 4 == deploy.largest_component(mask).sum()
