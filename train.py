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

import argparse
import contextlib
import dataclasses
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
    output_folder,
    parse_size,
    run_cli,
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
from nerve import report as pages
from nerve.config import RunConfig, choices
from nerve.distribute import distribute, worker_outputs
from nerve.figures import reliability_png
from nerve.metrics import expected_calibration_error, presence, structure_presence

MASK_LOSSES = {"batch": unet.batch_dice_loss, "image": unet.dice_loss, "lovasz": unet.lovasz_hinge_loss}
# --baseline: the original tutorials' recipe, as the flags it implies (flags given beside it win)
BASELINE = {"mask_loss": "batch", "bce_weight": 0.0, "presence_weight": 0.0, "tta": "none", "postprocess": "fixed"}
UNSET = object()  # a flag not given


def flag_parser():
    """train.py's flags, in the sections of RunConfig; each setting's default is RunConfig's."""
    ap, d = arg_parser(__doc__), RunConfig()
    for section, add in (
        ("the data and the split", _data_flags),
        ("the network and its losses", _network_flags),
        ("the optimisation", _optimisation_flags),
        ("the augmentation", _augmentation_flags),
        ("the outputs and --resume", _output_flags),
    ):
        add(ap.add_argument_group(section), d)
    return ap


# fmt: off
def _data_flags(group, d):
    add_flags(group, "arrays")
    group.add_argument("--seed", type=int, default=d.seed, help="split, weights and augmentation")
    group.add_argument("--val-fraction", type=float, default=d.val_fraction,
                       help="share of the images held out for validation, whole subjects, when --folds is 1")
    group.add_argument("--folds", type=int, default=d.folds,
                       help="K > 1: train K models on subject-grouped folds, keep out-of-fold predictions")
    group.add_argument("--split", choices=choices("split"), default=d.split,
                       help="hold out whole subjects, or single images stratified by nerve presence")
    group.add_argument("--conflicts", choices=choices("conflicts"), default=d.conflicts,
                       help="training frames with an empty mask whose near-duplicate has a nerve (see duplicates.py): "
                            "keep them, drop them, or give them the twin's mask")


def _network_flags(group, d):
    group.add_argument("--size", type=parse_size, default=d.size, help="network input HxW, each side divisible by "
                       "2**depth; unset: planned from the dataset (nerve/planning.py), 96x128 for the Kaggle frames")
    group.add_argument("--base-filters", type=int, default=d.base_filters, help="filters at the top level")
    group.add_argument("--depth", type=int, default=d.depth, help="down-sampling steps")
    group.add_argument("--dropout", type=float, default=d.dropout,
                       help="dropout rate at the bottleneck and the presence head")
    group.add_argument("--mask-loss", choices=choices("mask_loss"), default=d.mask_loss,
                       help="batch: one Dice over the whole batch; image: Dice per image, then averaged; "
                            "lovasz: Lovasz hinge per image")
    group.add_argument("--dice-weight", type=float, default=d.dice_weight, help="weight of the mask loss")
    group.add_argument("--bce-weight", type=float, default=d.bce_weight,
                       help="weight of a per-pixel BCE added to the Dice loss (unset with lovasz: 0)")
    add_flags(group, "precision")
    group.add_argument("--presence-weight", type=float, default=d.presence_weight,
                       help="BCE weight on `present`; 0: no head, no gate")
    preset = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in BASELINE.items())
    group.add_argument("--baseline", action="store_true", help=f"the tutorials' recipe for comparison: sets {preset}")


def _optimisation_flags(group, d):
    group.add_argument("--epochs", type=int, default=d.epochs,
                       help=f"passes over the training images; unset: planned (nerve/planning.py), {planning.EPOCHS}, "
                            f"or as many as show the network {planning.MIN_IMAGES:,} images")
    group.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    group.add_argument("--lr", type=float, default=d.lr, help="Adam's starting learning rate")
    group.add_argument("--schedule", choices=choices("schedule"), default=d.schedule,
                       help="cosine: decay to 0 over the run, step by step; "
                            "plateau: x0.25 after 4 epochs without a lower val_loss")
    group.add_argument("--distribute", choices=choices("distribute"), default=d.distribute,
                       help="data parallelism: mirrored = every local GPU (tf.distribute.MirroredStrategy, or "
                            "keras.distribution.DataParallel on jax); multiworker = the hosts in TF_CONFIG "
                            "(tf.distribute.MultiWorkerMirroredStrategy)")


