"""Train the two-headed U-Net on the arrays data.py wrote.

    python train.py                          # defaults below; best model in results/, logs in logs/
    python train.py --epochs 5 --size 64x80  # a quicker run

The best epoch is chosen on the validation leaderboard score (mean per-image Dice with the presence
gate, 1 when truth and prediction are both empty), not on the loss. Validation holds out whole
subjects, stratified by nerve presence: frames of one subject are near-duplicates.
"""
import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; before keras loads it
import keras  # noqa: E402

import augment
import evaluate
import model as unet
import submission
from utils import (INPUT_DIR, LOGS_DIR, MODEL_FILE, RESULTS_DIR, SETTINGS_FILE, UserError, atomic_path,
                   dice_per_image, load_arrays, postprocess, parse_size, run_cli, write_json)

SPLIT_TRIALS = 500  # random subject subsets tried when picking a validation set of the right size


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", default="96x128", help="network input HxW, each divisible by 2**depth (default: 96x128)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--folds", type=int, default=1,
                    help="K > 1: train K models on subject-grouped folds, keep out-of-fold predictions (default: 1)")
    ap.add_argument("--baseline", action="store_true",
                    help="train the tutorials' way for comparison: batch Dice loss, no presence head or gate")
    ap.add_argument("--split", choices=("subject", "image"), default="subject",
                    help="validation split: whole subjects (default) or plain stratified by image")
    ap.add_argument("--base-filters", type=int, default=32, help="filters at the top level (default: 32, ~8M parameters)")
    ap.add_argument("--depth", type=int, default=4, help="down-sampling steps (default: 4)")
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--dice-weight", type=float, default=1.0, help="weight of the Dice loss on `mask`")
    ap.add_argument("--presence-weight", type=float, default=0.5, help="weight of the BCE loss on `present`")
    ap.add_argument("--flips", default="horizontal", help="comma-separated flips: horizontal, vertical, or none")
    ap.add_argument("--elastic", type=float, default=0.0, help="elastic deformation in pixels (default: off)")
    ap.add_argument("--workers", type=int, default=2, help="augmentation threads (default: 2)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="auto: mixed fp16 on a GPU, bf16 on CPUs with native bf16, else fp32 (default: auto)")
    ap.add_argument("--input", type=Path, default=INPUT_DIR)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--logs", type=Path, default=LOGS_DIR)
    ap.add_argument("--run", default=None, help="TensorBoard run name (default: date and time)")
    args = ap.parse_args(argv)
    args.size = parse_size(args.size)
    args.flips = tuple(f for f in args.flips.split(",") if f and f != "none")
    checks = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.lr > 0, "--lr must be positive"),
        (0 < args.val_fraction < 1, "--val-fraction must be between 0 and 1"),
        (args.folds >= 1, "--folds must be at least 1"),
        (args.base_filters >= 1 and args.depth >= 1, "--base-filters and --depth must be at least 1"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (args.dice_weight >= 0 and args.presence_weight >= 0, "loss weights must not be negative"),
        (set(args.flips) <= {"horizontal", "vertical"}, "--flips takes horizontal, vertical or none"),
        (args.elastic >= 0 and args.workers >= 0, "--elastic and --workers must not be negative"),
        (all(s % 2**args.depth == 0 for s in args.size),
         f"--size {args.size[0]}x{args.size[1]}: both sides must be divisible by 2**depth = {2**args.depth}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return args


def split_by_subject(subjects, present, val_fraction, seed):
    """Boolean validation mask holding out whole subjects, about val_fraction of the images,
    with a nerve rate close to the whole set's."""
    ids = np.unique(subjects)
    if len(ids) < 2:
        raise UserError("only one subject: a subject-grouped split is impossible; use --split image")
    target, rate = val_fraction * len(subjects), present.mean()
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(SPLIT_TRIALS):
        order = rng.permutation(ids)
        counts = np.cumsum([np.count_nonzero(subjects == s) for s in order])
        k = min(int(np.argmin(np.abs(counts - target))) + 1, len(ids) - 1)
        val = np.isin(subjects, order[:k])
        cost = abs(val.sum() - target) / target + abs(present[val].mean() - rate)
        if cost < best_cost:
            best, best_cost = val, cost
    return best


def split_by_image(present, val_fraction, seed):
    """Boolean validation mask: val_fraction of the images with a nerve and of those without."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(present), bool)
    for cls in (False, True):
        idx = rng.permutation(np.flatnonzero(present == cls))
        val[idx[:int(round(val_fraction * len(idx)))]] = True
    return val


def subject_folds(subjects, present, folds, seed):
    """Fold number of each image: whole subjects per fold, balanced in size and nerve rate."""
    ids = np.unique(subjects)
    if len(ids) < folds:
        raise UserError(f"{len(ids)} subjects cannot fill {folds} subject-grouped folds: use fewer --folds")
    sizes = {s: np.count_nonzero(subjects == s) for s in ids}
    positives = {s: np.count_nonzero(present[subjects == s]) for s in ids}
    target, rate = len(subjects) / folds, present.mean()
    n, pos, fold_of = np.zeros(folds), np.zeros(folds), {}
    order = np.random.default_rng(seed).permutation(ids)
    for s in sorted(order, key=lambda s: -sizes[s]):  # largest subjects first, ties in seeded order
        cost = (n + sizes[s]) / target + np.abs((pos + positives[s]) / (n + sizes[s]) - rate)
        k = int(np.argmin(cost))
        fold_of[s], n[k], pos[k] = k, n[k] + sizes[s], pos[k] + positives[s]
    return np.array([fold_of[s] for s in subjects])


def image_folds(present, folds, seed):
    """Fold number of each image, stratified by nerve presence (for --split image)."""
    rng, fold = np.random.default_rng(seed), np.zeros(len(present), int)
    for cls in (False, True):
        idx = rng.permutation(np.flatnonzero(present == cls))
        fold[idx] = np.arange(len(idx)) % folds
    return fold


class LeaderboardCheckpoint(keras.callbacks.Callback):
    """Adds val_leaderboard to the logs each epoch and saves the model whenever it improves."""

    def __init__(self, val_images, val_masks, results, settings, batch_size, gate=True):
        super().__init__()
        self.x, self.masks = val_images[..., None].astype(np.float32), val_masks
        self.results, self.settings, self.batch_size = Path(results), settings, batch_size
        self.spec = None if gate else {"presence_threshold": 0.0}
        self.best = -np.inf

    def on_epoch_end(self, epoch, logs=None):
        out = self.model.predict(self.x, batch_size=self.batch_size, verbose=0)
        masks = postprocess(out["mask"][..., 0], out["present"], self.spec)
        score = float(dice_per_image(self.masks, masks).mean())
        logs["val_leaderboard"] = score
        if score > self.best:
            self.best = score
            self._save(epoch + 1, score)
            print(f"\nepoch {epoch + 1}: val_leaderboard {score:.4f}, best so far: saved to {self.results}/")

    def _save(self, epoch, score):
        logging.getLogger("absl").setLevel(logging.ERROR)  # net.hdf5 is legacy on purpose: users expect it
        for name in (MODEL_FILE, "net.hdf5"):
            with atomic_path(self.results / name) as tmp:
                self.model.save(tmp)
        write_json(self.results / SETTINGS_FILE, {**self.settings, "best_epoch": epoch, "val_leaderboard": score})


def tensorboard_callback(log_dir):
    """Keras' TensorBoard callback writes through TensorFlow; other backends may lack it."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        print("tensorflow is not installed: no TensorBoard logs this run (the CSV log is still written)")
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(log_dir), histogram_freq=1)]


