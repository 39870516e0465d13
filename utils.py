"""Shared constants, run-length encoding, the leaderboard metric, post-processing and the REPL helpers.

    >>> import utils
    >>> utils.inspect_set("val")        # predictions on the validation set, as a window or a PNG
    >>> utils.examine_generator()       # augmented training samples with their mask contours
"""
import contextlib
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

IMAGE_HEIGHT, IMAGE_WIDTH = 420, 580
INPUT_DIR, RESULTS_DIR, LOGS_DIR = Path("input"), Path("results"), Path("logs")

# The arrays data.py writes into the input folder, by name.
ARRAYS = ("train_images", "train_masks", "train_ids", "train_subjects", "test_images", "test_ids")
MANIFEST = "arrays.json"          # in the input folder: what data.py built the arrays from
SETTINGS_FILE = "settings.json"   # in results/: everything submission.py needs besides the weights
MODEL_FILE = "net.keras"          # the full-fidelity model; net.hdf5 beside it for legacy users


class UserError(Exception):
    """A problem the user can fix: printed as one message, without a traceback."""


def run_cli(main):
    """Run a script's main(), turning UserError and Ctrl-C into a one-line message."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    A failed write (a full disk, no permission) becomes a UserError that says the old file is intact."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # same suffix: savers pick formats by it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        kept = f"the earlier {path.name} is unchanged" if path.exists() else "nothing was written"
        raise UserError(f"could not write {path} ({e.strerror or e}); {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path):
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run `python train.py` first")
    return json.loads(path.read_text())


def parse_size(text):
    """'96x128' -> (96, 128); both sides must be positive."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"size {text!r} is not HxW, e.g. 96x128") from None
    if h <= 0 or w <= 0:
        raise UserError(f"size {text!r} must be positive")
    return h, w


def _array_problem(name, array):
    """What is wrong with one array data.py wrote, or None."""
    if name.endswith(("_images", "_masks")):
        expected = f"(n, {IMAGE_HEIGHT}, {IMAGE_WIDTH}) uint8"
        if array.dtype != np.uint8 or array.shape[1:] != (IMAGE_HEIGHT, IMAGE_WIDTH):
            return f"{name}.npy is {array.shape} {array.dtype}, expected {expected}"
    elif array.ndim != 1:
        return f"{name}.npy has shape {array.shape}, expected one value per image"
    return None


def load_arrays(input_dir, names):
    """Load the named arrays data.py wrote, memory-mapped, after checking that they belong together:
    shapes and dtypes as data.py writes them, one length per set, the counts in its manifest."""
    input_dir = Path(input_dir)
    missing = [n for n in names if not (input_dir / f"{n}.npy").exists()]
    if missing:
        raise UserError(f"{', '.join(missing)} not found in {input_dir}/: run `python data.py` first")
    arrays, problems = {}, []
    for name in names:
        try:
            arrays[name] = np.load(input_dir / f"{name}.npy", mmap_mode="r")
        except (ValueError, OSError) as e:  # truncated or not an .npy file at all
            problems.append(f"{name}.npy cannot be read ({e})")
            continue
        problem = _array_problem(name, arrays[name])
        if problem:
            problems.append(problem)
    manifest = input_dir / MANIFEST
    counts = json.loads(manifest.read_text()) if manifest.exists() else {}
    for prefix in ("train", "test"):
        lengths = {n: len(a) for n, a in arrays.items() if n.startswith(prefix + "_")}
        expected = counts.get(prefix, next(iter(lengths.values()), None))
        problems += [f"{n}.npy holds {k} {prefix} images, expected {expected}" for n, k in lengths.items()
                     if k != expected]
    if problems:
        raise UserError(f"the arrays in {input_dir}/ do not match what data.py writes (an older or interrupted "
                        f"run?); rebuild them with `python data.py --input {input_dir} --force`:\n  "
                        + "\n  ".join(problems))
    return arrays


