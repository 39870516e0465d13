"""Train the two-headed U-Net on the arrays data.py wrote.

    python train.py                          # defaults below; best model in results/, logs in logs/
    python train.py --epochs 5 --size 64x80  # a quicker run
    python train.py --resume                 # continue an interrupted run from its last completed epoch

The best epoch is chosen on the validation leaderboard score (mean per-image Dice with the presence
gate, 1 when truth and prediction are both empty), not on the loss. Validation holds out whole
subjects, stratified by nerve presence: frames of one subject are near-duplicates.

Every completed epoch is saved for --resume (results/last.keras with the optimizer state, train_state.json),
so a killed run loses at most the epoch it was in; both go once the whole run is complete.
"""
import argparse
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter; before keras loads it
import keras  # noqa: E402

import augment
import duplicates
import evaluate
import model as unet
import submission
from utils import (INPUT_DIR, LOGS_DIR, MODEL_FILE, RESULTS_DIR, SETTINGS_FILE, UserError, atomic_path,
                   dice_per_image, full_size, load_arrays, overlay, parse_size, postprocess, read_json, run_cli,
                   training_curves, write_json)

SPLIT_TRIALS = 500  # random subject subsets tried when picking a validation set of the right size
RUN_FILE = "run.json"            # in results/: the run's flags and whether it finished, for --resume
LAST_FILE = "last.keras"         # in each model folder: the latest epoch with its optimizer state
STATE_FILE = "train_state.json"  # beside it: epoch counter, best score, learning-rate schedule state
TENSORBOARD_IMAGES = 8            # validation images shown in TensorBoard each epoch
REPORT_IMAGES = 12               # validation images in results/val_overlays.png
MASK_LOSSES = {"batch": unet.batch_dice_loss, "image": unet.dice_loss, "lovasz": unet.lovasz_hinge_loss}
MOVABLE_FLAGS = ("input", "logs", "workers")  # may differ from the stored run on --resume
BEFORE_FLAGS = {"schedule": "plateau"}  # what a run stored before these flags existed did


