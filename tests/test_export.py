"""Each export format, run by its own runtime, gives the Keras ensemble's probabilities and, through deploy.py,
predict.py's masks."""

import json

import numpy as np
import pytest

import deploy
import inference
import predict
from conftest import ROOT, run_script


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["onnx", "litert", "savedmodel"])
def test_an_exported_model_matches_keras_and_reproduces_predicts_masks(trained, tiny_input, tmp_path, kind):
    results = trained[0]
    result = run_script(ROOT / "export.py", "--format", kind, "--results", results, "--output", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    settings = json.loads((tmp_path / "deploy.json").read_text())
    assert (tmp_path / "deploy.py").read_text() == (ROOT / "deploy.py").read_text()
    images = np.load(tiny_input / "train_images.npy", mmap_mode="r")[:3]
    x = np.concatenate([deploy.model_input(image, settings["size"]) for image in images])
    mask, present = inference.runner(kind, tmp_path / settings["artefact"])(x)

    predictor = predict.Predictor(results)
    probs, expected_present = predictor.probabilities(list(images))
    np.testing.assert_allclose(mask, probs, atol=1e-4)
    np.testing.assert_allclose(present, expected_present, atol=1e-4)
    for image, m, p, q, e in zip(images, mask, present, probs, expected_present):
        masks, kept, full = predictor.masks(np.asarray(image), q, e)
        shown = deploy.label_map(masks[None] * kept.astype(np.uint8), full[None])[0]
        np.testing.assert_array_equal(deploy.labels(m, p, settings["postprocess"], image.shape), shown)


def test_the_serving_model_averages_the_models_and_the_mirror_view():
    import model

    nets = [model.build_model((16, 32, 1), base_filters=4, depth=2) for _ in range(2)]
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 32, 1)).astype(np.float32)
    out = inference.Serving(nets, "hflip")(x)
    probs, present = inference.predict(nets, x[..., 0], "hflip")
    np.testing.assert_allclose(np.asarray(out["mask"]), probs, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["present"]), present, atol=1e-6)