def _augmentation_flags(group, d):
    group.add_argument("--flips", type=flip_list, default=",".join(d.flips),
                       help="comma-separated flips: horizontal, vertical, or none")
    group.add_argument("--elastic", type=float, default=d.elastic, help="elastic deformation in pixels (0: off)")
    group.add_argument("--scale", type=float, default=d.scale,
                       help="random zoom by a factor in [1 - s, 1 + s] (0: off)")
    group.add_argument("--gamma", type=float, default=d.gamma,
                       help="random gamma curve of exponent (1 + g) ** u, u in [-1, 1] (0: off)")
    group.add_argument("--crops", type=float, default=d.crops,
                       help="share of training samples that are crop views of a frame, half of them leaving a "
                            "structure out (absent), half keeping it whole, at the same scales (0: off)")
    group.add_argument("--workers", type=int, default=d.workers, help="augmentation threads")


def _output_flags(group, d):
    add_flags(group, "tta", tta=dict(default=d.tta, help="views averaged in the out-of-fold predictions that are "
                 "scored and tuned on, and by default in evaluate.py and submission.py: hflip adds the mirror image"))
    group.add_argument("--postprocess", choices=choices("postprocess"), default=d.postprocess,
                       help="tuned: presence and pixel thresholds, minimum area and largest component chosen on "
                            "the out-of-fold predictions (the gate only where enough of them lack the structure); "
                            "fixed: the defaults")
    add_flags(group, "results", "logs", results=dict(help="models, settings, predictions"))
    group.add_argument("--run", default=d.run, help="TensorBoard run name (unset: the date and time)")
    group.add_argument("--resume", action="store_true",
                       help="continue the unfinished run in --results from its last completed epoch, with its settings")
    group.add_argument("--force", action="store_true", help="start over although --results holds an unfinished run")
# fmt: on


def flip_list(text):
    """--flips as a tuple of names."""
    return tuple(f for f in text.split(",") if f and f != "none")


def parse_args(argv=None):
    """(the run's settings, whether to --resume, whether to --force): from the flags given, with the stored ones
    of the run to --resume or the --baseline preset under them; checked (RunConfig), size and length still unset
    where they are to be planned."""
    parser = flag_parser()
    settings = {f.name for f in dataclasses.fields(RunConfig)}
    # argparse fills in a default only where the namespace lacks the attribute: what is left unset was not given
    flags = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(settings, UNSET)))
    given = {k: v for k, v in vars(flags).items() if k in settings and v is not UNSET}
    if flags.resume:
        return checkpoint.resumed(given, given.get("results", RunConfig.results)), True, False
    if given.get("baseline"):
        given = {**BASELINE, **given}
    elif given.get("mask_loss") == "lovasz":
        given.setdefault("bce_weight", 0.0)  # the default cross-entropy term belongs to the Dice losses
    return RunConfig(**given), False, flags.force


def learning_rate(config, steps_per_epoch):
    """Adam's learning rate: a cosine decay over all training steps, or a constant that Plateau lowers."""
    if config.schedule == "plateau":
        return config.lr
    return keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=config.epochs * steps_per_epoch)


def compile_model(config, mean, std, steps_per_epoch, n_structures=1):
    synchronized = config.distribute != "none" and keras.backend.backend() == "tensorflow"
    net = unet.build_model(
        (*config.size, 1), config.base_filters, config.depth, config.dropout, mean, std, synchronized, n_structures
    )
    mask_loss = MASK_LOSSES[config.mask_loss]
    if config.bce_weight:
        mask_loss = unet.DiceBCELoss(config.mask_loss == "image", config.bce_weight)
    net.compile(
        optimizer=keras.optimizers.Adam(learning_rate(config, steps_per_epoch)),
        loss={"mask": mask_loss, "present": "binary_crossentropy"},
        loss_weights={"mask": config.dice_weight, "present": config.presence_weight},
        metrics={"mask": [unet.dice_coef], "present": [keras.metrics.BinaryAccuracy(name="accuracy")]},
    )
    return net


