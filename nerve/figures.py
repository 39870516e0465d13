"""Pictures: masks tinted over images, grids of them, and training curves. One structure: true positive,
false positive and false negative pixels tinted. Several: each structure in its colour, its predicted pixels
filled and its true outline drawn. Every picture is written atomically, or shown in a window where a display
allows."""

import csv
import io
import os
from pathlib import Path

from nerve.common import UserError, atomic_path

import cv2
import numpy as np

from nerve.metrics import calibration_bins, structure_dice

# Distinct under the common colour-vision deficiencies: yellow, red and blue differ in lightness too
TRUE_POSITIVE, FALSE_POSITIVE, FALSE_NEGATIVE = (255, 215, 0), (230, 30, 30), (30, 130, 255)
OVERLAY_ALPHA = 0.5
# Okabe-Ito colours, one per structure: orange, sky blue, bluish green, yellow, blue, vermillion, purple
STRUCTURE_COLOURS = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0)]
STRUCTURE_COLOURS.append((204, 121, 167))


def structure_colour(k):
    """The colour of structure k (0-based)."""
    return STRUCTURE_COLOURS[k % len(STRUCTURE_COLOURS)]


def _tint(rgb, pixels, colour, alpha=OVERLAY_ALPHA):
    rgb[pixels] = (1 - alpha) * rgb[pixels] + alpha * np.array(colour, np.float32)


def overlay(image, truth, prediction=None, n_structures=1):
    """RGB uint8 of a gray image with label maps drawn over it. One structure: true-positive, false-positive
    and false-negative pixels tinted (without a prediction, the truth alone in the true-positive colour).
    Several: each structure's predicted pixels filled and its true outline drawn, in its colour."""
    rgb = np.repeat(np.asarray(image, np.float32)[..., None], 3, axis=2)
    truth = np.asarray(truth)
    if n_structures == 1:
        t = truth != 0
        p = t if prediction is None else np.asarray(prediction) != 0
        for pixels, colour in ((t & p, TRUE_POSITIVE), (p & ~t, FALSE_POSITIVE), (t & ~p, FALSE_NEGATIVE)):
            _tint(rgb, pixels, colour)
        return rgb.astype(np.uint8)
    width = max(1, round(max(truth.shape) / 150))  # an outline a person sees at any image size
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    for k in range(n_structures):
        colour = structure_colour(k)
        if prediction is not None:
            _tint(rgb, np.asarray(prediction) == k + 1, colour)
        t = (truth == k + 1).astype(np.uint8)
        edge = cv2.morphologyEx(t, cv2.MORPH_GRADIENT, kernel) > 0 if prediction is not None else t > 0
        _tint(rgb, edge, colour, 1.0 if prediction is not None else OVERLAY_ALPHA)
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