def arg_parser():
    """train.py's flags, each with its default."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30, help="passes over the training images (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4,
                    help="images per step (default: %(default)s: at the accuracy benchmark's budget, more steps scored higher)")
    ap.add_argument("--size", default="96x128", help="network input HxW, each divisible by 2**depth (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's starting learning rate (default: %(default)s)")
    ap.add_argument("--schedule", choices=("cosine", "plateau"), default="cosine",
                    help="cosine: decay to 0 over the run, step by step; plateau: x0.25 after 4 epochs without "
                         "a lower val_loss (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=42, help="split, weights and augmentation (default: %(default)s)")
    ap.add_argument("--val-fraction", type=float, default=0.1,
                    help="share of the images held out for validation, whole subjects, when --folds is 1 "
                         "(default: %(default)s)")
    ap.add_argument("--folds", type=int, default=1,
                    help="K > 1: train K models on subject-grouped folds, keep out-of-fold predictions (default: %(default)s)")
    ap.add_argument("--baseline", action="store_true",
                    help="train the tutorials' way for comparison: batch Dice loss, no presence head or gate")
    ap.add_argument("--split", choices=("subject", "image"), default="subject",
                    help="validation split: whole subjects, or plain stratified by image (default: %(default)s)")
    ap.add_argument("--base-filters", type=int, default=32,
                    help="filters at the top level (default: %(default)s, ~8M parameters)")
    ap.add_argument("--depth", type=int, default=4, help="down-sampling steps (default: %(default)s)")
    ap.add_argument("--dropout", type=float, default=0.3,
                    help="dropout rate at the bottleneck and the presence head (default: %(default)s)")
    ap.add_argument("--mask-loss", choices=tuple(MASK_LOSSES), default="batch",
                    help="batch: one Dice over the whole batch (default: +0.08 cross-validated Dice on the real "
                         "set); image: Dice per image, then averaged; lovasz: Lovasz hinge per image")
    ap.add_argument("--dice-weight", type=float, default=1.0, help="weight of the mask loss (default: %(default)s)")
    ap.add_argument("--bce-weight", type=float, default=0.0,
                    help="weight of a per-pixel binary cross-entropy added to the Dice loss on `mask` (default: %(default)s)")
    ap.add_argument("--presence-weight", type=float, default=0.1,
                    help="weight of the BCE loss on `present` (default: %(default)s)")
    ap.add_argument("--flips", default="horizontal",
                    help="comma-separated flips: horizontal, vertical, or none (default: %(default)s)")
    ap.add_argument("--elastic", type=float, default=0.0, help="elastic deformation in pixels (default: off)")
    ap.add_argument("--conflicts", choices=("keep", "drop", "relabel"), default="keep",
                    help="training frames with an empty mask whose near-duplicate has a nerve (see duplicates.py): "
                         "keep them, drop them, or give them the twin's mask (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="augmentation threads (default: %(default)s)")
    ap.add_argument("--distribute", choices=("none", "mirrored", "multiworker"), default="none",
                    help="data parallelism: mirrored = every local GPU (tf.distribute.MirroredStrategy, or "
                         "keras.distribution.DataParallel on jax); multiworker = the hosts in TF_CONFIG "
                         "(tf.distribute.MultiWorkerMirroredStrategy) (default: %(default)s)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="auto: mixed fp16 on a GPU, bf16 on CPUs with native bf16, else fp32 (default: %(default)s)")
    ap.add_argument("--input", type=Path, default=INPUT_DIR, help="the arrays data.py wrote (default: %(default)s)")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR,
                    help="models, settings, out-of-fold predictions (default: %(default)s)")
    ap.add_argument("--logs", type=Path, default=LOGS_DIR, help="TensorBoard logs (default: %(default)s)")
    ap.add_argument("--run", default=None, help="TensorBoard run name (default: date and time)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the interrupted run in --results from its last completed epoch, with its settings")
    ap.add_argument("--force", action="store_true", help="start over although --results holds an unfinished run")
    return ap


def parse_args(argv=None):
    args = arg_parser().parse_args(argv)
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
        (min(args.dice_weight, args.bce_weight, args.presence_weight) >= 0, "loss weights must not be negative"),
        (not (args.bce_weight and args.mask_loss == "lovasz"),
         "--bce-weight adds to a Dice loss: use it with --mask-loss batch or image"),
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


def save_model(net, path):
    # synchronized batch norm only matters while a tf.distribute strategy trains; saved without it, the
    # model loads under every backend
    synchronized = [layer for layer in net.layers if getattr(layer, "synchronized", False)]
    for layer in synchronized:
        layer.synchronized = False
    try:
        with atomic_path(path) as tmp:
            net.save(tmp)
    finally:
        for layer in synchronized:
            layer.synchronized = True


class LeaderboardCheckpoint(keras.callbacks.Callback):
    """Adds val_leaderboard to the logs each epoch and saves the model whenever it improves."""

    def __init__(self, val_images, val_masks, results, settings, batch_size, gate=True, best=-np.inf):
        super().__init__()
        self.x, self.masks = val_images[..., None].astype(np.float32), val_masks
        self.results, self.settings, self.batch_size = Path(results), settings, batch_size
        self.spec = None if gate else {"presence_threshold": 0.0}
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        out = unet.predict(self.model, self.x, self.batch_size)
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
            save_model(self.model, self.results / name)
        write_json(self.results / SETTINGS_FILE, {**self.settings, "best_epoch": epoch, "val_leaderboard": score})


class Plateau(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose patience counters can be saved and restored for --resume."""

    COUNTERS = ("wait", "best", "cooldown_counter")

    def __init__(self, counters=None, **kwargs):
        super().__init__(**kwargs)
        self.restored = counters or {}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)  # resets the counters
        for name, value in self.restored.items():
            setattr(self, name, value)

    def counters(self):
        return {name: float(getattr(self, name)) for name in self.COUNTERS}


