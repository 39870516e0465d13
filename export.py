"""Export the trained models for deployment: TensorFlow SavedModel, ONNX or LiteRT (TFLite), or an int8 ONNX model.

    python export.py --format onnx            # results/export/onnx/: model.onnx, deploy.json, deploy.py
    python export.py --format litert --fast   # the first model alone, without the mirror view
    python export.py --format savedmodel
    python export.py --quantize int8 --fast   # results/export/onnx-int8/: for CPUs with int8 dot products

The artefact takes raw 0-255 gray pixels at the models' input size, (n, h, w, 1) float32 (n = 1 for LiteRT),
and returns {mask: (n, h, w, K), present: (n, K), ood: (n,)}: the input normalisation, the fold ensemble, the
mirror view, the presence's calibration and the out-of-distribution score are inside it. Resizing each image
to that size and back, and the post-processing train.py tuned, are deploy.py's (NumPy and OpenCV only),
copied beside the artefact with deploy.json (input size, structures, tuned specs, the out-of-distribution
threshold): an application that calls deploy.labels() gets predict.py's masks, and none for a scan the model
does not know. Each export is checked before it is kept: its own runtime's outputs against Keras' on
CHECK_IMAGES images.

--quantize int8 quantises the ONNX model's convolutions (nerve/quantize.py), calibrated on the run's training
frames, and keeps it only where this CPU has int8 dot-product instructions, its validation Dice is within
quantize.MAX_DICE_LOSS of the float32 model's, its out-of-distribution flag agrees with float32's on all but
quantize.MAX_FLAGS_DIFFER of the validation frames and it runs faster; deploy.json gets the check's figures (the
Dice of each against the truth and between the two, the flags that differ, the latency of each).
"""

import shutil
import tempfile
from pathlib import Path

from nerve.common import (
    DEPLOY_FILE,
    EXPORT_DIR,
    UserError,
    add_flags,
    arg_parser,
    atomic_path,
    output_folder,
    run_cli,
    write_state,
)

import keras
import numpy as np

from nerve import deploy, inference, model, postprocess, quantize
from nerve.report import model_card, write_card

FORMATS = {
    "savedmodel": ("tf_saved_model", "model"),
    "onnx": ("onnx", "model.onnx"),
    "litert": ("litert", "model.tflite"),
}
TOLERANCE = 1e-4  # largest difference of a probability between the artefact's runtime and Keras
CHECK_IMAGES = 4


def export(results, kind, output, fast=False, int8=False):
    """Export results/'s models as `kind` into `output`, with deploy.py, deploy.json and MODEL_CARD.md (its
    fields in deploy.json too); check the artefact against Keras (and, `int8`, quantise it and check that against
    the float32 one) and return what deploy.json says of the checks."""
    model.set_precision("fp32")  # an artefact computes in float32 whatever the models were trained in
    nets, size, settings = inference.load_models(results)
    specs = postprocess.load(results, settings["structures"])
    nets, tta = (nets[:1], "none") if fast else (nets, settings["tta"])
    serving = inference.Serving(nets, tta)
    sample = np.random.default_rng(0).uniform(0, 255, (CHECK_IMAGES, *size, 1)).astype(np.float32)
    expected = serving.predict(sample, verbose=0)
    keras_format, name = FORMATS[kind]
    output_folder(output, "--output")
    with tempfile.TemporaryDirectory(dir=output, prefix=".export-") as work:
        artefact = Path(work) / name
        try:
            signature = [keras.InputSpec(shape=(None, *size, 1), dtype="float32")]
            serving.export(str(artefact), format=keras_format, verbose=False, input_signature=signature)
        except ImportError as e:
            raise UserError(f"--format {kind} needs a package that is not installed ({e}): see README.md") from None
        got = dict(zip(("mask", "present", "ood"), inference.runner(kind, artefact)(sample)))
        difference = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
        if difference > TOLERANCE:
            raise UserError(
                f"the {kind} artefact differs from Keras by {difference:.2g} (over {TOLERANCE:g}): not kept"
            )
        checks = {"max_difference_from_keras": difference}
        if int8:
            checks["int8"] = quantize.int8_artefact(results, artefact, size, specs, settings["structures"])
        final = output / name
        if final.is_dir():
            shutil.rmtree(final)
        artefact.replace(final)
    with atomic_path(output / "deploy.py") as tmp:
        shutil.copyfile(Path(deploy.__file__), tmp)
    precision = "int8" if int8 else "float32"
    card = {**model_card(results), "artefact": f"{name} ({kind}, {precision}): {len(nets)} model(s), views {tta}"}
    write_card(output, card)
    write_state(
        output / DEPLOY_FILE,
        {
            "artefact": name,
            "runtime": kind,
            "size": list(size),
            "structures": settings["structures"],
            "postprocess": specs,
            "models": len(nets),
            "tta": tta,
            "ood_threshold": deploy.OOD_THRESHOLD,
            "precision": precision,
            "input": "raw gray pixels 0-255 as float32, (n, height, width, 1); litert: n = 1",
            **checks,
            "model_card": card,
        },
    )
    return checks


def main(argv=None):
    ap = arg_parser(__doc__)
    ap.add_argument("--format", choices=tuple(FORMATS), default="onnx", help="the artefact's format")
    ap.add_argument("--quantize", choices=("int8",), help="an int8 ONNX model, calibrated on the run's training frames")
    ap.add_argument("--fast", action="store_true", help="the first model alone, without the mirror view")
    ap.add_argument("--output", type=Path, help=f"unset: results/{EXPORT_DIR}/FORMAT")
    add_flags(ap, "results")
    args = ap.parse_args(argv)
    if args.quantize and args.format != "onnx":
        raise UserError("--quantize int8 writes an ONNX model: drop --format or give --format onnx")
    folder = f"{args.format}-{args.quantize}" if args.quantize else args.format
    output = args.output or args.results / EXPORT_DIR / folder
    checks = export(args.results, args.format, output, args.fast, bool(args.quantize))
    print(
        f"wrote {output / FORMATS[args.format][1]} with {DEPLOY_FILE} and deploy.py beside it; its runtime's "
        f"probabilities are within {checks['max_difference_from_keras']:.1g} of Keras'"
    )
    if args.quantize:
        print(quantize.summary(checks["int8"]))


if __name__ == "__main__":
    run_cli(main)
