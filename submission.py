"""Predict the test images with the best model and write results/submission.csv for Kaggle.

    python submission.py                          # presence threshold 0.5
    python submission.py --presence-threshold 0.7

Averages every fold model train.py left in results/ and, by default, each image with its mirror image.
Probabilities are resized back to 580x420 before thresholding; post-processing (presence threshold,
pixel threshold, minimum area, largest component) comes from results/postprocess.json, which train.py
tuned on out-of-fold predictions. The CSV is checked by decoding it back.
"""
import argparse
import csv
import hashlib
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; before keras loads it
import keras  # noqa: E402

import augment
import model
from utils import (DEFAULT_POSTPROCESS, INPUT_DIR, MODEL_FILE, RESULTS_DIR, SETTINGS_FILE, UserError, atomic_path,
                   full_size, load_arrays, postprocess, read_json, rle_decode, rle_encode, run_cli)

CHUNK = 64  # images resized, predicted and encoded together: bounds memory at full size (~60 MB)
ENSEMBLE_FILE = "ensemble.json"  # in results/: the model folders to average (train.py --folds writes one per fold)
POSTPROCESS_FILE = "postprocess.json"  # in results/: thresholds chosen on out-of-fold predictions


def model_dirs(results=RESULTS_DIR):
    """The folders whose models are averaged: every fold after `train.py --folds K`, else results/ itself."""
    results = Path(results)
    ensemble = results / ENSEMBLE_FILE
    return [results / d for d in read_json(ensemble)["models"]] if ensemble.exists() else [results]


def load_model(folder):
    """The best model train.py saved in folder."""
    path = Path(folder) / MODEL_FILE
    if not path.exists():
        raise UserError(f"{path} not found: run `python train.py` first")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # a truncated or foreign file fails in many ways inside the loader
        raise UserError(f"cannot load {path} ({type(e).__name__}: {e}); retrain with `python train.py`") from None


def in_current_precision(net, settings):
    """The model itself, or the same weights in a network built under the global dtype policy
    (a saved model keeps the precision it was trained in)."""
    if net.dtype_policy.name == keras.mixed_precision.dtype_policy().name:
        return net
    rebuilt = model.build_model((*settings["size"], 1), settings["base_filters"], settings["depth"],
                                settings["dropout"], settings["mean"], settings["std"])
    rebuilt.set_weights(net.get_weights())
    return rebuilt


def load_models(results=RESULTS_DIR):
    """(models, input size) of every model to average, checked against their settings."""
    nets, sizes = [], set()
    for folder in model_dirs(results):
        settings, net = read_json(folder / SETTINGS_FILE), load_model(folder)
        if tuple(net.input_shape[1:3]) != tuple(settings["size"]):
            raise UserError(f"{folder / MODEL_FILE} takes {net.input_shape[1]}x{net.input_shape[2]} images but its "
                            f"{SETTINGS_FILE} says {settings['size'][0]}x{settings['size'][1]}: retrain")
        nets.append(in_current_precision(net, settings))
        sizes.add(tuple(settings["size"]))
    if len(sizes) > 1:
        raise UserError(f"the models in {results}/ were trained at different sizes {sorted(sizes)}: retrain")
    return nets, sizes.pop()


def load_postprocess(results=RESULTS_DIR, **overrides):
    """The tuned post-processing from results/, defaults where absent, with explicit overrides on top."""
    path = Path(results) / POSTPROCESS_FILE
    spec = {**DEFAULT_POSTPROCESS, **(read_json(path) if path.exists() else {})}
    return {**spec, **{k: v for k, v in overrides.items() if v is not None}}


def predict_small(nets, images, batch_size=32, tta=True):
    """Mean (mask probabilities (n, h, w), presence (n,)) over the models and, with tta, the mirror image."""
    x = np.asarray(images)[..., None].astype(np.float32)
    probs, present, views = 0.0, 0.0, 0
    for net in nets:
        for flip in (False, True) if tta else (False,):
            out = model.predict(net, x[:, :, ::-1] if flip else x, batch_size)
            m = out["mask"][..., 0]
            probs = probs + (m[:, :, ::-1] if flip else m)
            present = present + out["present"].reshape(-1)
            views += 1
    return probs / views, present / views