class LearningRateLog(keras.callbacks.Callback):
    """Adds the learning rate reached to each epoch's logs: a schedule does not log itself."""

    def on_epoch_end(self, epoch, logs=None):
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss, before any checkpoint can take the bad weights."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not np.isfinite(loss):
            raise UserError(f"the training loss became {loss} at epoch {self.epoch + 1}, batch {batch + 1}: "
                            "training stopped, the checkpoints of the last good epoch are kept (try a lower --lr)")


class ResumePoint(keras.callbacks.Callback):
    """Saves the latest model with its optimizer state, then train_state.json, after each epoch.

    Listed last, so the state file is written only when everything else for the epoch is on disk."""

    def __init__(self, folder, run, leaderboard, plateau):
        super().__init__()
        self.folder, self.run, self.leaderboard, self.plateau = Path(folder), run, leaderboard, plateau

    def on_epoch_end(self, epoch, logs=None):
        save_model(self.model, self.folder / LAST_FILE)
        write_json(self.folder / STATE_FILE, {
            "run": self.run, "epoch": epoch + 1, "best": self.leaderboard.best,
            "plateau": self.plateau and self.plateau.counters(),
            "random": [keras.ops.convert_to_numpy(v).tolist() for v in random_states(self.model)],
        })


def random_states(net):
    """Dropout's random-stream counters: not among the weights a checkpoint holds."""
    return [v for v in net.variables if v.path.endswith("seed_generator_state")]


def resume_state(folder, run):
    """The saved state of `folder` if it belongs to this run, else None (the fold starts afresh)."""
    path = Path(folder) / STATE_FILE
    state = read_json(path) if path.exists() else None
    return state if state and state["run"] == run else None


def keep_epochs(log_path, epochs):
    """Drop rows for epochs >= `epochs` from a CSV training log (an epoch cut short by a kill)."""
    if log_path.exists():
        lines = log_path.read_text().splitlines(keepends=True)
        with atomic_path(log_path) as tmp:
            tmp.write_text("".join(lines[:1] + [r for r in lines[1:] if int(r.split(",", 1)[0]) < epochs]))


class ValidationImages(keras.callbacks.Callback):
    """Each epoch, a fixed set of validation images in TensorBoard with true-positive, false-positive and
    false-negative pixels tinted (yellow, red, blue)."""

    def __init__(self, images, masks, log_dir, gate=True):
        super().__init__()
        import tensorflow as tf

        self.summary = tf.summary
        self.writer = tf.summary.create_file_writer(str(Path(log_dir) / "images"))
        self.images, self.masks = images, masks
        self.spec = None if gate else {"presence_threshold": 0.0}

    def on_epoch_end(self, epoch, logs=None):
        out = unet.predict(self.model, self.images[..., None].astype(np.float32))
        predicted = postprocess(out["mask"][..., 0], out["present"], self.spec)
        tiles = np.stack([overlay(*case) for case in zip(self.images, self.masks, predicted)])
        with self.writer.as_default():
            self.summary.image("validation_overlays", tiles, step=epoch, max_outputs=len(tiles))
        self.writer.flush()


