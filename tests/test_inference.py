import numpy as np

from nerve import inference, model, store


class Echo:
    """A stand-in network whose mask is its input, rescaled, and whose presence is the mean of each image's
    left half: the mirror view must come back as the plain view's mask but see the other half."""

    def predict(self, x, batch_size, verbose):
        return self.predict_on_batch(x)

    def predict_on_batch(self, x):
        half = x.shape[2] // 2
        return {"mask": x / 255.0, "present": x[:, :, :half].mean(axis=(1, 2, 3))[:, None] / 255.0}


def test_the_mirror_view_is_flipped_back_and_averaged():
    images = np.zeros((2, 4, 6), np.uint8)
    images[:, :, :2] = 255  # bright on the left
    (plain, present, ood), (mirror, present_mirror, _) = inference.predict_views([Echo()], images, "hflip")
    assert np.isnan(ood).all() and ood.shape == (2,)  # a model without the out-of-distribution output
    np.testing.assert_allclose(mirror, plain)
    np.testing.assert_allclose(plain, images[..., None] / 255.0)
    np.testing.assert_allclose(present, [[2 / 3]] * 2, rtol=1e-6)
    np.testing.assert_array_equal(present_mirror, [[0.0]] * 2)
    probs, averaged, _ = inference.predict([Echo(), Echo()], images, "hflip")
    np.testing.assert_allclose(probs, images[..., None] / 255.0)
    np.testing.assert_allclose(averaged, [[1 / 3]] * 2)
    assert len(inference.predict_views([Echo()], images, "none")) == 1


def test_chunks_come_back_at_the_models_size_or_each_images_own(monkeypatch):
    monkeypatch.setattr(inference, "CHUNK", 2)
    images = np.full((3, 42, 58), 255, np.uint8)
    chunks = list(inference.predict_chunks([Echo()], (8, 16), images, "none"))
    assert [c[0].shape for c in chunks] == [(2, 8, 16, 1), (1, 8, 16, 1)]
    full = list(inference.predict_chunks([Echo()], (8, 16), images, "none", at_full_size=True))
    assert [c[0].shape for c in full] == [(2, 42, 58, 1), (1, 42, 58, 1)]
    np.testing.assert_allclose(np.concatenate([c[0] for c in full]), 1.0)
    canvas = np.full((3, 42, 58), 255, np.uint8)
    frames = store.Frames(canvas, [[20, 30], [42, 58], [9, 9]])  # images of their own sizes, as the arrays keep them
    own = list(inference.predict_chunks([Echo()], (8, 16), frames, "none", at_full_size=True))
    assert [p.shape for c in own for p in c[0]] == [(20, 30, 1), (42, 58, 1), (9, 9, 1)]


def test_network_outputs_pad_for_devices_and_cut_the_padding(monkeypatch):
    net = model.build_model((32, 48, 1), base_filters=4, depth=2)
    x = np.random.default_rng(0).uniform(0, 255, (5, 32, 48, 1)).astype(np.float32)
    plain = inference.network_outputs(net, x, batch_size=4)
    monkeypatch.setattr(inference, "data_parallel_devices", lambda: 4)
    padded = inference.network_outputs(net, x, batch_size=4)
    assert padded["mask"].shape == (5, 32, 48, 1) and padded["present"].shape == (5, 1)
    # 1e-5: the same images in other batches differ in float32 rounding, a wrong cut by far more
    np.testing.assert_allclose(padded["mask"], plain["mask"], atol=1e-5)


def test_a_model_trained_in_another_precision_predicts_the_same_in_this_one():
    import keras

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        trained = model.build_model((32, 48, 1), base_filters=4, depth=2)
        trained = model.with_ood(trained, np.zeros(28), np.eye(28), 2.0)  # 4 + 8 + 16 pooled channels
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    copy = inference.in_current_precision(trained)
    assert copy.get_layer("bottoma_conv").dtype_policy.name == "float32"
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 48, 1)).astype(np.float32)
    expected, got = trained.predict(x, verbose=0), copy.predict(x, verbose=0)
    assert set(got) == {"mask", "present", "ood"}
    for name in got:  # bf16 rounding apart
        np.testing.assert_allclose(got[name], expected[name], atol=0.05, rtol=0.05)


def test_one_batch_and_several_give_the_same_outputs():
    net = model.build_model((16, 32, 1), base_filters=4, depth=2)
    x = np.random.default_rng(0).uniform(0, 255, (5, 16, 32, 1)).astype(np.float32)
    one = inference.network_outputs(net, x, batch_size=8)  # predict_on_batch
    several = inference.network_outputs(net, x, batch_size=2)  # predict, three batches
    assert inference.replicas(net) == 1 and one.keys() == several.keys()
    for name in one:
        np.testing.assert_allclose(one[name], several[name], rtol=1e-5, atol=1e-6)