def rle_encode(mask):
    """Kaggle run-length string of a 2-D mask: 1-based starts, column-major, '' when empty."""
    flat = np.asarray(mask).T.ravel() != 0
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flat, [False])).view(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    runs = np.empty(2 * len(starts), np.int64)
    runs[0::2], runs[1::2] = starts + 1, ends - starts
    return " ".join(map(str, runs))


def rle_decode(pixels, shape=(IMAGE_HEIGHT, IMAGE_WIDTH)):
    """Inverse of rle_encode: a uint8 0/1 mask of `shape` (height, width)."""
    h, w = shape
    flat = np.zeros(h * w + 1, np.int8)
    runs = np.array(str(pixels).split(), dtype=np.int64)
    if runs.size % 2 or (runs.size and (runs[0::2].min() < 1 or runs[1::2].min() < 1)):
        raise ValueError(f"not a run-length string: {str(pixels)[:40]!r}")
    starts, lengths = runs[0::2] - 1, runs[1::2]
    if runs.size and (starts + lengths).max() > h * w:
        raise ValueError(f"run-length string runs past {h}x{w} pixels")
    np.add.at(flat, starts, 1)
    np.add.at(flat, starts + lengths, -1)
    return (np.cumsum(flat[:-1]) > 0).astype(np.uint8).reshape(w, h).T


def dice_per_image(y_true, y_pred):
    """Per-image Dice of binary masks shaped (n, ...): 1 where both masks are empty."""
    t = np.asarray(y_true).reshape(len(y_true), -1) != 0
    p = np.asarray(y_pred).reshape(len(y_pred), -1) != 0
    inter = np.count_nonzero(t & p, axis=1)
    total = np.count_nonzero(t, axis=1) + np.count_nonzero(p, axis=1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def mean_dice(y_true, y_pred):
    """The leaderboard score: mean per-image Dice over a set of masks."""
    return float(dice_per_image(y_true, y_pred).mean())


# How probabilities become masks; train.py tunes these on out-of-fold predictions (results/postprocess.json).
DEFAULT_POSTPROCESS = {"presence_threshold": 0.5, "pixel_threshold": 0.5, "min_area": 0, "keep_largest": False}


def largest_component(mask):
    """The largest 8-connected component of a 0/1 mask."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 2:
        return mask
    return (labels == 1 + np.argmax(stats[1:, cv2.CC_STAT_AREA])).astype(np.uint8)


def binary_mask(prob, pixel_threshold, keep_largest):
    """One probability map -> 0/1 mask, optionally only its largest component."""
    mask = (prob >= pixel_threshold).astype(np.uint8)
    return largest_component(mask) if keep_largest else mask


def full_size(prob):
    """A probability map resized back to 420x580 (before thresholding, so edges stay smooth)."""
    return cv2.resize(np.asarray(prob, np.float32), (IMAGE_WIDTH, IMAGE_HEIGHT), interpolation=cv2.INTER_LINEAR)


def postprocess(probs, present, spec=None):
    """0/1 masks (n, h, w) from probabilities and presence: thresholded, optionally reduced to the
    largest component, and emptied when presence or predicted area is under the spec's gate."""
    spec = {**DEFAULT_POSTPROCESS, **(spec or {})}
    masks = np.stack([binary_mask(p, spec["pixel_threshold"], spec["keep_largest"]) for p in probs]) \
        if len(probs) else np.zeros(np.shape(probs), np.uint8)
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    keep = (np.asarray(present).reshape(-1) >= spec["presence_threshold"]) & (areas >= spec["min_area"])
    return masks * keep[:, None, None].astype(np.uint8)


# Overlay colours: distinct under the common colour-vision deficiencies (yellow / red / blue differ in lightness)
TRUE_POSITIVE, FALSE_POSITIVE, FALSE_NEGATIVE = (255, 215, 0), (230, 30, 30), (30, 130, 255)
OVERLAY_ALPHA = 0.5


def overlay(image, truth, prediction=None):
    """RGB uint8 of a gray image with true-positive, false-positive and false-negative pixels tinted;
    without a prediction, the truth mask alone in the true-positive colour."""
    rgb = np.repeat(np.asarray(image, np.float32)[..., None], 3, axis=2)
    t = np.asarray(truth) != 0
    p = t if prediction is None else np.asarray(prediction) != 0
    for pixels, colour in ((t & p, TRUE_POSITIVE), (p & ~t, FALSE_POSITIVE), (t & ~p, FALSE_NEGATIVE)):
        rgb[pixels] = (1 - OVERLAY_ALPHA) * rgb[pixels] + OVERLAY_ALPHA * np.array(colour, np.float32)
    return rgb.astype(np.uint8)


def pyplot():
    """matplotlib.pyplot, drawing off-screen when there is no display."""
    import matplotlib

    if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Write a matplotlib figure to `path` atomically and close it; return the path as a string."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    pyplot().close(fig)
    return str(path)


def show_or_save(fig, path):
    """Open a window when the backend can, otherwise write `path` and return it."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template"):
        pyplot().show()
        return None
    return save_figure(fig, path)


def overlay_grid(images, truths, predictions, titles, cols):
    """A figure of images with their masks tinted by overlay(); predictions may be None (truth only)."""
    from matplotlib.patches import Patch

    plt = pyplot()
    predictions = [None] * len(images) if predictions is None else predictions
    rows = max(1, -(-len(images) // cols))
    h, w = np.shape(images)[1:3]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 3.2 * h / w + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, truth, prediction, title in zip(axes.ravel(), images, truths, predictions, titles):
        ax.imshow(overlay(image, truth, prediction))
        ax.set_title(title, fontsize=8)
    legend = [("mask", TRUE_POSITIVE)] if all(p is None for p in predictions) else \
        [("true positive", TRUE_POSITIVE), ("false positive", FALSE_POSITIVE), ("false negative", FALSE_NEGATIVE)]
    fig.legend(handles=[Patch(color=np.array(c) / 255, label=name) for name, c in legend], loc="upper center",
               ncol=len(legend), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return fig


def training_curves(log_csv, path):
    """A PNG of a training_log.csv: losses, validation scores and the learning rate per epoch."""
    import csv

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"{log_csv} has no epochs yet")
    epoch = np.array([int(r["epoch"]) + 1 for r in rows])
    column = {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if k != "epoch"}
    losses = [k for k in column if k.endswith("loss") and not k.startswith("val_")]
    scores = [k for k in ("val_leaderboard", "val_mask_dice_coef", "val_present_accuracy") if k in column]
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    for i, k in enumerate(losses):  # training dashed, validation solid, one colour per loss
        axes[0].plot(epoch, column[k], "--", color=f"C{i}", label=k)
        if "val_" + k in column:
            axes[0].plot(epoch, column["val_" + k], "-o", markersize=3, color=f"C{i}", label="val_" + k)
    for k in scores:
        axes[1].plot(epoch, column[k], "-o", markersize=3, label=k)
    if "learning_rate" in column:
        axes[2].plot(epoch, column["learning_rate"], "-o", markersize=3)
        axes[2].set_yscale("log")
    for ax, title in zip(axes, ("losses", "validation scores", "learning rate")):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def inspect_set(subset="val", n=16, results=RESULTS_DIR, input_dir=INPUT_DIR, seed=0, cols=4):
    """Show n images of the train or val set with true-positive, false-positive and false-negative pixels tinted.

    Titles give the image id, the presence probability and the per-image Dice. After
    `train.py --folds K` this is the first fold's model on its own validation subjects. Returns the
    PNG path when no display is available, otherwise None after showing a window.
    """
    import submission

    if subset not in ("train", "val"):
        raise UserError(f"subset must be 'train' or 'val', not {subset!r}")
    folder = submission.model_dirs(results)[0]
    settings = read_json(folder / SETTINGS_FILE)
    arrays = load_arrays(input_dir, ("train_images", "train_masks", "train_ids"))
    is_val = np.isin(arrays["train_ids"], settings["val_ids"])
    pool = np.flatnonzero(is_val if subset == "val" else ~is_val)
    pick = np.sort(np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False))
    images, truth = arrays["train_images"][pick], arrays["train_masks"][pick]
    chunks = list(submission.predict_masks([submission.load_model(folder)], tuple(settings["size"]), images,
                                           submission.load_postprocess(results)))
    masks, present = np.concatenate([m for m, _ in chunks]), np.concatenate([p for _, p in chunks])
    dice = dice_per_image(truth, masks)
    titles = [f"{i}  p={p:.2f}  dice={d:.2f}" for i, p, d in zip(arrays["train_ids"][pick], present, dice)]
    fig = overlay_grid(images, truth, masks, titles, cols)
    return show_or_save(fig, Path(results) / f"inspect_{subset}.png")


def examine_generator(n=16, input_dir=INPUT_DIR, size=(96, 128), seed=0, cols=4, results=RESULTS_DIR, **augment):
    """Show n augmented training samples at `size` with their masks tinted.

    Extra keyword arguments go to augment.AugmentedBatches (e.g. flips=("horizontal", "vertical")).
    Returns the PNG path when no display is available.
    """
    import augment as aug

    arrays = load_arrays(input_dir, ("train_images", "train_masks"))
    idx = np.sort(np.random.default_rng(seed).choice(len(arrays["train_images"]), size=n, replace=False))
    images = aug.resize_images(arrays["train_images"][idx], size)
    masks = aug.resize_masks(arrays["train_masks"][idx], size)
    batches = aug.AugmentedBatches(images, masks, batch_size=n, seed=seed, shuffle=False, **augment)
    x, y = batches[0]
    titles = [f"sample {i}  nerve={int(p)}" for i, p in enumerate(y["present"].ravel())]
    fig = overlay_grid(x[..., 0], y["mask"][..., 0], None, titles, cols)
    return show_or_save(fig, Path(results) / "examine_generator.png")