def example_indices(present, n):
    """n fixed positions spread over a set, half of them images with a nerve where the set allows."""
    pos, neg = np.flatnonzero(present), np.flatnonzero(~present)
    n_neg = min(len(neg), n // 2)
    n_pos = min(len(pos), n - n_neg)
    n_neg = min(len(neg), n - n_pos)
    spread = [idx[np.linspace(0, len(idx) - 1, k).round().astype(int)] for idx, k in ((pos, n_pos), (neg, n_neg)) if k]
    return np.sort(np.concatenate(spread)) if spread else np.zeros(0, int)


def tensorboard_callbacks(log_dir, val_images, val_masks, gate):
    """Keras' TensorBoard callback and validation images; both write through TensorFlow, which other
    backends may lack."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        print("tensorflow is not installed: no TensorBoard logs this run (the CSV log is still written)")
        return []
    pick = example_indices(val_masks.reshape(len(val_masks), -1).any(axis=1), TENSORBOARD_IMAGES)
    return [keras.callbacks.TensorBoard(log_dir=str(log_dir), histogram_freq=1),
            ValidationImages(val_images[pick], val_masks[pick], log_dir, gate)]


def distribute(args):
    """Set up --distribute for the backend; return (a context factory to build models in, replicas, whether
    this process writes the results). The batch size stays the global batch: each step sees the same images
    whatever the replica count, so the learning rate needs no scaling."""
    backend = keras.backend.backend()
    if args.distribute == "none":
        return contextlib.nullcontext, 1, True
    if backend == "tensorflow":
        import tensorflow as tf

        if args.distribute == "multiworker":
            strategy = multiworker_strategy()
            return strategy.scope, strategy.num_replicas_in_sync, is_chief(strategy.cluster_resolver)
        devices = [d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
        return strategy.scope, strategy.num_replicas_in_sync, True
    if backend == "jax" and args.distribute == "mirrored":
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return contextlib.nullcontext, len(devices), True
    needs = "tensorflow or jax" if args.distribute == "mirrored" else "tensorflow"
    raise UserError(f"--distribute {args.distribute} needs the {needs} backend, not {backend}")


def multiworker_strategy():
    """tf.distribute.MultiWorkerMirroredStrategy over the cluster in TF_CONFIG."""
    import tensorflow as tf

    try:
        config = json.loads(os.environ.get("TF_CONFIG", ""))
    except ValueError:
        config = None
    if not (isinstance(config, dict) and "cluster" in config and {"type", "index"} <= set(config.get("task") or {})):
        raise UserError("--distribute multiworker needs TF_CONFIG describing the cluster and this process's task, "
                        'e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                        '"task": {"type": "worker", "index": 0}}\' (see the README)')

    class Strategy(tf.distribute.MultiWorkerMirroredStrategy):
        # Keras 3.15's fit() hands reduce() a nested batch and scalar logs with axis=0, which the
        # multi-worker strategy rejects (keras-team/keras#20585): reduce each value on its own
        def reduce(self, reduce_op, value, axis):
            def one(v):
                return super(Strategy, self).reduce(reduce_op, v, None if axis == 0 and v.shape.rank == 0 else axis)
            return tf.nest.map_structure(one, value)

    return Strategy()


def is_chief(resolver):
    """The task that writes results: the "chief" if the cluster has one, else worker 0."""
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


@contextlib.contextmanager
def worker_outputs(args, chief):
    """The other workers of a multi-worker run write into a scratch folder, deleted when they finish: every
    worker runs the same steps (predictions and checkpoints included), only the chief's files are kept."""
    if chief:
        yield
        return
    kept = args.results
    with tempfile.TemporaryDirectory(prefix="nerve-worker-") as scratch:
        if args.resume:  # every worker resumes from the chief's files, so they must see results/
            shutil.copytree(kept, Path(scratch) / "results")
        args.results, args.logs = Path(scratch) / "results", Path(scratch) / "logs"
        try:
            yield
        except UserError as e:  # point the user at the chief's folder, which --resume continues from
            raise UserError(str(e).replace(str(args.results), str(kept))) from None


def learning_rate(args, steps_per_epoch):
    """Adam's learning rate: a cosine decay over all training steps, or a constant that Plateau lowers."""
    if args.schedule == "plateau":
        return args.lr
    return keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=args.epochs * steps_per_epoch)


