import keras
import numpy as np

from nerve import inference, model, ood


def _net():
    keras.utils.set_random_seed(0)
    return model.build_model((32, 48, 1), base_filters=4, depth=2)


def _frames(n, seed, level=120):
    rng = np.random.default_rng(seed)
    frames = rng.normal(level, 30, (n, 32, 48)).clip(0, 255)
    frames[:, 10:20] += 60 * rng.random((n, 1, 1))  # a bright band of varying strength: features that vary
    return frames.clip(0, 255).astype(np.uint8)


def test_the_ood_output_is_the_mahalanobis_distance_over_the_threshold_in_every_view():
    net, rng = _net(), np.random.default_rng(1)
    mean, whitening = rng.normal(size=28), rng.normal(size=(28, 28))
    scored = model.with_ood(net, mean, whitening, 4.0)
    images = _frames(6, 2)
    views = ood.features(net, images)
    assert views.shape == (2, 6, 28)  # the plain and the mirror view; base 4, depth 2: 4 + 8 channels, bottleneck 16
    expected = ood.distances(views, mean, whitening) / 4.0
    np.testing.assert_allclose(inference.predict([scored], images)[2], expected, rtol=1e-4)
    for a, b in zip(inference.predict_views([scored], images)[:2], inference.predict_views([net], images)):
        np.testing.assert_array_equal(a[0], b[0])  # the masks and presence are untouched
        np.testing.assert_array_equal(a[1], b[1])
    again = model.with_ood(scored, mean, whitening, 2.0)  # fitted again: replaced, not stacked
    np.testing.assert_allclose(inference.predict([again], images)[2], 2 * expected, rtol=1e-4)


def test_the_threshold_comes_from_held_out_frames_and_flags_frames_unlike_the_training_ones():
    net = _net()
    train, val = _frames(60, 3), _frames(40, 4)
    fitted, report = ood.fit(net, train, val, np.repeat(np.arange(4), 10))
    val_scores = inference.predict([fitted], val)[2]
    assert np.count_nonzero(val_scores > 1) <= 1  # the 99th percentile of 40 frames
    assert report["threshold_frames"] == 40 and report["train_frames"] == 60 and report["features"] == 28
    assert 0 <= report["held_out_flagged"] <= 0.2
    yy, xx = np.mgrid[0:32, 0:48]
    unlike = np.stack([(yy // 4 + xx // 4) % 2 * 255, xx * 5, (yy // 2) % 2 * 255]).astype(np.uint8)  # not tissue
    assert (inference.predict([fitted], unlike)[2] > 1).all()


def test_the_held_out_estimate_scores_no_frame_its_own_threshold_came_from():
    distance = np.r_[np.ones(50), np.full(50, 5.0)]
    groups = np.r_[np.zeros(50), np.ones(50)]  # group 0 all near, group 1 all far: each half flags all the other
    assert ood.held_out_flagged(distance, groups) == 0.5
    assert ood.threshold(np.arange(101.0), np.zeros(101)) == ood.MARGIN * 99  # one group: the default margin
    assert ood.held_out_flagged(distance, np.zeros(100)) is None  # one group: no honest estimate


def left_out_flagged(distance, groups, m):
    """Frames flagged when each group is held to m x the 99th percentile of the others'."""
    return sum(
        np.count_nonzero(distance[groups == g] > m * np.quantile(distance[groups != g], 0.99)) for g in set(groups)
    )


def test_the_margin_is_the_smallest_that_keeps_a_left_out_subject_under_the_false_alarm_budget():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(5), 60)
    alike = rng.gamma(20, 1, 300)  # five subjects from one distribution
    apart = alike * np.repeat([0.8, 0.9, 1.0, 1.1, 1.4], 60)  # five subjects that differ
    budget = ood.FALSE_ALARMS * 300
    for distance in (alike, apart):
        m = ood.margin(distance, groups)
        assert m in ood.MARGINS and left_out_flagged(distance, groups, m) <= budget
        assert m == ood.MARGINS[0] or left_out_flagged(distance, groups, round(m - 0.05, 2)) > budget  # the smallest
        assert ood.threshold(distance, groups) == m * np.quantile(distance, 0.99)
    assert ood.margin(alike, groups) < ood.margin(apart, groups)
    hopeless = alike * np.repeat([1.0, 1.0, 1.0, 1.0, 10.0], 60)
    assert ood.margin(hopeless, groups) == ood.MARGINS[-1]  # false alarms no candidate avoids: the largest
