"""Train the two-headed U-Net on the arrays data.py wrote.

    python train.py                          # best model in results/, TensorBoard logs in logs/
    python train.py --epochs 5 --size 64x80  # a quicker run
    python train.py --folds 5                # 5 subject-grouped folds: out-of-fold predictions, tuned post-processing
    python train.py --resume                 # continue an interrupted run from its last completed epoch

The best epoch is chosen on the validation leaderboard score (mean per-image Dice with the presence
gate, 1 when truth and prediction are both empty), not on the loss. Validation holds out whole
subjects, stratified by nerve presence: frames of one subject are near-duplicates.

A share of the training samples (--crops) are crop views of the frames that leave a structure out or keep it
in (augment.py): the presence head and the mask learn what "no nerve here" looks like from frames labelled only
where the nerve is. After each model trains, its out-of-distribution score is fitted (nerve/ood.py): the training
frames' features, thresholded on the validation subjects'.

Every completed epoch is saved for --resume (see nerve/checkpoint.py), so a killed run loses at most the epoch it
was in. After the last model, the presence is calibrated and the post-processing chosen on the out-of-fold
predictions (nerve/postprocess.py).
"""

import contextlib
import time

from nerve.common import (
    CALIBRATION_FILE,
    ENSEMBLE_FILE,
    MODEL_FILE,
    OOF_FILE,
    RELIABILITY_FILE,
    TRAINING_LOG_FILE,
    UserError,
    add_flags,
    arg_parser,
    exclusive,
    given_flags,
    output_folder,
    parse_size,
    run_cli,
    run_record,
    write_json,
    write_state,
)

import keras
import numpy as np

from nerve import (
    augment,
    checkpoint,
    crossval,
    deploy,
    inference,
    monitor,
    neardup,
    ood,
    planning,
    postprocess,
    splits,
    store,
)
from nerve import model as unet
from nerve.distribute import distribute, worker_outputs
from nerve.figures import reliability_png
from nerve.metrics import expected_calibration_error, presence, structure_presence

MASK_LOSSES = {"batch": unet.batch_dice_loss, "image": unet.dice_loss, "lovasz": unet.lovasz_hinge_loss}
# --baseline: the original tutorials' recipe, as the flags it implies (flags given beside it win)
BASELINE = {"mask_loss": "batch", "bce_weight": 0.0, "presence_weight": 0.0, "tta": "none", "postprocess": "fixed"}