def compile_model(args, mean, std, steps_per_epoch):
    synchronized = args.distribute != "none" and keras.backend.backend() == "tensorflow"
    net = unet.build_model((*args.size, 1), args.base_filters, args.depth, args.dropout, mean, std, synchronized)
    kind = "batch" if args.baseline else args.mask_loss
    mask_loss = MASK_LOSSES[kind]
    if args.bce_weight and not args.baseline:
        mask_loss = unet.DiceBCELoss(kind == "image", args.bce_weight)
    net.compile(
        optimizer=keras.optimizers.Adam(learning_rate(args, steps_per_epoch)),
        loss={"mask": mask_loss, "present": "binary_crossentropy"},
        loss_weights={"mask": args.dice_weight, "present": 0.0 if args.baseline else args.presence_weight},
        metrics={"mask": [unet.dice_coef], "present": [keras.metrics.BinaryAccuracy(name="accuracy")]},
    )
    return net


def train_model(args, train, val, out_dir, log_dir, settings, state=None, scope=contextlib.nullcontext):
    """Train one model on train = (images, masks), choosing its best epoch on val = (images, masks), from
    scratch or from a saved resume state; return the best score. The model is built in `scope`."""
    mean, std = float(train[0].mean()), float(train[0].std())
    start = state["epoch"] if state else 0
    devices = unet.data_parallel_devices()
    train_batches = augment.AugmentedBatches(*train, args.batch_size, args.seed, epoch=start, flips=args.flips,
                                             elastic=args.elastic, workers=args.workers, multiple=devices)
    val_batches = augment.AugmentedBatches(*val, args.batch_size, augment=False, shuffle=False, workers=0,
                                           multiple=devices)
    with scope():
        net = compile_model(args, mean, std, len(train_batches))
        if state:
            net.optimizer.build(net.trainable_variables)  # so that load_weights restores the optimizer state too
            net.load_weights(out_dir / LAST_FILE)
            for variable, value in zip(random_states(net), state["random"]):
                variable.assign(np.array(value, variable.dtype))
    if state:
        keep_epochs(out_dir / "training_log.csv", start)
        print(f"resuming after epoch {start} (best val_leaderboard so far {state['best']:.4f}, "
              f"learning rate {float(net.optimizer.learning_rate):.3g})")
    print(f"model: {net.count_params():,} parameters, input {args.size[0]}x{args.size[1]}, "
          f"backend {keras.backend.backend()}, {keras.mixed_precision.dtype_policy().name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = LeaderboardCheckpoint(*val, out_dir, {**settings, "mean": mean, "std": std},
                                       args.batch_size, gate=not args.baseline,
                                       best=state["best"] if state else -np.inf)
    plateau = (Plateau(state["plateau"] if state else None, monitor="val_loss", factor=0.25, patience=4, verbose=1)
               if args.schedule == "plateau" else None)
    callbacks = [
        LearningRateLog(),
        checkpoint,
        *([plateau] if plateau else []),
        keras.callbacks.CSVLogger(str(out_dir / "training_log.csv"), append=bool(state)),
        *tensorboard_callbacks(log_dir, *val, gate=not args.baseline),
        StopOnNonFinite(),
        ResumePoint(out_dir, settings["run"], checkpoint, plateau),
    ]
    # shuffle=False: AugmentedBatches already shuffles by (seed, epoch); Keras' own shuffling of the batch
    # order draws from a global random stream that a resumed run could not replay
    net.fit(train_batches, validation_data=val_batches, initial_epoch=start, epochs=args.epochs,
            callbacks=callbacks, verbose=2, shuffle=False)
    training_curves(out_dir / "training_log.csv", out_dir / "curves.png")
    return checkpoint.best


def out_of_fold(out_dir, images):
    """The saved best model's predictions on held-out images, plain and of the mirror image mirrored back."""
    net = submission.load_model(out_dir)
    probs, present = submission.predict_small([net], images, tta=False)
    probs_flip, present_flip = submission.predict_small([net], images[:, :, ::-1], tta=False)
    return {"probs": probs, "present": present, "probs_flip": probs_flip[:, :, ::-1], "present_flip": present_flip}