def compile_model(args, mean, std):
    net = unet.build_model((*args.size, 1), args.base_filters, args.depth, args.dropout, mean, std)
    mask_loss = unet.batch_dice_loss if args.baseline else unet.dice_loss
    net.compile(
        optimizer=keras.optimizers.Adam(args.lr),
        loss={"mask": mask_loss, "present": "binary_crossentropy"},
        loss_weights={"mask": args.dice_weight, "present": 0.0 if args.baseline else args.presence_weight},
        metrics={"mask": [unet.dice_coef], "present": [keras.metrics.BinaryAccuracy(name="accuracy")]},
    )
    return net


def train_model(args, images, masks, val, out_dir, log_dir, settings):
    """Train one model on images[~val], choosing its best epoch on images[val]; return the best score."""
    mean, std = float(images[~val].mean()), float(images[~val].std())
    net = compile_model(args, mean, std)
    print(f"model: {net.count_params():,} parameters, input {args.size[0]}x{args.size[1]}, "
          f"backend {keras.backend.backend()}, {keras.mixed_precision.dtype_policy().name}")
    train_batches = augment.AugmentedBatches(images[~val], masks[~val], args.batch_size, args.seed,
                                             flips=args.flips, elastic=args.elastic, workers=args.workers)
    val_batches = augment.AugmentedBatches(images[val], masks[val], args.batch_size, augment=False,
                                           shuffle=False, workers=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = LeaderboardCheckpoint(images[val], masks[val], out_dir, {**settings, "mean": mean, "std": std},
                                       args.batch_size, gate=not args.baseline)
    callbacks = [
        checkpoint,
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.25, patience=4, verbose=1),
        keras.callbacks.CSVLogger(str(out_dir / "training_log.csv")),
        *tensorboard_callback(log_dir),
    ]
    net.fit(train_batches, validation_data=val_batches, epochs=args.epochs, callbacks=callbacks, verbose=2)
    return checkpoint.best


