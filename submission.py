"""Predict the test images with the best model and write results/submission.csv for Kaggle.

    python submission.py                          # presence threshold 0.5
    python submission.py --presence-threshold 0.7

Probabilities are resized back to 580x420 before thresholding; a mask is emptied when the model's
`present` output is under the presence threshold. The CSV is checked by decoding it back.
"""
import argparse
import csv
import hashlib
import os
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; before keras loads it
import keras  # noqa: E402

import augment
import model  # noqa: F401  registers the custom loss and metric for loading
from utils import (IMAGE_HEIGHT, IMAGE_WIDTH, INPUT_DIR, MODEL_FILE, RESULTS_DIR, SETTINGS_FILE, UserError,
                   atomic_path, gate_masks, load_arrays, read_json, rle_decode, rle_encode, run_cli)

PRESENCE_THRESHOLD = 0.5
PIXEL_THRESHOLD = 0.5
CHUNK = 256  # images resized, predicted and encoded together: bounds memory at full size


def load_model(results=RESULTS_DIR):
    """The best model train.py saved, checked against its settings."""
    path = Path(results) / MODEL_FILE
    if not path.exists():
        raise UserError(f"{path} not found: run `python train.py` first")
    try:
        net = keras.saving.load_model(path, compile=False)
    except Exception as e:  # a truncated or foreign file fails in many ways inside the loader
        raise UserError(f"cannot load {path} ({type(e).__name__}: {e}); retrain with `python train.py`") from None
    return net


def check_model_size(net, settings):
    size = tuple(settings["size"])
    if tuple(net.input_shape[1:3]) != size:
        raise UserError(f"the model takes {net.input_shape[1]}x{net.input_shape[2]} images but "
                        f"{SETTINGS_FILE} says {size[0]}x{size[1]}: results/ mixes two runs; retrain")
    return size


def predict_masks(net, settings, images, presence_threshold=PRESENCE_THRESHOLD,
                  pixel_threshold=PIXEL_THRESHOLD, batch_size=32):
    """Yield (full-size 0/1 masks, presence probabilities) for uint8 images (n, 420, 580), chunk by chunk."""
    size = check_model_size(net, settings)
    for start in range(0, len(images), CHUNK):
        small = augment.resize_images(images[start:start + CHUNK], size)
        out = net.predict(small[..., None].astype(np.float32), batch_size=batch_size, verbose=0)
        probs = np.stack([cv2.resize(p, (IMAGE_WIDTH, IMAGE_HEIGHT), interpolation=cv2.INTER_LINEAR)
                          for p in out["mask"][..., 0]])
        present = out["present"].reshape(-1)
        yield gate_masks(probs, present, presence_threshold, pixel_threshold), present


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
    ap.add_argument("--presence-threshold", type=float, default=PRESENCE_THRESHOLD,
                    help=f"empty a mask when `present` is below this (default: {PRESENCE_THRESHOLD})")
    ap.add_argument("--pixel-threshold", type=float, default=PIXEL_THRESHOLD,
                    help=f"pixel probability threshold at full size (default: {PIXEL_THRESHOLD})")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--input", type=Path, default=INPUT_DIR)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--output", type=Path, default=None, help="CSV path (default: results/submission.csv)")
    args = ap.parse_args(argv)
    if not (0 <= args.presence_threshold <= 1 and 0 < args.pixel_threshold < 1):
        raise UserError("--presence-threshold must be in [0, 1] and --pixel-threshold in (0, 1)")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    output = args.output or args.results / "submission.csv"

    settings = read_json(args.results / SETTINGS_FILE)
    net = load_model(args.results)
    arrays = load_arrays(args.input, ("test_images", "test_ids"))
    images, ids = arrays["test_images"], arrays["test_ids"].tolist()
    pixels, digests, n_nerve = [], [], 0
    with tqdm(total=len(ids), desc="predicting", unit="img", leave=False) as bar:
        for masks, _ in predict_masks(net, settings, images, args.presence_threshold, args.pixel_threshold,
                                      args.batch_size):
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
