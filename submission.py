"""Predict the test images with the best model and write results/submission.csv for Kaggle.

    python submission.py                          # the post-processing train.py tuned
    python submission.py --presence-threshold 0.7  # with one knob changed

Averages every fold model train.py left in results/ and, by default, each image with its mirror image.
Probabilities are resized back to 580x420 before thresholding; post-processing (presence threshold,
pixel threshold, minimum area, largest component) comes from results/postprocess.json, which train.py
tuned on out-of-fold predictions. The CSV is checked by decoding it back.
"""

import csv
import hashlib
import time
from pathlib import Path

from nerve.common import (
    SUBMISSION_FILE,
    UserError,
    add_flags,
    arg_parser,
    atomic_path,
    exclusive,
    output_folder,
    run_cli,
)

import numpy as np
from tqdm import tqdm

from nerve import deploy, inference, model, postprocess, store
from nerve.rle import rle_decode, rle_encode


def mask_digest(mask):
    return hashlib.sha1(np.packbits(np.asarray(mask, bool))).hexdigest()


def write_submission(path, ids, pixels):
    """Write the Kaggle CSV (header img,pixels) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["img", "pixels"])
            writer.writerows(zip(ids, pixels))


def verify_submission(path, ids, digests, shapes):
    """Decode the written CSV and check every row against the masks it was made from."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows[0] != ["img", "pixels"] or [r[0] for r in rows[1:]] != [str(i) for i in ids]:
        raise RuntimeError(f"{path}: header or ids differ from the test set")
    for (img, pixels), digest, shape in zip(rows[1:], digests, shapes):
        if mask_digest(rle_decode(pixels, tuple(shape))) != digest:
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
    ap = arg_parser(__doc__)
    tuned = "unset: results/postprocess.json's"
    ap.add_argument("--presence-threshold", type=float, help=f"empty a mask when `present` is below this; {tuned}")
    ap.add_argument("--pixel-threshold", type=float, help=f"pixel probability threshold at full size; {tuned}")
    ap.add_argument(
        "--structure",
        default=None,
        help="the structure whose masks are written; unset: the nerve, or the first the model predicts",
    )
    add_flags(ap, "tta", "precision", "batch-size", "arrays", "results")
    ap.add_argument("--output", type=Path, help=f"CSV path; unset: results/{SUBMISSION_FILE}")
    args = ap.parse_args(argv)
    if args.presence_threshold is not None and not 0 <= args.presence_threshold <= 1:
        raise UserError("--presence-threshold must be in [0, 1]")
    if args.pixel_threshold is not None and not 0 < args.pixel_threshold < 1:
        raise UserError("--pixel-threshold must be in (0, 1)")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    output = args.output or args.results / SUBMISSION_FILE

    output_folder(output.parent, "--output")
    with exclusive(args.results):
        write(args, output)


def write(args, output):
    """Predict the test images and write the checked CSV (results/ held by this process)."""
    model.set_precision(args.precision)
    nets, size, settings = inference.load_models(args.results)
    names = settings["structures"]
    name = args.structure or ("nerve" if "nerve" in names else names[0])
    if name not in names:
        raise UserError(f"--structure {name}: the models in {args.results}/ predict {', '.join(names)}")
    k = names.index(name)
    tta = args.tta or settings["tta"]
    knobs = {"presence_threshold": args.presence_threshold, "pixel_threshold": args.pixel_threshold}
    spec = {**postprocess.load(args.results, names)[k], **{key: v for key, v in knobs.items() if v is not None}}
    arrays = store.load_arrays(args.arrays, ("test_images", "test_ids", "test_sizes"))
    images, ids, sizes = store.frames(arrays, "test_images"), arrays["test_ids"].tolist(), arrays["test_sizes"]
    print(f"{len(nets)} model(s) at {size[0]}x{size[1]}, tta {tta}, {name}: post-processing {spec}")
    pixels, digests, n_found = [], [], 0
    chunks = inference.predict_chunks(nets, size, images, tta, args.batch_size, at_full_size=True)
    with tqdm(total=len(ids), desc="predicting", unit="img", leave=False) as bar:
        for probs, present, _ in chunks:  # the competition's own frames: no out-of-distribution gate
            for prob, p in zip(probs, present):  # one at a time: sizes may differ
                mask = deploy.apply(prob[None, ..., k], p[None, k], spec)[0]
                pixels.append(rle_encode(mask))
                digests.append(mask_digest(mask))
                n_found += bool(mask.any())
            bar.update(len(probs))

    previous = keep_previous(output)
    write_submission(output, ids, pixels)
    verify_submission(output, ids, digests, sizes)
    if previous:
        print(f"kept the earlier submission as {previous}")
    print(f"wrote {output}: {len(ids)} test images, {n_found} with a {name}; checked by decoding it back")


if __name__ == "__main__":
    run_cli(main)