def flag_parser():
    """train.py's flags, each with its default."""
    # fmt: off
    ap = arg_parser(__doc__)
    ap.add_argument("--epochs", type=int, default=None, help="passes over the training images; unset: planned (nerve/"
                    f"planning.py), {planning.EPOCHS}, or as many as show the network {planning.MIN_IMAGES:,} images")
    ap.add_argument("--batch-size", type=int, default=4, help="images per step")
    ap.add_argument("--size", default=None, help="network input HxW, each side divisible by 2**depth; unset: "
                    "planned from the dataset (nerve/planning.py), 96x128 for the Kaggle frames")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's starting learning rate")
    ap.add_argument("--schedule", choices=("cosine", "plateau"), default="cosine",
                    help="cosine: decay to 0 over the run, step by step; "
                         "plateau: x0.25 after 4 epochs without a lower val_loss")
    ap.add_argument("--seed", type=int, default=42, help="split, weights and augmentation")
    ap.add_argument("--val-fraction", type=float, default=0.1,
                    help="share of the images held out for validation, whole subjects, when --folds is 1")
    ap.add_argument("--folds", type=int, default=1,
                    help="K > 1: train K models on subject-grouped folds, keep out-of-fold predictions")
    ap.add_argument("--split", choices=("subject", "image"), default="subject",
                    help="hold out whole subjects, or single images stratified by nerve presence")
    preset = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in BASELINE.items())
    ap.add_argument("--baseline", action="store_true", help=f"the tutorials' recipe for comparison: sets {preset}")
    ap.add_argument("--base-filters", type=int, default=32, help="filters at the top level")
    ap.add_argument("--depth", type=int, default=4, help="down-sampling steps")
    ap.add_argument("--dropout", type=float, default=0.3, help="dropout rate at the bottleneck and the presence head")
    ap.add_argument("--mask-loss", choices=tuple(MASK_LOSSES), default="image",
                    help="batch: one Dice over the whole batch; image: Dice per image, then averaged; "
                         "lovasz: Lovasz hinge per image")
    ap.add_argument("--dice-weight", type=float, default=1.0, help="weight of the mask loss")
    ap.add_argument("--bce-weight", type=float, default=1.0,
                    help="weight of a per-pixel BCE added to the Dice loss (unset with lovasz: 0)")
    ap.add_argument("--presence-weight", type=float, default=0.1, help="BCE weight on `present`; 0: no head, no gate")
    add_flags(ap, "tta", tta=dict(default="hflip", help="views averaged in the out-of-fold predictions that are "
              "scored and tuned on, and by default in evaluate.py and submission.py: hflip adds the mirror image"))
    ap.add_argument("--postprocess", choices=("tuned", "fixed"), default="tuned",
                    help="tuned: presence and pixel thresholds, minimum area and largest component chosen on "
                         "the out-of-fold predictions (the gate only where enough of them lack the structure); "
                         "fixed: the defaults")
    ap.add_argument("--flips", default="horizontal", help="comma-separated flips: horizontal, vertical, or none")
    ap.add_argument("--elastic", type=float, default=0.0, help="elastic deformation in pixels (0: off)")
    ap.add_argument("--scale", type=float, default=0.0, help="random zoom by a factor in [1 - s, 1 + s] (0: off)")
    ap.add_argument("--gamma", type=float, default=0.0,
                    help="random gamma curve of exponent (1 + g) ** u, u in [-1, 1] (0: off)")
    ap.add_argument("--crops", type=float, default=augment.CROPS,
                    help="share of training samples that are crop views of a frame, half of them leaving a "
                         "structure out (absent), half keeping it whole, at the same scales (0: off)")
    ap.add_argument("--conflicts", choices=("keep", "drop", "relabel"), default="keep",
                    help="training frames with an empty mask whose near-duplicate has a nerve (see duplicates.py): "
                         "keep them, drop them, or give them the twin's mask")
    ap.add_argument("--workers", type=int, default=2, help="augmentation threads")
    ap.add_argument("--distribute", choices=("none", "mirrored", "multiworker"), default="none",
                    help="data parallelism: mirrored = every local GPU (tf.distribute.MirroredStrategy, or "
                         "keras.distribution.DataParallel on jax); multiworker = the hosts in TF_CONFIG "
                         "(tf.distribute.MultiWorkerMirroredStrategy)")
    add_flags(ap, "precision", "input", "results", "logs", results=dict(help="models, settings, predictions"))
    ap.add_argument("--run", default=None, help="TensorBoard run name (unset: the date and time)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the unfinished run in --results from its last completed epoch, with its settings")
    ap.add_argument("--force", action="store_true", help="start over although --results holds an unfinished run")
    # fmt: on
    return ap


def converted(args):
    """The flags whose text train.py reads into values: --size as (h, w), --flips as a tuple."""
    args.size = parse_size(args.size) if isinstance(args.size, str) else args.size
    args.flips = tuple(f for f in args.flips.split(",") if f and f != "none")
    return args


