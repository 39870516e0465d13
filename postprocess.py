"""Post-processing: how probabilities become masks, and how that is chosen on out-of-fold predictions.

A spec has four knobs: the pixel threshold, whether to keep only the largest component, and the gate,
which empties a mask whose presence probability is under `presence_threshold` or whose area (at full size)
is under `min_area`. train.py tunes the spec on the out-of-fold predictions of a K-fold run and saves it to
results/postprocess.json; evaluate.py, submission.py and utils apply that file through load() and apply().
"""

import itertools
from pathlib import Path

from common import BOOLEAN, POSTPROCESS_FILE, RESULTS_DIR, integer, number, read_state, write_state

import cv2
import numpy as np

from augment import full_size
from metrics import dice_from_counts

DEFAULT = {"presence_threshold": 0.5, "pixel_threshold": 0.5, "min_area": 0, "keep_largest": False}
FIELDS = {
    "presence_threshold": number(0, 1),
    "pixel_threshold": number(0, 1),
    "min_area": integer(0),
    "keep_largest": BOOLEAN,
}
NO_GATE = {**DEFAULT, "presence_threshold": 0.0}  # for a run without a trained presence head

# The grid tune() searches
PIXEL_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
PRESENCE_THRESHOLDS = tuple(np.round(np.arange(0.0, 0.96, 0.05), 2))
MIN_AREAS = (0, 250, 500, 1000, 1500, 2000, 3000, 4000)  # pixels at 580x420; Kaggle nerves average ~7000
CANDIDATES = list(itertools.product(PIXEL_THRESHOLDS, (False, True)))  # (pixel threshold, keep largest)


def gate(present, area, spec):
    """Which masks survive: presence probability and predicted area both at or above the spec's thresholds."""
    return (np.asarray(present).reshape(-1) >= spec["presence_threshold"]) & (np.asarray(area) >= spec["min_area"])


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


def apply(probs, present, spec=None):
    """0/1 masks (n, h, w) from probabilities (n, h, w) and presence (n,) under a spec (DEFAULT if None)."""
    spec = {**DEFAULT, **(spec or {})}
    if not len(probs):
        return np.zeros(np.shape(probs), np.uint8)
    masks = np.stack([binary_mask(p, spec["pixel_threshold"], spec["keep_largest"]) for p in probs])
    keep = gate(present, masks.reshape(len(masks), -1).sum(axis=1), spec)
    return masks * keep[:, None, None].astype(np.uint8)


def untuned(presence_weight):
    """The spec a run uses before (or instead of) tuning: the defaults, without the gate when the presence
    head was not trained."""
    return DEFAULT if presence_weight > 0 else NO_GATE


def fixed_for(settings):
    """None for a run that tunes its post-processing out of fold (--postprocess tuned), else its fixed spec."""
    return None if settings["postprocess"] == "tuned" else untuned(settings["presence_weight"])


def load(results=RESULTS_DIR, **overrides):
    """The tuned spec from results/, defaults where absent, with the overrides that are not None on top."""
    path = Path(results) / POSTPROCESS_FILE
    if path.exists():
        remedy = "delete it to use the defaults, or retrain with `python train.py --folds K` to tune it again"
        stored = read_state(path, FIELDS, remedy)
        spec = {key: stored[key] for key in DEFAULT}
    else:
        spec = dict(DEFAULT)
    return {**spec, **{k: v for k, v in overrides.items() if v is not None}}


def save(results, spec):
    write_state(Path(results) / POSTPROCESS_FILE, spec)


def mask_stats(probs, truth, candidates=CANDIDATES):
    """Predicted area and overlap with the truth at full size, per (pixel threshold, keep largest) candidate
    and image: every gate and score follows from these counts without keeping masks. `truth` is iterated in
    step with `probs`, one full-size mask at a time (a memory-map stays on disk)."""
    area = np.zeros((len(candidates), len(probs)))
    inter = np.zeros_like(area)
    truth_area = np.zeros(len(probs), int)
    for i, (prob, t) in enumerate(zip(probs, truth)):
        t = np.asarray(t) > 0
        prob = full_size(prob, t.shape)
        truth_area[i] = np.count_nonzero(t)
        for c, (threshold, keep_largest) in enumerate(candidates):
            m = binary_mask(prob, threshold, keep_largest) > 0
            area[c, i], inter[c, i] = np.count_nonzero(m), np.count_nonzero(m & t)
    return {"candidates": list(candidates), "area": area, "inter": inter, "truth_area": truth_area}


def counts_under(stats, present, spec, idx):
    """Per-image true positive, false positive and false negative pixels of images idx under a spec."""
    c = stats["candidates"].index((spec["pixel_threshold"], spec["keep_largest"]))
    area, inter = stats["area"][c, idx], stats["inter"][c, idx]
    kept = gate(present[idx], area, spec)
    tp = np.where(kept, inter, 0)
    return tp, np.where(kept, area - inter, 0), stats["truth_area"][idx] - tp


def tune(stats, present, idx):
    """The spec with the best mean leaderboard Dice on images idx."""
    best, best_score = None, -1.0
    for (threshold, keep_largest), p, a in itertools.product(stats["candidates"], PRESENCE_THRESHOLDS, MIN_AREAS):
        spec = {
            "presence_threshold": float(p),
            "pixel_threshold": float(threshold),
            "min_area": int(a),
            "keep_largest": bool(keep_largest),
        }
        score = dice_from_counts(*counts_under(stats, present, spec, idx)).mean()
        if score > best_score + 1e-12:
            best, best_score = spec, score
    return best


def cross_fit(stats, present, fold, fixed=None):
    """Per fold, the spec tuned on the other folds only (or `fixed`; DEFAULT with a single fold), and the
    spec tuned on all folds together (or `fixed`): {fold: spec}, spec."""
    specs = {}
    for k in np.unique(fold):
        others = np.flatnonzero(fold != k)
        specs[int(k)] = fixed or (tune(stats, present, others) if len(others) else DEFAULT)
    return specs, fixed or tune(stats, present, np.arange(len(fold)))