def training_labels(args, arrays, masks):
    """Which frames to train on and their masks at the training size, after --conflicts."""
    if args.conflicts == "keep":
        return np.ones(len(masks), bool), masks
    pairs, distances, _ = duplicates.near_pairs(arrays["train_images"], arrays["train_subjects"])
    one_empty = duplicates.pair_stats(arrays["train_masks"], pairs)["one_empty"]
    use, fixed = duplicates.resolve_conflicts(masks, pairs, distances, one_empty, args.conflicts)
    changed = np.count_nonzero(~use) if args.conflicts == "drop" else np.count_nonzero((fixed != masks).any(axis=(1, 2)))
    print(f"--conflicts {args.conflicts}: {changed} frames with an empty mask and a near-duplicate with a nerve "
          f"({np.count_nonzero(one_empty)} such pairs among {len(pairs)} near-duplicates)")
    return use, fixed


def validation_png(path, arrays, index, present, predictions, gate):
    """results/val_overlays.png: a fixed set of validation images at full size, as the best model saw them."""
    truth = arrays["train_masks"]
    pick = example_indices(present[index], REPORT_IMAGES)
    probs = np.stack([full_size(p) for p in predictions["probs"][pick]])
    masks = postprocess(probs, predictions["present"][pick], None if gate else {"presence_threshold": 0.0})
    return evaluate.cases_png(arrays["train_images"][index[pick]], truth[index[pick]], masks,
                              arrays["train_ids"][index[pick]], path)


def as_json(args):
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}


def resumed_args(args):
    """The stored flags of the unfinished run in args.results, with the few that may change taken from args."""
    path = args.results / RUN_FILE
    if not path.exists():
        raise UserError(f"nothing to resume in {args.results}/ (no {RUN_FILE}): start with `python train.py`")
    run = read_json(path)
    if run["complete"]:
        raise UserError(f"the run in {args.results}/ is complete: nothing to resume")
    given, defaults = as_json(args), as_json(parse_args([]))
    stored = {**defaults, **BEFORE_FLAGS, **run["args"]}  # flags added since: the old behaviour, else the default
    explicit = {k for k, v in given.items() if v != defaults[k]} - {"results", "resume", "force"}
    changed = [k for k in explicit - set(MOVABLE_FLAGS) if given[k] != stored[k]]
    if changed:
        raise UserError(f"--resume continues with the stored settings; drop "
                        f"{', '.join('--' + k.replace('_', '-') for k in sorted(changed))} (or start over with --force)")
    merged = {**stored, **{k: given[k] for k in explicit}, "results": str(args.results), "resume": True}
    merged.update(size=tuple(merged["size"]), flips=tuple(merged["flips"]),
                  **{k: Path(merged[k]) for k in ("input", "results", "logs")})
    return argparse.Namespace(**merged)


def check_unfinished(args):
    """Refuse to start over an unfinished run unless asked to: its epochs would be lost."""
    path = args.results / RUN_FILE
    if path.exists() and not read_json(path)["complete"] and not args.force:
        raise UserError(f"{args.results}/ holds an unfinished run: continue it with `python train.py --resume`, "
                        "or start over with --force")


def main(argv=None):
    args = parse_args(argv)
    if args.resume:
        args = resumed_args(args)
    scope, replicas, chief = distribute(args)
    if not args.resume:
        if chief:
            check_unfinished(args)
        args.run = args.run or time.strftime("%Y%m%d-%H%M%S")
    keras.utils.set_random_seed(args.seed)
    policy = unet.set_precision(args.precision)
    if args.batch_size % replicas:
        raise UserError(f"--batch-size {args.batch_size} does not split evenly over {replicas} devices")
    if replicas > 1:
        print(f"data parallel over {replicas} devices: global batch {args.batch_size}, "
              f"{args.batch_size // replicas} per device")
    with worker_outputs(args, chief):
        train_folds(args, scope, policy)