def parse_args(argv=None):
    """The flags, with the stored ones of the run to --resume or the --baseline preset applied, checked."""
    parser = flag_parser()
    args, defaults = (converted(parser.parse_args(a)) for a in (argv, []))
    given = given_flags(parser, argv)
    if args.resume:
        args = checkpoint.resumed_args(args, given, defaults)
    elif args.baseline:
        for name, value in BASELINE.items():
            if name not in given:
                setattr(args, name, value)
    elif args.mask_loss == "lovasz" and "bce_weight" not in given:
        args.bce_weight = 0.0  # the default cross-entropy term belongs to the Dice losses
    checks = [
        (args.epochs is None or args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.lr > 0, "--lr must be positive"),
        (0 < args.val_fraction < 1, "--val-fraction must be between 0 and 1"),
        (args.folds >= 1, "--folds must be at least 1"),
        (args.base_filters >= 1 and args.depth >= 1, "--base-filters and --depth must be at least 1"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (min(args.dice_weight, args.bce_weight, args.presence_weight) >= 0, "loss weights must not be negative"),
        (
            not (args.bce_weight and args.mask_loss == "lovasz"),
            "--bce-weight adds to a Dice loss: use it with --mask-loss batch or image",
        ),
        (set(args.flips) <= {"horizontal", "vertical"}, "--flips takes horizontal, vertical or none"),
        (args.elastic >= 0 and args.workers >= 0, "--elastic and --workers must not be negative"),
        (0 <= args.scale < 1 and args.gamma >= 0, "--scale must be in [0, 1) and --gamma not negative"),
        (0 <= args.crops <= 1, "--crops must be in [0, 1]"),
        (
            args.size is None or all(s % 2**args.depth == 0 for s in args.size),
            f"--size {'x'.join(map(str, args.size or ()))}: both sides must be divisible by 2**depth = {2**args.depth}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return args


def learning_rate(args, steps_per_epoch):
    """Adam's learning rate: a cosine decay over all training steps, or a constant that Plateau lowers."""
    if args.schedule == "plateau":
        return args.lr
    return keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=args.epochs * steps_per_epoch)


def compile_model(args, mean, std, steps_per_epoch, structures=1):
    synchronized = args.distribute != "none" and keras.backend.backend() == "tensorflow"
    net = unet.build_model(
        (*args.size, 1), args.base_filters, args.depth, args.dropout, mean, std, synchronized, structures
    )
    mask_loss = MASK_LOSSES[args.mask_loss]
    if args.bce_weight:
        mask_loss = unet.DiceBCELoss(args.mask_loss == "image", args.bce_weight)
    net.compile(
        optimizer=keras.optimizers.Adam(learning_rate(args, steps_per_epoch)),
        loss={"mask": mask_loss, "present": "binary_crossentropy"},
        loss_weights={"mask": args.dice_weight, "present": args.presence_weight},
        metrics={"mask": [unet.dice_coef], "present": [keras.metrics.BinaryAccuracy(name="accuracy")]},
    )
    return net


def train_model(args, train, val, originals, out_dir, log_dir, settings, state=None, scope=contextlib.nullcontext):
    """Train one model on train = (images, masks), choosing its best epoch on val = (images, masks), from
    scratch or from a saved resume state; return the best score. Crop views are cut from originals = (the
    full-resolution images, label maps, each training image's row in them). The model is built in `scope`."""
    mean, std = float(train[0].mean()), float(train[0].std())
    start = state["epoch"] if state else 0
    structures = len(settings["structures"])
    devices = inference.data_parallel_devices()
    train_batches = augment.AugmentedBatches(
        *train,
        args.batch_size,
        args.seed,
        epoch=start,
        flips=args.flips,
        elastic=args.elastic,
        scale=args.scale,
        gamma=args.gamma,
        workers=args.workers,
        multiple=devices,
        structures=structures,
        crops=args.crops,
        originals=originals,
    )
    val_batches = augment.AugmentedBatches(
        *val, args.batch_size, augment=False, shuffle=False, workers=0, multiple=devices, structures=structures
    )
    with scope():
        net = compile_model(args, mean, std, len(train_batches), structures)
        if state:
            checkpoint.restore(net, out_dir, state)
    if state:
        checkpoint.keep_epochs(out_dir / TRAINING_LOG_FILE, start)
        print(
            f"resuming after epoch {start} (best val_leaderboard so far {state['best']:.4f}, "
            f"learning rate {float(net.optimizer.learning_rate):.3g})"
        )
    print(
        f"model: {net.count_params():,} parameters, input {args.size[0]}x{args.size[1]}, "
        f"backend {keras.backend.backend()}, {keras.mixed_precision.dtype_policy().name}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = postprocess.untuned(args.presence_weight)
    best = checkpoint.LeaderboardCheckpoint(
        *val,
        out_dir,
        {**settings, "mean": mean, "std": std},
        args.batch_size,
        spec,
        best=state["best"] if state else -np.inf,
    )
    plateau = (
        checkpoint.Plateau(state["plateau"] if state else None, monitor="val_loss", factor=0.25, patience=4, verbose=1)
        if args.schedule == "plateau"
        else None
    )
    callbacks = [
        monitor.LearningRateLog(),
        best,
        *([plateau] if plateau else []),
        keras.callbacks.CSVLogger(str(out_dir / TRAINING_LOG_FILE), append=bool(state)),
        *monitor.tensorboard_callbacks(log_dir, *val, spec, structures),
        monitor.StopOnNonFinite(),
        monitor.StopOnInterrupt(),
        checkpoint.ResumePoint(out_dir, args.run, best, plateau),
    ]
    # shuffle=False: AugmentedBatches already shuffles by (seed, epoch); Keras' own shuffling of the batch
    # order draws from a global random stream that a resumed run could not replay
    net.fit(
        train_batches,
        validation_data=val_batches,
        initial_epoch=start,
        epochs=args.epochs,
        callbacks=callbacks,
        verbose=monitor.fit_verbosity(),
        shuffle=False,
    )
    return best.best


def fit_ood(args, out_dir, train_images, val_images, val_groups):
    """Give the saved best model its out-of-distribution output (nerve/ood.py) and print what the fit found."""
    net, report = ood.fit(inference.load_model(out_dir), train_images, val_images, val_groups, args.tta)
    checkpoint.update_model(out_dir, net, ood=report)
    flagged = report["held_out_flagged"]
    estimate = "" if flagged is None else f"; a threshold set on half the subjects flags {flagged:.1%} of the others"
    print(f"out-of-distribution score: threshold at distance {report['threshold_distance']:.1f}{estimate}")


def out_of_fold(args, out_dir, images, frames, labels, val, structures):
    """The saved best model's predictions on the held-out frames `val` (indices; `images` at the training size)
    and on one crop view of each (augment.held_out_crop of the frame at its own size), plain and of the mirror
    image mirrored back, the presence uncalibrated: the rows of oof.npz, frames first."""
    net = unet.calibrated(inference.load_model(out_dir), [1.0] * structures)
    crops = {i: augment.held_out_crop(frames[i], labels[i], [args.seed, i]) for i in val}
    viewed = [i for i in val if crops[i] is not None]
    views = [deploy.resize(augment.cropped(frames[i], crops[i]), args.size) for i in viewed]
    plain, flipped = inference.predict_views([net], np.concatenate([images, np.reshape(views, (-1, *args.size))]))
    names = ("probs", "present", "ood")
    rows = {**dict(zip(names, plain)), **{f"{name}_flip": value for name, value in zip(names, flipped)}}
    frames = np.full((len(val), 4), -1)
    boxes = np.reshape([crops[i] for i in viewed], (-1, 4))
    return {**rows, "index": np.r_[val, viewed], "crop": np.concatenate([frames, boxes]).astype(int)}


def calibrate(args, oof, truth, dirs, names):
    """Fit each structure's presence temperature on the out-of-fold predictions, put it into every model and
    calibrate `oof` with it; write the calibration's figures and reliability diagram."""
    views = ["present", "present_flip"] if args.tta == "hflip" else ["present"]
    before = np.mean([oof[v] for v in views], axis=0)
    temperature, held_out = postprocess.temperatures([oof[v] for v in views], truth, oof["fold"])
    for folder in dirs:
        net = unet.calibrated(inference.load_model(args.results / folder), temperature)
        checkpoint.update_model(args.results / folder, net, presence_temperature=temperature)
    for key in ("present", "present_flip"):
        oof[key] = postprocess.calibrate(oof[key], temperature)
    figures = {
        name: {
            "temperature": temperature[s],
            "ece_before": expected_calibration_error(before[:, s], truth[:, s]),
            "ece_after": expected_calibration_error(held_out[:, s], truth[:, s]),
        }
        for s, name in enumerate(names)
    }
    write_json(args.results / CALIBRATION_FILE, figures)
    reliability_png(before, held_out, truth, names, args.results / RELIABILITY_FILE)
    how = "each fold by the other folds' temperature" if len(dirs) > 1 else "on the images it was fitted on"
    for name, f in figures.items():
        print(
            f"presence of {name} calibrated at temperature {f['temperature']:.2f}: expected calibration error "
            f"{f['ece_before']:.3f} -> {f['ece_after']:.3f} ({how})"
        )


def training_labels(args, arrays, masks):
    """Which frames to train on and their masks at the training size, after --conflicts."""
    if args.conflicts == "keep":
        return np.ones(len(masks), bool), masks
    pairs, distances, _ = neardup.near_pairs(arrays["train_images"], arrays["train_subjects"])
    one_empty = neardup.pair_stats(arrays["train_masks"], pairs)["one_empty"]
    use, fixed = neardup.resolve_conflicts(masks, pairs, distances, one_empty, args.conflicts)
    changed = (
        np.count_nonzero(~use) if args.conflicts == "drop" else np.count_nonzero((fixed != masks).any(axis=(1, 2)))
    )
    print(
        f"--conflicts {args.conflicts}: {changed} frames with an empty mask and a near-duplicate with a nerve "
        f"({np.count_nonzero(one_empty)} such pairs among {len(pairs)} near-duplicates)"
    )
    return use, fixed


def group_list(groups, shown=12):
    """The groups of a validation set, for its line in the log."""
    unique = sorted(set(groups.tolist()))
    return f"subjects {unique}" if len(unique) <= shown else f"{len(unique)} groups"


def held_out_sets(args, present, subjects):
    """(one boolean validation mask per model, the models' folder names)."""
    if args.folds > 1:
        fold = splits.assign_folds(present, subjects, args.folds, args.seed, args.split)
        held_out, dirs = [fold == k for k in range(args.folds)], [f"fold{k}" for k in range(args.folds)]
    else:
        held_out, dirs = [splits.validation_split(present, subjects, args.val_fraction, args.seed, args.split)], ["."]
    if any(val.all() or not val.any() for val in held_out):
        raise UserError("a validation split is empty or takes everything: change --val-fraction or --folds")
    return held_out, dirs


def main(argv=None):
    args = parse_args(argv)
    scope, replicas, chief = distribute(args.distribute)
    args.run = args.run or time.strftime("%Y%m%d-%H%M%S")
    keras.utils.set_random_seed(args.seed)
    policy = unet.set_precision(args.precision)
    if args.batch_size % replicas:
        raise UserError(f"--batch-size {args.batch_size} does not split evenly over {replicas} devices")
    if replicas > 1:
        print(
            f"data parallel over {replicas} devices: global batch {args.batch_size}, "
            f"{args.batch_size // replicas} per device"
        )
    output_folder(args.logs, "--logs")
    with worker_outputs(args, chief), exclusive(args.results):
        if chief and not args.resume:
            checkpoint.check_unfinished(args.results, args.force)
        train_folds(args, scope, policy)


def train_folds(args, scope, policy):
    """Train the run's models (one, or one per fold), then tune post-processing on their held-out predictions."""
    started = time.time()
    arrays = store.load_arrays(
        args.input, ("train_images", "train_masks", "train_ids", "train_subjects", "train_sizes")
    )
    names = store.structures(args.input)
    # every stage sees each frame at its own size: the arrays' canvas is only how they are kept
    frames, labels = store.frames(arrays, "train_images"), store.frames(arrays, "train_masks")
    present, subjects = presence(arrays["train_masks"]), arrays["train_subjects"]
    held_out, dirs = held_out_sets(args, present, subjects)
    if args.size is None:
        typical = store.typical_size(arrays["train_sizes"])
        args.size, why = planning.training_size(arrays["train_masks"], typical, names, args.depth)
        print(f"training size {why} (give --size to choose)")
    images = augment.resize_images(frames, args.size)
    masks = augment.resize_masks(labels, args.size, len(names))
    use, fit_masks = training_labels(args, arrays, masks)
    if args.epochs is None:  # from the first model's training set: folds differ by a few images, the record is one
        args.epochs, why = planning.epochs(np.count_nonzero(~held_out[0] & use))
        print(f"training length {why} (give --epochs to choose)")
    record = run_record(
        args,
        checkpoint.RESUME_FLAGS - {"results"},
        backend=keras.backend.backend(),
        dtype_policy=policy,
        structures=names,
    )
    states = {
        name: checkpoint.resume_state(args.results / name, args.run, args.results) if args.resume else None
        for name in dirs
    }
    checkpoint.write_run(args.results, record, complete=False)
    oof = {}
    try:
        for k, (val, name) in enumerate(zip(held_out, dirs)):
            train = ~val & use
            print(
                f"{'fold ' + str(k) + ': ' if args.folds > 1 else ''}train: {np.count_nonzero(train)} images, "
                f"val: {np.count_nonzero(val)} images ({group_list(subjects[val])}), "
                f"a structure in {present[~val].mean():.0%} / {present[val].mean():.0%}"
            )
            out_dir = args.results / name
            state = states[name]
            if state and state["epoch"] >= args.epochs:
                print(f"already trained: best val_leaderboard {state['best']:.4f}")
            else:
                settings = {**record, "fold": k, "val_ids": arrays["train_ids"][val].tolist()}
                best = train_model(
                    args,
                    (images[train], fit_masks[train]),
                    (images[val], masks[val]),
                    (frames, labels, np.flatnonzero(train)),
                    out_dir,
                    args.logs / args.run / name,
                    settings,
                    state,
                    scope,
                )
                print(f"best val_leaderboard {best:.4f}; model in {out_dir / MODEL_FILE}")
            fit_ood(args, out_dir, images[train], images[val], subjects[val])
            predictions = out_of_fold(args, out_dir, images[val], frames, labels, np.flatnonzero(val), len(names))
            n_val = np.count_nonzero(val)
            monitor.model_pictures(
                out_dir,
                (frames, labels, arrays["train_ids"]),
                np.flatnonzero(val),
                present[val],
                predictions["probs"][:n_val],
                predictions["present"][:n_val],
                postprocess.untuned(args.presence_weight),
                names,
            )
            for key, value in {**predictions, "fold": np.full(len(predictions["index"]), k)}.items():
                oof.setdefault(key, []).append(value)
    except KeyboardInterrupt:
        raise UserError(
            f"interrupted. Completed epochs are saved: continue with "
            f"`python train.py --results {args.results} --resume`"
        ) from None
    except UserError as e:
        raise UserError(
            f"{e}\nCompleted epochs are saved: continue with `python train.py --results {args.results} --resume`"
        ) from None
    oof = {key: np.concatenate(value) for key, value in oof.items()}
    if args.presence_weight > 0:  # without a trained presence head there is nothing to calibrate
        truth = structure_presence(crossval.row_labels(labels, oof), len(names))
        calibrate(args, oof, truth, dirs, names)
    oof = crossval.save_oof(args.results / OOF_FILE, {**oof, "ids": arrays["train_ids"][oof["index"]]})
    write_state(args.results / ENSEMBLE_FILE, {"models": dirs})

    report = crossval.cross_validate(oof, labels, names, args.tta, *postprocess.for_run(record))
    postprocess.save(args.results, report["postprocess"])
    print(crossval.table(report["rows"]))
    print(f"post-processing for submission.py (chosen on all out-of-fold predictions): {report['postprocess']}")
    for line in (crossval.default_gate_line(report), crossval.flagged_line(report)):
        if line:
            print(line)
    checkpoint.finish(args.results, record, dirs)
    print(f"trained in {(time.time() - started) / 60:.1f} min; TensorBoard: tensorboard --logdir {args.logs}")


if __name__ == "__main__":
    run_cli(main)