def overlay_grid(images, truths, predictions, titles, cols, names=("nerve",)):
    """A figure of images with their label maps drawn by overlay(); predictions may be None (truth only).
    `names`: the structures, for the legend."""
    from matplotlib.patches import Patch

    plt = pyplot()
    predictions = [None] * len(images) if predictions is None else predictions
    rows = max(1, -(-len(images) // cols))
    h, w = np.shape(images[0])[:2] if len(images) else (1, 1)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 3.2 * h / w + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, truth, prediction, title in zip(axes.ravel(), images, truths, predictions, titles):
        ax.imshow(overlay(image, truth, prediction, len(names)))
        ax.set_title(title, fontsize=8)
    if len(names) > 1:
        marks = "predicted: filled, truth: outline" if any(p is not None for p in predictions) else "truth"
        legend = [(f"{name} ({marks})" if k == 0 else name, structure_colour(k)) for k, name in enumerate(names)]
    elif all(p is None for p in predictions):
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


def label_dice(truth, predicted, n_structures):
    """Per-image Dice of two lists of label maps, averaged over the structures."""
    return np.array(
        [
            structure_dice(t[None], np.stack([p == k for k in range(1, n_structures + 1)], axis=-1)[None]).mean()
            for t, p in zip(truth, predicted)
        ]
    )


def cases_png(images, truth, masks, ids, path, names=("nerve",)):
    """A PNG of the given cases (label maps of the truth and the prediction) titled with their Dice, drawn
    by overlay()."""
    titles = [f"{i}  dice={d:.2f}" for i, d in zip(ids, label_dice(truth, masks, len(names)))]
    return save_figure(overlay_grid(list(images), truth, masks, titles, 4, names), path)


def training_curves(log_csv, path):
    """A PNG of a training log: losses, validation scores and the learning rate per epoch."""
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"{log_csv} has no epochs yet")
    epoch = np.array([int(r["epoch"]) + 1 for r in rows])
    column = {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if k != "epoch"}
    losses = [k for k in column if k.endswith("loss") and not k.startswith("val_")]
    scores = [k for k in column if k.startswith("val_leaderboard")]
    scores += [k for k in ("val_mask_dice_coef", "val_present_accuracy") if k in column]
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


UNKNOWN_SCAN = "not a scan this model knows"  # what an overlay says where the out-of-distribution score is high
UNKNOWN_COLOUR = (255, 255, 255)


def annotated(image, labels, present, names, unknown=False):
    """RGB uint8 of a gray image with each structure's predicted outline in its colour and, in the corner,
    each structure's name and presence probability, or UNKNOWN_SCAN where the scan is `unknown`: readable at a
    glance, frame by frame (OpenCV only)."""
    rgb = cv2.cvtColor(np.asarray(image), cv2.COLOR_GRAY2RGB)
    thickness = max(1, round(max(rgb.shape[:2]) / 250))
    scale = max(0.4, max(rgb.shape[:2]) / 900)
    lines = [(UNKNOWN_SCAN, UNKNOWN_COLOUR)] if unknown else []
    for k, name in enumerate(names):
        colour = structure_colour(k)
        region = (np.asarray(labels) == k + 1).astype(np.uint8)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(rgb, contours, -1, colour, thickness, cv2.LINE_AA)
        if not unknown:
            lines.append((f"{name} {float(present[k]):.2f}" + ("" if region.any() else " (none)"), colour))
    for row, (text, colour) in enumerate(lines):
        origin = (8, round((row + 1) * 26 * scale + 4))
        cv2.putText(rgb, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(rgb, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
    return rgb


def reliability_png(before, after, truth, names, path):
    """A reliability diagram per structure: in each bin of predicted presence, the share of images that show
    the structure, before and after calibration (the diagonal is perfect calibration)."""
    fig, axes = pyplot().subplots(1, len(names), figsize=(4.5 * len(names), 4.2), squeeze=False)
    for s, (ax, name) in enumerate(zip(axes[0], names)):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1)
        for probs, label, marker in ((before, "before", "o"), (after, "calibrated, out of fold", "s")):
            count, confidence, frequency = calibration_bins(probs[:, s], truth[:, s])
            used = count > 0
            ax.plot(confidence[used], frequency[used], f"-{marker}", markersize=4, label=label)
        ax.set(title=f"{name} presence", xlabel="predicted probability", ylabel="share with the structure")
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, Path(path))


def png_bytes(fig):
    """A matplotlib figure as PNG bytes (for a page that embeds it), closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    pyplot().close(fig)
    return buffer.getvalue()


def per_group_figure(rows, names, distance):
    """Per structure, each group's mean Dice and mean `distance` (HD95) over its images that show the structure,
    the groups in order of Dice: where a model fails, subject by subject."""
    fig, axes = pyplot().subplots(2, len(names), figsize=(5.5 * len(names), 6), squeeze=False)
    for s, name in enumerate(names):
        mine = [r for r in rows if r["structure"] == name and r["truth_present"]]
        groups = sorted({str(r["group"]) for r in mine})
        dice = {g: np.mean([r["dice"] for r in mine if str(r["group"]) == g]) for g in groups}
        order = sorted(groups, key=dice.get)
        far = {g: [r[distance] for r in mine if str(r["group"]) == g and r["shown"]] for g in order}
        far = {g: np.mean(v) if v else np.nan for g, v in far.items()}
        for ax, values, label in ((axes[0, s], dice, "Dice"), (axes[1, s], far, distance.replace("_", " in "))):
            ax.plot(range(len(order)), [values[g] for g in order], "o", color=np.array(structure_colour(s)) / 255)
            ax.set(ylabel=label, xticks=range(len(order)))
            ax.set_xticklabels(order, rotation=90, fontsize=7)
        axes[0, s].set(title=f"{name}: per group, images that show it", ylim=(0, 1))
        axes[1, s].set(xlabel="group (in order of Dice)")
    fig.tight_layout()
    return fig


def roc_figure(rows, names, summary):
    """Per structure, the ROC curve of the presence against the truth with its AUC, and the operating point the
    gate gives (its sensitivity and specificity)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, axes = pyplot().subplots(1, len(names), figsize=(4.5 * len(names), 4.2), squeeze=False)
    for s, (ax, name) in enumerate(zip(axes[0], names)):
        mine = [r for r in rows if r["structure"] == name]
        truth = np.array([r["truth_present"] for r in mine], bool)
        ax.plot([0, 1], [0, 1], color="0.6", lw=1)
        ax.set(title=f"{name} presence", xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02))
        if truth.all() or not truth.any():
            ax.text(0.5, 0.5, "no ROC curve: every image\n" + ("shows it" if truth.all() else "lacks it"), ha="center")
            continue
        presence = [r["presence"] for r in mine]
        fpr, tpr, _ = roc_curve(truth, presence)
        ax.plot(fpr, tpr, color=np.array(structure_colour(s)) / 255, label=f"AUC {roc_auc_score(truth, presence):.3f}")
        figures = summary[name]["figures"]
        ax.plot(1 - figures["specificity"]["value"], figures["sensitivity"]["value"], "ko", label="at the gate")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