def train_folds(args, scope, policy):
    """Train the run's models (one, or one per fold), then tune post-processing on their held-out predictions."""
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
    use, fit_masks = training_labels(args, arrays, masks)
    settings = {
        "size": list(args.size), "base_filters": args.base_filters, "depth": args.depth, "dropout": args.dropout,
        "seed": args.seed, "split": args.split, "val_fraction": args.val_fraction, "folds": args.folds,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "schedule": args.schedule,
        "mask_loss": args.mask_loss, "dice_weight": args.dice_weight, "bce_weight": args.bce_weight,
        "presence_weight": args.presence_weight,
        "flips": list(args.flips), "elastic": args.elastic, "conflicts": args.conflicts, "baseline": args.baseline,
        "backend": keras.backend.backend(), "precision": policy, "run": args.run,
    }
    write_json(args.results / RUN_FILE, {"args": as_json(args), "complete": False})
    oof = {"index": [], "fold": []}
    try:
        for k, (val, name) in enumerate(zip(splits, dirs)):
            train = ~val & use
            print(f"{'fold ' + str(k) + ': ' if args.folds > 1 else ''}train: {np.count_nonzero(train)} images, "
                  f"val: {np.count_nonzero(val)} images (subjects {sorted(set(subjects[val].tolist()))}), "
                  f"nerve in {present[~val].mean():.0%} / {present[val].mean():.0%}")
            out_dir = args.results / name
            state = resume_state(out_dir, args.run) if args.resume else None
            if state and state["epoch"] >= args.epochs:
                print(f"already trained: best val_leaderboard {state['best']:.4f}")
            else:
                fold_settings = {**settings, "fold": k, "val_ids": arrays["train_ids"][val].tolist()}
                best = train_model(args, (images[train], fit_masks[train]), (images[val], masks[val]), out_dir,
                                   args.logs / args.run / name, fold_settings, state, scope)
                print(f"best val_leaderboard {best:.4f}; model in {out_dir / MODEL_FILE}")
            predictions = out_of_fold(out_dir, images[val])
            validation_png(out_dir / "val_overlays.png", arrays, np.flatnonzero(val), present, predictions,
                           not args.baseline)
            for key, value in predictions.items():
                oof.setdefault(key, []).append(value)
            oof["index"].append(np.flatnonzero(val))
            oof["fold"].append(np.full(np.count_nonzero(val), k))
    except KeyboardInterrupt:
        raise UserError(f"interrupted. Completed epochs are saved: continue with "
                        f"`python train.py --results {args.results} --resume`") from None
    except UserError as e:
        raise UserError(f"{e}\nCompleted epochs are saved: continue with "
                        f"`python train.py --results {args.results} --resume`") from None
    oof = {key: np.concatenate(value) for key, value in oof.items()}
    oof["probs"], oof["probs_flip"] = oof["probs"].astype(np.float16), oof["probs_flip"].astype(np.float16)
    oof["ids"] = arrays["train_ids"][oof["index"]]
    with atomic_path(args.results / evaluate.OOF_FILE) as tmp:
        np.savez(tmp, **oof)
    write_json(args.results / submission.ENSEMBLE_FILE, {"models": dirs})

    # the baseline is scored as the tutorials used it: no mirror averaging, no tuned gate
    report = evaluate.cross_validate(oof, arrays["train_masks"], tta=not args.baseline,
                                     baseline=args.baseline)
    write_json(args.results / submission.POSTPROCESS_FILE, report["postprocess"])
    print(evaluate.table(report["rows"]))
    print(f"post-processing for submission.py (tuned on all out-of-fold predictions): {report['postprocess']}")
    write_json(args.results / RUN_FILE, {"args": as_json(args), "complete": True})
    for name in dirs:
        (args.results / name / LAST_FILE).unlink(missing_ok=True)
    print(f"trained in {(time.time() - started) / 60:.1f} min; TensorBoard: tensorboard --logdir {args.logs}")


if __name__ == "__main__":
    run_cli(main)