def out_of_fold(out_dir, images):
    """The saved best model's predictions on held-out images, plain and of the mirror image mirrored back."""
    net = submission.load_model(out_dir)
    probs, present = submission.predict_small([net], images, tta=False)
    probs_flip, present_flip = submission.predict_small([net], images[:, :, ::-1], tta=False)
    return {"probs": probs, "present": present, "probs_flip": probs_flip[:, :, ::-1], "present_flip": present_flip}


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    policy = unet.set_precision(args.precision)
    started = time.time()

    arrays = load_arrays(args.input, ("train_images", "train_masks", "train_ids", "train_subjects"))
    present = arrays["train_masks"].reshape(len(arrays["train_masks"]), -1).max(axis=1) > 0
    subjects = arrays["train_subjects"]
    if args.folds > 1:
        fold = (subject_folds(subjects, present, args.folds, args.seed) if args.split == "subject"
                else image_folds(present, args.folds, args.seed))
        splits = [fold == k for k in range(args.folds)]
        dirs = [f"fold{k}" for k in range(args.folds)]
    else:
        splits = [split_by_subject(subjects, present, args.val_fraction, args.seed) if args.split == "subject"
                  else split_by_image(present, args.val_fraction, args.seed)]
        dirs = ["."]
    if any(val.all() or not val.any() for val in splits):
        raise UserError("a validation split is empty or takes everything: change --val-fraction or --folds")

    images = augment.resize_images(arrays["train_images"], args.size)
    masks = augment.resize_masks(arrays["train_masks"], args.size)
    run = args.run or time.strftime("%Y%m%d-%H%M%S")
    settings = {
        "size": list(args.size), "base_filters": args.base_filters, "depth": args.depth, "dropout": args.dropout,
        "seed": args.seed, "split": args.split, "val_fraction": args.val_fraction, "folds": args.folds,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "dice_weight": args.dice_weight,
        "presence_weight": args.presence_weight, "flips": list(args.flips), "elastic": args.elastic,
        "baseline": args.baseline, "backend": keras.backend.backend(), "precision": policy, "run": run,
    }
    oof = {"index": [], "fold": []}
    for k, (val, name) in enumerate(zip(splits, dirs)):
        print(f"{'fold ' + str(k) + ': ' if args.folds > 1 else ''}train: {np.count_nonzero(~val)} images, "
              f"val: {np.count_nonzero(val)} images (subjects {sorted(set(subjects[val].tolist()))}), "
              f"nerve in {present[~val].mean():.0%} / {present[val].mean():.0%}")
        out_dir = args.results / name
        fold_settings = {**settings, "fold": k, "val_ids": arrays["train_ids"][val].tolist()}
        best = train_model(args, images, masks, val, out_dir, args.logs / run / name, fold_settings)
        print(f"best val_leaderboard {best:.4f}; model in {out_dir / MODEL_FILE}")
        for key, value in out_of_fold(out_dir, images[val]).items():
            oof.setdefault(key, []).append(value)
        oof["index"].append(np.flatnonzero(val))
        oof["fold"].append(np.full(np.count_nonzero(val), k))
    oof = {key: np.concatenate(value) for key, value in oof.items()}
    oof["probs"], oof["probs_flip"] = oof["probs"].astype(np.float16), oof["probs_flip"].astype(np.float16)
    oof["ids"] = arrays["train_ids"][oof["index"]]
    with atomic_path(args.results / evaluate.OOF_FILE) as tmp:
        np.savez(tmp, **oof)
    write_json(args.results / submission.ENSEMBLE_FILE, {"models": dirs})

    # the baseline is scored as the tutorials used it: no mirror averaging, no tuned gate
    report = evaluate.cross_validate(oof, arrays["train_masks"][oof["index"]], tta=not args.baseline,
                                     baseline=args.baseline)
    write_json(args.results / submission.POSTPROCESS_FILE, report["postprocess"])
    print(evaluate.table(report["rows"]))
    print(f"post-processing for submission.py (tuned on all out-of-fold predictions): {report['postprocess']}")
    print(f"trained in {(time.time() - started) / 60:.1f} min; TensorBoard: tensorboard --logdir {args.logs}")


if __name__ == "__main__":
    run_cli(main)