def batches(config, train, val, originals, start, n_structures):
    """The augmented training batches from epoch `start` on, and the validation batches as they are."""
    devices = inference.data_parallel_devices()
    train_batches = augment.AugmentedBatches(
        *train,
        config.batch_size,
        config.seed,
        epoch=start,
        flips=config.flips,
        elastic=config.elastic,
        scale=config.scale,
        gamma=config.gamma,
        workers=config.workers,
        multiple=devices,
        n_structures=n_structures,
        crops=config.crops,
        originals=originals,
    )
    val_batches = augment.AugmentedBatches(
        *val, config.batch_size, augment=False, shuffle=False, workers=0, multiple=devices, n_structures=n_structures
    )
    return train_batches, val_batches


def callbacks(config, val_batches, out_dir, log_dir, settings, state):
    """(the best-model checkpoint, which keeps the best score; the callbacks of one model's fit, in the order
    that puts the learning rate before the leaderboard score in each epoch's line)."""
    validation = monitor.Validation(val_batches, postprocess.untuned(config.presence_weight), settings["structures"])
    best = checkpoint.BestModel(out_dir, settings, best=state["best"] if state else -np.inf)
    plateau = (
        checkpoint.Plateau(state["plateau"] if state else None, monitor="val_loss", factor=0.25, patience=4, verbose=1)
        if config.schedule == "plateau"
        else None
    )
    return best, [
        monitor.LearningRateLog(),
        validation,
        best,
        *([plateau] if plateau else []),
        keras.callbacks.CSVLogger(str(out_dir / TRAINING_LOG_FILE), append=bool(state)),
        *monitor.tensorboard_callbacks(log_dir, validation),
        monitor.StopOnNonFinite(),
        monitor.StopOnInterrupt(),
        checkpoint.ResumePoint(out_dir, config.run, best, plateau),
    ]


