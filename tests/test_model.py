import keras
import numpy as np
import pytest

from nerve import model


@pytest.mark.parametrize("size", [(64, 80), (96, 128)])
def test_outputs_at_two_input_sizes(size):
    net = model.build_model((*size, 1), base_filters=8)
    out = net.predict(np.zeros((2, *size, 1), np.float32), verbose=0)
    assert set(out) == {"mask", "present"}
    assert out["mask"].shape == (2, *size, 1) and out["present"].shape == (2, 1)
    for v in out.values():
        assert v.dtype == np.float32 and np.all((v >= 0) & (v <= 1))


def test_default_parameter_count_is_about_8m():
    net = model.build_model()
    assert net.count_params() == 8_184_610
    assert not any(layer.__class__.__name__ in ("MaxPooling2D", "Dense") for layer in net.layers)


def test_size_not_divisible_by_2_to_the_depth_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        model.build_model((95, 128, 1))


def test_normalisation_is_part_of_the_model():
    net = model.build_model((32, 32, 1), base_filters=4, mean=100.0, std=50.0)
    rescale = net.get_layer("normalise")
    np.testing.assert_allclose(np.asarray(rescale(np.array([[150.0]]))), [[1.0]], rtol=1e-6)


def test_dice_loss_per_image_with_smoothing():
    y = np.zeros((2, 4, 4, 1), np.float32)
    y[1, :2, :2] = 1
    p = np.zeros_like(y)
    loss = np.asarray(model.dice_loss(y, p))
    assert loss[0] == pytest.approx(0.0)  # empty prediction on an empty mask: perfect
    assert loss[1] == pytest.approx(1 - 1 / 5)  # smoothed: (0 + 1) / (4 + 0 + 1)
    assert np.asarray(model.dice_loss(y, y))[1] == pytest.approx(0.0)


def test_dice_bce_loss_adds_each_images_weighted_pixel_cross_entropy():
    y = np.zeros((2, 4, 4, 1), np.float32)
    y[1, :2, :2] = 1
    p = np.full_like(y, 0.25)
    bce = np.array([-np.log(0.75), (12 * -np.log(0.75) + 4 * -np.log(0.25)) / 16])
    for per_image, dice in ((True, model.dice_loss), (False, model.batch_dice_loss)):
        loss = model.DiceBCELoss(per_image, bce_weight=0.5)
        expected = np.asarray(dice(y, p)) + 0.5 * bce
        np.testing.assert_allclose(np.asarray(loss.call(y, p)), expected, rtol=1e-5)
        restored = keras.losses.deserialize(keras.losses.serialize(loss))
        assert (restored.per_image, restored.bce_weight) == (per_image, 0.5)


def test_lovasz_hinge_is_the_jaccard_loss_on_hard_predictions():
    y = np.zeros((2, 4, 4, 1), np.float32)
    y[0, :2, :2] = 1  # 4 nerve pixels
    hit = y.copy()
    hit[0, 0, 0] = 0  # one missed
    hit[0, 3, 2:] = 1  # two false positives: IoU 3 / 6
    p = np.where(hit > 0, 1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))).astype(np.float32)  # logits +-1
    # each wrong pixel's hinge error is 2, so the loss is 2 x (1 - IoU); the empty image predicted empty is 0
    np.testing.assert_allclose(np.asarray(model.lovasz_hinge_loss(y, p)), [2 * (1 - 3 / 6), 0.0], atol=1e-5)


def test_precision_policies_keep_inputs_and_outputs_in_float32():
    try:
        assert model.set_precision("bf16") == "mixed_bfloat16"
        net = model.build_model((32, 32, 1), base_filters=4)
        assert net.get_layer("down0a_conv").compute_dtype == "bfloat16"
        assert net.get_layer("normalise").compute_dtype == net.get_layer("standardise").compute_dtype == "float32"
        out = net.predict(np.full((1, 32, 32, 1), 100, np.float32), verbose=0)
        assert all(v.dtype == np.float32 for v in out.values())
    finally:
        model.set_precision("fp32")
    assert model.set_precision("auto") == ("mixed_bfloat16" if model.cpu_has_bf16() else "float32")
    model.set_precision("fp32")


def test_batch_dice_loss_is_one_dice_over_the_whole_batch_given_to_every_image():
    y = np.zeros((2, 2, 2, 1), np.float32)
    y[0, 0, 0] = y[1, :, 0] = 1  # 3 true pixels in all
    p = np.zeros_like(y)
    p[0, 0, 0] = 0.5
    p[1, 1, 1] = 1.0
    # intersection 0.5, sums 3 and 1.5, smoothing 1: 1 - (2 * 0.5 + 1) / (3 + 1.5 + 1)
    np.testing.assert_allclose(np.asarray(model.batch_dice_loss(y, p)), [1 - 2 / 5.5] * 2, rtol=1e-6)


def test_standardisation_of_a_constant_image_is_zero_not_nan():
    layer = model.PerImageStandardization()
    x = np.concatenate([np.full((1, 4, 4, 1), 77.0), np.arange(16.0).reshape(1, 4, 4, 1)]).astype(np.float32)
    out = np.asarray(layer(x))
    assert np.all(out[0] == 0) and np.isfinite(out).all()
    assert abs(out[1].mean()) < 1e-6 and out[1].std() == pytest.approx(1, rel=1e-5)


def test_a_calibrated_network_divides_each_presence_logit_by_its_temperature(tmp_path):
    net = model.build_model((32, 48, 1), base_filters=4, depth=2, n_structures=2)
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 48, 1)).astype(np.float32)
    raw = net.predict(x, verbose=0)["present"]
    calibrated = model.calibrated(net, [2.0, 0.5])
    logits = np.log(raw / (1 - raw))
    np.testing.assert_allclose(
        calibrated.predict(x, verbose=0)["present"], 1 / (1 + np.exp(-logits / [2.0, 0.5])), 1e-5
    )
    again = model.calibrated(calibrated, [1.0, 1.0])  # calibrated again: replaced, not stacked
    np.testing.assert_allclose(again.predict(x, verbose=0)["present"], raw, rtol=1e-5)
    calibrated.save(tmp_path / "net.keras")  # built-in layers only: plain Keras loads it without the project's code
    loaded = keras.saving.load_model(tmp_path / "net.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0)["present"], calibrated.predict(x, verbose=0)["present"])
