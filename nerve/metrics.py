"""Scores of hard masks against the truth, all from per-image pixel counts: the leaderboard Dice (1 where truth
and prediction are both empty), IoU, pixel precision and recall, presence accuracy, detection sensitivity and
specificity (a mask drawn or not, image by image), ROC AUC and calibration; and boundary distances (HD95,
ASSD, normalised surface Dice) of one pair of masks."""

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score


def presence(masks):
    """Whether each mask of (n, ...) marks any pixel."""
    masks = np.asarray(masks)
    return masks.reshape(len(masks), -1).any(axis=1)


def structure_presence(labels, n_structures):
    """(n, K): whether each label map marks structure k + 1, one map at a time (a memory-map stays on disk)."""
    return np.array([[np.any(np.asarray(m) == k + 1) for k in range(n_structures)] for m in labels], bool).reshape(
        -1, n_structures
    )


def pixel_counts(truth, masks):
    """Per-image true positive, false positive and false negative pixels of binary masks (n, ...)."""
    t = np.asarray(truth).reshape(len(truth), -1) != 0
    p = np.asarray(masks).reshape(len(masks), -1) != 0
    tp = np.count_nonzero(t & p, axis=1)
    return tp, np.count_nonzero(p, axis=1) - tp, np.count_nonzero(t, axis=1) - tp


def dice_from_counts(tp, fp, fn):
    """Per-image Dice from pixel counts: 1 where truth and prediction are both empty."""
    total = 2 * np.asarray(tp) + fp + fn
    return np.where(total == 0, 1.0, 2 * np.asarray(tp) / np.maximum(total, 1))


def leaderboard_dice(truth, masks):
    """Per-image Dice of binary masks (n, ...), as the Kaggle leaderboard scores it."""
    return dice_from_counts(*pixel_counts(truth, masks))


def structure_dice(truth, masks):
    """Per-image, per-structure leaderboard Dice (n, K) of label maps truth (n, ...) against 0/1 masks
    (n, ..., K)."""
    truth = np.asarray(truth)
    return np.stack([leaderboard_dice(truth == k + 1, masks[..., k]) for k in range(masks.shape[-1])], axis=-1)


def mean_dice(truth, masks):
    """The leaderboard score: mean per-image Dice over a set of masks."""
    return float(leaderboard_dice(truth, masks).mean())


def roc_auc(scores, labels):
    """Area under the ROC curve; nan when the labels hold a single class."""
    labels = np.asarray(labels, bool)
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


CALIBRATION_BINS = 10  # equal-width bins of predicted probability


def calibration_bins(probs, labels, bins=CALIBRATION_BINS):
    """Per equal-width bin of predicted probability: (images in it, their mean probability, the share of them
    that are positive)."""
    probs, labels = np.asarray(probs, np.float64).ravel(), np.asarray(labels, bool).ravel()
    which = np.minimum((probs * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    return (
        count,
        np.bincount(which, probs, bins) / np.maximum(count, 1),
        np.bincount(which, labels, bins) / np.maximum(count, 1),
    )


def expected_calibration_error(probs, labels, bins=CALIBRATION_BINS):
    """How far predicted probabilities are from the frequencies they claim: the mean over images of
    |mean probability - share positive| in their bin."""
    count, confidence, frequency = calibration_bins(probs, labels, bins)
    return float((count * np.abs(confidence - frequency)).sum() / max(count.sum(), 1))


def scores(tp, fp, fn, present):
    """The evaluation figures of one set of images, from their pixel counts and presence probabilities."""
    with_structure, predicted = (tp + fn) > 0, (tp + fp) > 0
    dice = dice_from_counts(tp, fp, fn)
    iou = tp / np.maximum(tp + fp + fn, 1)

    def over_positives(values):
        return float(values[with_structure].mean()) if with_structure.any() else float("nan")

    return {
        "images": int(len(tp)),
        "with_structure": int(with_structure.sum()),
        "dice_nonempty": over_positives(dice),
        "leaderboard": float(dice.mean()),
        "presence_accuracy": float((predicted == with_structure).mean()),
        "sensitivity": over_positives(predicted.astype(float)),
        "specificity": float((~predicted[~with_structure]).mean()) if (~with_structure).any() else float("nan"),
        "presence_auc": roc_auc(present, with_structure),
        "presence_ece": expected_calibration_error(present, with_structure),
        "iou_nonempty": over_positives(iou),
        "precision": float(tp.sum() / max(tp.sum() + fp.sum(), 1)),
        "recall": float(tp.sum() / max(tp.sum() + fn.sum(), 1)),
        "false_positive_pixels": int(fp.sum()),
        "false_negative_pixels": int(fn.sum()),
    }


# Boundary distances, with the conventions written once (docs/metrics.md): a mask's border is its pixels with a
# 4-neighbour outside it; distances are from each border pixel of one mask to the nearest border pixel of the
# other, in the unit of `spacing` (mm per row and per column, or (1, 1): pixels).
def _border(mask):
    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(2, 1), border_value=0)


def border_distances(truth, mask, spacing=(1.0, 1.0)):
    """(distances from truth's border to mask's, from mask's border to truth's) of two non-empty 2-D masks; only
    their joint bounding box is searched (the nearest border pixel of either lies inside it)."""
    both = truth | mask
    rows, cols = np.flatnonzero(both.any(axis=1)), np.flatnonzero(both.any(axis=0))
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    a, b = _border(truth[box]), _border(mask[box])
    to_b = ndimage.distance_transform_edt(~b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~a, sampling=spacing)
    return to_b[a], to_a[b]


def boundary_scores(truth, mask, spacing=(1.0, 1.0), tolerance=1.0):
    """HD95 and ASSD (the 95th percentile and the mean of both directions' distances, pooled) and NSD (the share
    of both borders within `tolerance` of the other) of two 2-D masks. Both empty: HD95 and ASSD undefined (nan),
    NSD 1; one empty: nan, nan and NSD 0."""
    truth, mask = np.asarray(truth, bool), np.asarray(mask, bool)
    if not truth.any() or not mask.any():
        return {"hd95": np.nan, "assd": np.nan, "nsd": float(not truth.any() and not mask.any())}
    distances = np.concatenate(border_distances(truth, mask, spacing))
    return {
        "hd95": float(np.percentile(distances, 95)),
        "assd": float(distances.mean()),
        "nsd": float(np.mean(distances <= tolerance)),
    }