def train_model(config, train, val, originals, out_dir, log_dir, settings, state=None, scope=contextlib.nullcontext):
    """Train one model on train = (images, masks), choosing its best epoch on val = (images, masks), from
    scratch or from a saved resume state; return the best score. Crop views are cut from originals = (the
    full-resolution images, label maps, each training image's row in them). The model is built in `scope`."""
    mean, std = float(train[0].mean()), float(train[0].std())
    start = state["epoch"] if state else 0
    n_structures = len(settings["structures"])
    train_batches, val_batches = batches(config, train, val, originals, start, n_structures)
    with scope():
        net = compile_model(config, mean, std, len(train_batches), n_structures)
        if state:
            checkpoint.restore(net, out_dir, state)
    if state:
        checkpoint.keep_epochs(out_dir / TRAINING_LOG_FILE, start)
        print(
            f"resuming after epoch {start} (best val_leaderboard so far {state['best']:.4f}, "
            f"learning rate {float(net.optimizer.learning_rate):.3g})"
        )
    print(
        f"model: {net.count_params():,} parameters, input {config.size[0]}x{config.size[1]}, "
        f"backend {keras.backend.backend()}, {keras.mixed_precision.dtype_policy().name}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    best, fitted = callbacks(config, val_batches, out_dir, log_dir, {**settings, "mean": mean, "std": std}, state)
    # no validation_data: monitor.Validation scores the validation set in one prediction, where fit's own pass
    # would predict it a second time. shuffle=False: AugmentedBatches already shuffles by (seed, epoch); Keras'
    # own shuffling of the batch order draws from a global random stream that a resumed run could not replay
    net.fit(
        train_batches,
        initial_epoch=start,
        epochs=config.epochs,
        callbacks=fitted,
        verbose=monitor.fit_verbosity(),
        shuffle=False,
    )
    return best.best


def fit_ood(config, out_dir, train_images, val_images, val_groups):
    """Give the saved best model its out-of-distribution output (nerve/ood.py) and print what the fit found."""
    net, report = ood.fit(inference.load_model(out_dir), train_images, val_images, val_groups, config.tta)
    checkpoint.update_model(out_dir, net, ood=report)
    flagged = report["held_out_flagged"]
    estimate = "" if flagged is None else f"; a threshold set on half the subjects flags {flagged:.1%} of the others"
    print(
        f"out-of-distribution score: threshold at distance {report['threshold_distance']:.1f} ({report['margin']:g} x "
        f"the validation frames' 99th percentile){estimate}"
    )


def out_of_fold(config, out_dir, images, frames, labels, val):
    """The saved best model's predictions on the held-out frames `val` (indices; `images` at the training size)
    and on one crop view of each (augment.held_out_crop of the frame at its own size), plain and of the mirror
    image mirrored back, the presence uncalibrated: the rows of oof.npz, frames first."""
    net = unet.calibrated(inference.load_model(out_dir), [1.0] * len(config.structures))
    crops = {i: augment.held_out_crop(frames[i], labels[i], [config.seed, i]) for i in val}
    viewed = [i for i in val if crops[i] is not None]
    views = [deploy.resize(augment.cropped(frames[i], crops[i]), config.size) for i in viewed]
    plain, flipped = inference.predict_views([net], np.concatenate([images, np.reshape(views, (-1, *config.size))]))
    names = ("probs", "present", "ood")
    rows = {**dict(zip(names, plain)), **{f"{name}_flip": value for name, value in zip(names, flipped)}}
    frames = np.full((len(val), 4), -1)
    boxes = np.reshape([crops[i] for i in viewed], (-1, 4))
    return {**rows, "index": np.r_[val, viewed], "crop": np.concatenate([frames, boxes]).astype(int)}


def calibrate(config, oof, truth, dirs):
    """Fit each structure's presence temperature on the out-of-fold predictions, put it into every model and
    calibrate `oof` with it; write the calibration's figures and reliability diagram."""
    views = ["present", "present_flip"] if config.tta == "hflip" else ["present"]
    before = np.mean([oof[v] for v in views], axis=0)
    temperature, held_out = postprocess.temperatures([oof[v] for v in views], truth, oof["fold"])
    for folder in dirs:
        net = unet.calibrated(inference.load_model(config.results / folder), temperature)
        checkpoint.update_model(config.results / folder, net, presence_temperature=temperature)
    for key in ("present", "present_flip"):
        oof[key] = postprocess.calibrate(oof[key], temperature)
    figures = {
        name: {
            "temperature": temperature[s],
            "ece_before": expected_calibration_error(before[:, s], truth[:, s]),
            "ece_after": expected_calibration_error(held_out[:, s], truth[:, s]),
        }
        for s, name in enumerate(config.structures)
    }
    write_json(config.results / CALIBRATION_FILE, figures)
    reliability_png(before, held_out, truth, config.structures, config.results / RELIABILITY_FILE)
    how = "each fold by the other folds' temperature" if len(dirs) > 1 else "on the images it was fitted on"
    for name, f in figures.items():
        print(
            f"presence of {name} calibrated at temperature {f['temperature']:.2f}: expected calibration error "
            f"{f['ece_before']:.3f} -> {f['ece_after']:.3f} ({how})"
        )


def training_labels(conflicts, arrays, masks):
    """Which frames to train on and their masks at the training size, after --conflicts."""
    if conflicts == "keep":
        return np.ones(len(masks), bool), masks
    pairs, distances, _ = neardup.near_pairs(arrays["train_images"], arrays["train_subjects"])
    one_empty = neardup.pair_stats(arrays["train_masks"], pairs)["one_empty"]
    use, fixed = neardup.resolve_conflicts(masks, pairs, distances, one_empty, conflicts)
    changed = np.count_nonzero(~use) if conflicts == "drop" else np.count_nonzero((fixed != masks).any(axis=(1, 2)))
    print(
        f"--conflicts {conflicts}: {changed} frames with an empty mask and a near-duplicate with a nerve "
        f"({np.count_nonzero(one_empty)} such pairs among {len(pairs)} near-duplicates)"
    )
    return use, fixed


def group_list(groups, shown=12):
    """The groups of a validation set, for its line in the log."""
    unique = sorted(set(groups.tolist()))
    return f"subjects {unique}" if len(unique) <= shown else f"{len(unique)} groups"


def held_out_sets(config, present, groups):
    """(one boolean validation mask per model, the models' folder names)."""
    if config.folds > 1:
        fold = splits.assign_folds(present, groups, config.folds, config.seed, config.split)
        held_out, dirs = [fold == k for k in range(config.folds)], [f"fold{k}" for k in range(config.folds)]
    else:
        held_out, dirs = (
            [splits.validation_split(present, groups, config.val_fraction, config.seed, config.split)],
            ["."],
        )
    if any(val.all() or not val.any() for val in held_out):
        raise UserError("a validation split is empty or takes everything: change --val-fraction or --folds")
    return held_out, dirs


def main(argv=None):
    config, resume, force = parse_args(argv)
    scope, replicas, chief = distribute(config.distribute)
    keras.utils.set_random_seed(config.seed)
    policy = unet.set_precision(config.precision)
    if config.batch_size % replicas:
        raise UserError(f"--batch-size {config.batch_size} does not split evenly over {replicas} devices")
    if replicas > 1:
        print(
            f"data parallel over {replicas} devices: global batch {config.batch_size}, "
            f"{config.batch_size // replicas} per device"
        )
    output_folder(config.logs, "--logs")
    with worker_outputs(config, chief, resume) as config, exclusive(config.results):
        if chief and not resume:
            checkpoint.check_unfinished(config.results, force)
        train_folds(config, resume, scope, policy)


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """The arrays a run trains on: each frame and label map at its own size, and at the network's."""

    arrays: dict
    frames: store.Frames  # the images at their own sizes
    labels: store.Frames  # their label maps
    images: np.ndarray  # the images at the training size
    masks: np.ndarray  # their label maps
    fit_masks: np.ndarray  # the label maps trained on, after --conflicts
    use: np.ndarray  # which frames are trained on, after --conflicts
    present: np.ndarray  # which frames show a structure
    held_out: list  # one boolean validation mask per model
    dirs: list  # the models' folder names


def planned(config, policy):
    """The run's final settings and its training set: the training size and length planned where the flags left
    them unset, the structures, backend and precision. The settings are not changed after this."""
    wanted = ("train_images", "train_masks", "train_ids", "train_subjects", "train_sizes")
    arrays = store.load_arrays(config.arrays, wanted)
    names = store.structures(config.arrays)
    # every stage sees each frame at its own size: the arrays' canvas is only how they are kept
    frames, labels = store.frames(arrays, "train_images"), store.frames(arrays, "train_masks")
    present = presence(arrays["train_masks"])
    held_out, dirs = held_out_sets(config, present, arrays["train_subjects"])
    size, epochs = config.size, config.epochs
    if size is None:
        size, why = planning.training_size(
            arrays["train_masks"], store.typical_size(arrays["train_sizes"]), names, config.depth
        )
        print(f"training size {why} (give --size to choose)")
    images, masks = augment.resize_images(frames, size), augment.resize_masks(labels, size, len(names))
    use, fit_masks = training_labels(config.conflicts, arrays, masks)
    if epochs is None:  # from the first model's training set: folds differ by a few images, the record is one
        epochs, why = planning.epochs(np.count_nonzero(~held_out[0] & use))
        print(f"training length {why} (give --epochs to choose)")
    config = config.replace(
        size=size,
        epochs=epochs,
        run=config.run or time.strftime("%Y%m%d-%H%M%S"),
        structures=tuple(names),
        backend=keras.backend.backend(),
        dtype_policy=policy,
    )
    return config, TrainingSet(arrays, frames, labels, images, masks, fit_masks, use, present, held_out, dirs)


def train_folds(config, resume, scope, policy):
    """Train the run's models (one, or one per fold), then tune post-processing on their held-out predictions."""
    started = time.time()
    config, data = planned(config, policy)
    states = {
        name: checkpoint.resume_state(config.results / name, config.run, config.results) if resume else None
        for name in data.dirs
    }
    checkpoint.write_run(config.results, config.record(), complete=False)
    oof = {}
    try:
        for k, (val, name) in enumerate(zip(data.held_out, data.dirs)):
            predictions = train_fold(config, data, k, val, name, states[name], scope)
            for key, value in {**predictions, "fold": np.full(len(predictions["index"]), k)}.items():
                oof.setdefault(key, []).append(value)
    except KeyboardInterrupt:
        raise UserError(
            f"interrupted. Completed epochs are saved: continue with "
            f"`python train.py --results {config.results} --resume`"
        ) from None
    except UserError as e:
        raise UserError(
            f"{e}\nCompleted epochs are saved: continue with `python train.py --results {config.results} --resume`"
        ) from None
    tune(config, data, {key: np.concatenate(value) for key, value in oof.items()})
    print(f"trained in {(time.time() - started) / 60:.1f} min; TensorBoard: tensorboard --logdir {config.logs}")


def train_fold(config, data, k, val, name, state, scope):
    """Train (or finish, or keep) one model with the frames `val` held out, fit its out-of-distribution score and
    return its out-of-fold predictions."""
    present, groups = data.present, data.arrays["train_subjects"]
    train = ~val & data.use
    print(
        f"{'fold ' + str(k) + ': ' if config.folds > 1 else ''}train: {np.count_nonzero(train)} images, "
        f"val: {np.count_nonzero(val)} images ({group_list(groups[val])}), "
        f"a structure in {present[~val].mean():.0%} / {present[val].mean():.0%}"
    )
    out_dir = config.results / name
    if state and state["epoch"] >= config.epochs:
        print(f"already trained: best val_leaderboard {state['best']:.4f}")
    else:
        settings = {**config.record(), "fold": k, "val_ids": data.arrays["train_ids"][val].tolist()}
        best = train_model(
            config,
            (data.images[train], data.fit_masks[train]),
            (data.images[val], data.masks[val]),
            (data.frames, data.labels, np.flatnonzero(train)),
            out_dir,
            config.logs / config.run / name,
            settings,
            state,
            scope,
        )
        print(f"best val_leaderboard {best:.4f}; model in {out_dir / MODEL_FILE}")
    fit_ood(config, out_dir, data.images[train], data.images[val], groups[val])
    predictions = out_of_fold(config, out_dir, data.images[val], data.frames, data.labels, np.flatnonzero(val))
    n_val = np.count_nonzero(val)
    monitor.model_pictures(
        out_dir,
        (data.frames, data.labels, data.arrays["train_ids"]),
        np.flatnonzero(val),
        present[val],
        predictions["probs"][:n_val],
        predictions["present"][:n_val],
        postprocess.untuned(config.presence_weight),
        config.structures,
    )
    return predictions


def tune(config, data, oof):
    """Calibrate the presence and choose the post-processing on the out-of-fold predictions; save both, the
    predictions and the ensemble; mark the run complete."""
    names = config.structures
    if config.presence_weight > 0:  # without a trained presence head there is nothing to calibrate
        truth = structure_presence(crossval.row_labels(data.labels, oof), len(names))
        calibrate(config, oof, truth, data.dirs)
    oof = crossval.save_oof(config.results / OOF_FILE, {**oof, "ids": data.arrays["train_ids"][oof["index"]]})
    write_state(config.results / ENSEMBLE_FILE, {"models": data.dirs})
    record = config.record()
    groups, spacing = data.arrays["train_subjects"], store.spacing(config.arrays, len(data.frames))
    report, worst = crossval.oof_report(oof, data.frames, data.labels, names, config.tta, record, groups, spacing)
    postprocess.save(config.results, report["postprocess"])
    crossval.print_report(report)
    print(f"post-processing for submission.py (chosen on all out-of-fold predictions): {report['postprocess']}")
    about = pages.about(config.results, config.arrays, data.arrays)
    written = crossval.write_report(config.results, report, crossval.CROSS_VALIDATED, worst, about)
    card = pages.write_card(config.results, pages.model_card(config.results))
    print(f"wrote {', '.join(map(str, written))} (evaluate.py prints them) and {card}")
    checkpoint.finish(config.results, record, data.dirs)


if __name__ == "__main__":
    run_cli(main)