def predict_chunks(nets, size, images, batch_size=32, tta=True):
    """Yield (probabilities at the models' size, presence) for uint8 images (n, 420, 580), chunk by chunk."""
    for start in range(0, len(images), CHUNK):
        yield predict_small(nets, augment.resize_images(images[start:start + CHUNK], size), batch_size, tta)


def predict_masks(nets, size, images, spec, batch_size=32, tta=True):
    """Yield (full-size 0/1 masks, presence) for uint8 images (n, 420, 580), chunk by chunk."""
    for probs, present in predict_chunks(nets, size, images, batch_size, tta):
        yield postprocess(np.stack([full_size(p) for p in probs]), present, spec), present


def mask_digest(mask):
    return hashlib.sha1(np.packbits(np.asarray(mask, bool))).hexdigest()


def write_submission(path, ids, pixels):
    """Write the Kaggle CSV (header img,pixels) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["img", "pixels"])
            writer.writerows(zip(ids, pixels))


def verify_submission(path, ids, digests):
    """Decode the written CSV and check every row against the masks it was made from."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows[0] != ["img", "pixels"] or [int(r[0]) for r in rows[1:]] != list(ids):
        raise RuntimeError(f"{path}: header or ids differ from the test set")
    for (img, pixels), digest in zip(rows[1:], digests):
        if mask_digest(rle_decode(pixels)) != digest:
            raise RuntimeError(f"{path}: row {img} does not decode to its mask")


def keep_previous(path):
    """Move an earlier submission aside instead of overwriting it; return its new name."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    old = path.with_name(f"{path.stem}-{stamp}{path.suffix}")
    path.rename(old)
    return old


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presence-threshold", type=float, default=None,
                    help="empty a mask when `present` is below this (default: results/postprocess.json, else 0.5)")
    ap.add_argument("--pixel-threshold", type=float, default=None,
                    help="pixel probability threshold at full size (default: results/postprocess.json, else 0.5)")
    ap.add_argument("--tta", choices=("hflip", "none"), default="hflip",
                    help="test-time augmentation: average with the mirrored image (default: hflip)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="inference precision, as in train.py (default: auto)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per prediction step (default: %(default)s)")
    ap.add_argument("--input", type=Path, default=INPUT_DIR, help="the arrays data.py wrote (default: %(default)s)")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="the models train.py wrote (default: %(default)s)")
    ap.add_argument("--output", type=Path, default=None, help="CSV path (default: results/submission.csv)")
    args = ap.parse_args(argv)
    if args.presence_threshold is not None and not 0 <= args.presence_threshold <= 1:
        raise UserError("--presence-threshold must be in [0, 1]")
    if args.pixel_threshold is not None and not 0 < args.pixel_threshold < 1:
        raise UserError("--pixel-threshold must be in (0, 1)")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    output = args.output or args.results / "submission.csv"

    model.set_precision(args.precision)
    nets, size = load_models(args.results)
    spec = load_postprocess(args.results, presence_threshold=args.presence_threshold,
                            pixel_threshold=args.pixel_threshold)
    arrays = load_arrays(args.input, ("test_images", "test_ids"))
    images, ids = arrays["test_images"], arrays["test_ids"].tolist()
    print(f"{len(nets)} model(s) at {size[0]}x{size[1]}, tta {args.tta}, post-processing {spec}")
    pixels, digests, n_nerve = [], [], 0
    with tqdm(total=len(ids), desc="predicting", unit="img", leave=False) as bar:
        for masks, _ in predict_masks(nets, size, images, spec, args.batch_size, args.tta == "hflip"):
            for mask in masks:
                pixels.append(rle_encode(mask))
                digests.append(mask_digest(mask))
            n_nerve += int(np.count_nonzero(masks.any(axis=(1, 2))))
            bar.update(len(masks))

    previous = keep_previous(output)
    write_submission(output, ids, pixels)
    verify_submission(output, ids, digests)
    if previous:
        print(f"kept the earlier submission as {previous}")
    print(f"wrote {output}: {len(ids)} test images, {n_nerve} with a nerve; checked by decoding it back")


if __name__ == "__main__":
    run_cli(main)
