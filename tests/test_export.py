"""Each export format, run by its own runtime, gives the Keras ensemble's probabilities and, through deploy.py,
predict.py's masks."""

import json

import numpy as np
import pytest

import export
from conftest import ROOT, run_script
from nerve import common, deploy, inference
from nerve.predictor import Predictor


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["onnx", "litert", "savedmodel"])
def test_an_exported_model_matches_keras_and_reproduces_predicts_masks(trained, tiny_input, tmp_path, kind):
    results = trained[0]
    result = run_script(ROOT / "export.py", "--format", kind, "--results", results, "--output", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    settings = json.loads((tmp_path / "deploy.json").read_text())
    assert (tmp_path / "deploy.py").read_text() == (ROOT / "nerve" / "deploy.py").read_text()
    # the model card beside the artefact, its fields in deploy.json: the run's figures and what the artefact is
    card = settings["model_card"]
    assert card["cross_validated"] == json.loads((results / "evaluation.json").read_text())["summary"]
    assert kind in card["artefact"] and "## The gate" in (tmp_path / "MODEL_CARD.md").read_text()
    images = np.load(tiny_input / "train_images.npy", mmap_mode="r")[:3]
    x = np.concatenate([deploy.model_input(image, settings["size"]) for image in images])
    mask, present, ood = inference.runner(kind, tmp_path / settings["artefact"])(x)

    predictor = Predictor(results)
    probs, expected_present, expected_ood = predictor.probabilities(list(images))
    np.testing.assert_allclose(mask, probs, atol=1e-4)
    np.testing.assert_allclose(present, expected_present, atol=1e-4)
    np.testing.assert_allclose(ood, expected_ood, rtol=1e-4)
    assert np.isfinite(ood).all() and settings["ood_threshold"] == deploy.OOD_THRESHOLD
    if kind == "onnx":  # OpenVINO runs the same file (predict.py --runtime openvino), in float32
        for got, want in zip(inference.runner("openvino", tmp_path / settings["artefact"])(x), (mask, present, ood)):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # the same flags outside the project's code: a threshold halfway between the two lowest scores flags the same
    # images (one equal to a score would flag by rounding)
    predictor.ood_threshold = float(np.sort(expected_ood)[:2].mean())
    drawn = 0
    for image, m, p, o, q, e, f in zip(images, mask, present, ood, probs, expected_present, expected_ood):
        masks, kept, unknown, full = predictor.masks(np.asarray(image), q, e, f)
        shown = deploy.label_map(masks[None] * kept.astype(np.uint8), full[None])[0]
        exported = deploy.labels(m, p, settings["postprocess"], image.shape, o, predictor.ood_threshold)
        np.testing.assert_array_equal(exported, shown)
        assert unknown == deploy.unknown(o, predictor.ood_threshold)
        drawn += bool(shown.any())
    assert drawn, "no image has a mask: the comparison proves nothing"


def test_the_serving_model_averages_the_models_and_the_mirror_view():
    from nerve import model

    rng = np.random.default_rng(0)
    nets = [model.build_model((16, 32, 1), base_filters=4, depth=2) for _ in range(2)]
    nets = [model.with_ood(net, rng.normal(size=28), rng.normal(size=(28, 28)), 3.0) for net in nets]
    x = rng.uniform(0, 255, (2, 16, 32, 1)).astype(np.float32)
    out = inference.Serving(nets, "hflip")(x)
    probs, present, ood = inference.predict(nets, x[..., 0], "hflip")
    np.testing.assert_allclose(np.asarray(out["mask"]), probs, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["present"]), present, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["ood"]), ood, rtol=1e-5)
    assert np.asarray(out["ood"]).shape == (2,)  # rank 1: told from presence by rank where runtimes rename outputs


@pytest.mark.slow
def test_an_artefact_its_runtime_disagrees_with_is_refused_and_nothing_is_kept(trained, tmp_path, monkeypatch):
    real = inference.runner

    def off_by_a_little(kind, path):
        run = real(kind, path)
        return lambda x: tuple(np.asarray(out) + 1e-3 for out in run(x))  # over TOLERANCE, as a broken runtime

    monkeypatch.setattr(inference, "runner", off_by_a_little)
    refused = r"the onnx artefact differs from Keras by 0.001 \(over 0.0001\): not kept"
    with pytest.raises(common.UserError, match=refused):
        export.export(trained[0], "onnx", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no artefact, no deploy.py or deploy.json
