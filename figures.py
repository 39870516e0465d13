"""Pictures: masks tinted over images (true positive, false positive, false negative), grids of them, and
training curves. Every picture is written atomically, or shown in a window where a display allows."""

import csv
import os
from pathlib import Path

from common import UserError, atomic_path

import numpy as np

from metrics import leaderboard_dice

# Distinct under the common colour-vision deficiencies: yellow, red and blue differ in lightness too
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
    if all(p is None for p in predictions):
        legend = [("mask", TRUE_POSITIVE)]
    else:
        legend = [
            ("true positive", TRUE_POSITIVE),
            ("false positive", FALSE_POSITIVE),
            ("false negative", FALSE_NEGATIVE),
        ]
    handles = [Patch(color=np.array(c) / 255, label=name) for name, c in legend]
    fig.legend(handles=handles, loc="upper center", ncol=len(legend), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return fig


def cases_png(images, truth, masks, ids, path):
    """A PNG of the given cases titled with their Dice, with true/false positive and false negative pixels tinted."""
    titles = [f"{i}  dice={d:.2f}" for i, d in zip(ids, leaderboard_dice(truth, masks))]
    return save_figure(overlay_grid(np.asarray(images), truth, masks, titles, cols=4), path)


def training_curves(log_csv, path):
    """A PNG of a training log: losses, validation scores and the learning rate per epoch."""
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
        if (column["learning_rate"] > 0).all():  # a cosine decay ends at 0, which a log scale cannot show
            axes[2].set_yscale("log")
    for ax, title in zip(axes, ("losses", "validation scores", "learning rate")):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, Path(path))
