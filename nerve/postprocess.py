"""Post-processing: how probabilities become masks, and how that is chosen on out-of-fold predictions; and the
presence's calibration, a temperature per structure fitted on them.

A spec has four knobs: the pixel threshold, whether to keep only the largest component, and the gate,
which empties a mask whose presence probability is under `presence_threshold` or whose area (at the image's
own size, as a share of its pixels) is under `min_area_fraction`. Each structure has its own spec. train.py
tunes them on the out-of-fold predictions of a K-fold run and saves them to results/postprocess.json;
evaluate.py, submission.py and utils apply that file through load() and deploy.apply_each(), the one
implementation an exported model's application calls too.

The temperature T divides each view's presence logit before the sigmoid (Guo et al., 2017), fitted by the
cross-entropy of the presence averaged over views, so that a presence of 0.9 means about nine in ten; train.py
puts it into every model (model.calibrated) before the post-processing is tuned on the calibrated presence.
"""

import itertools
from pathlib import Path

from nerve.common import (
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    POSTPROCESS_FILE,
    Fraction,
    StateFile,
    UserError,
    read_state,
    write_state,
)

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from sklearn.metrics import log_loss

from nerve.deploy import DEFAULT, binary_mask, full_size, gate, upgraded
from nerve.metrics import dice_from_counts


class Spec(StateFile):
    """How one structure's probabilities become masks (deploy.DEFAULT's keys)."""

    presence_threshold: Fraction
    pixel_threshold: Fraction
    min_area_fraction: Fraction
    keep_largest: bool


class Postprocess(StateFile):
    """postprocess.json: each structure's spec, by name."""

    structures: dict[str, Spec]


NO_GATE = {**DEFAULT, "presence_threshold": 0.0}  # for a run without a trained presence head

# The grid tune() searches
PIXEL_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
PRESENCE_THRESHOLDS = tuple(np.round(np.arange(0.0, 0.96, 0.05), 2))
# the gate's areas: 0 to 4000 pixels of a 420x580 Kaggle frame, as shares of an image
MIN_AREA_FRACTIONS = tuple(a / (IMAGE_HEIGHT * IMAGE_WIDTH) for a in (0, 250, 500, 1000, 1500, 2000, 3000, 4000))
CANDIDATES = list(itertools.product(PIXEL_THRESHOLDS, (False, True)))  # (pixel threshold, keep largest)
# A gate learns from the images that lack the structure. Tuned on a few of them, it empties more true masks
# on new images than it saves (docs/experiments.md), so with fewer than this it keeps its default.
MIN_EMPTY_TO_GATE = 30
LOG_TEMPERATURES = (np.log(0.05), np.log(20.0))  # the range a temperature is searched in
EPSILON = 1e-6  # presence is clipped to [EPSILON, 1 - EPSILON] before its logit: saturated sigmoids stay finite


def untuned(presence_weight):
    """The spec a run uses before (or instead of) tuning: the defaults, without the gate when the presence
    head was not trained."""
    return DEFAULT if presence_weight > 0 else NO_GATE


def for_run(settings):
    """A run's (untuned spec, whether it tunes its post-processing out of fold: --postprocess tuned)."""
    return untuned(settings["presence_weight"]), settings["postprocess"] == "tuned"


def load(results, structures):
    """The tuned spec of each structure from results/ (a list in the order of `structures`), defaults where
    the file is absent."""
    path = Path(results) / POSTPROCESS_FILE
    if not path.exists():
        return [dict(DEFAULT) for _ in structures]
    remedy = "delete it to use the defaults, or retrain with `python train.py` to tune it again"
    stored = read_state(path, Postprocess, remedy, lambda flat: _earlier_file(flat, structures))["structures"]
    missing = [name for name in structures if name not in stored]
    if missing:
        raise UserError(f"{path} has no spec for {', '.join(missing)}: {remedy}")
    return [{key: stored[name][key] for key in DEFAULT} for name in structures]


def _earlier_file(stored, structures):
    """Release 2 wrote one structure's spec at the top level; releases before this one, the gate's area in pixels."""
    stored = stored if "structures" in stored else {"structures": {structures[0]: stored}}
    specs = stored["structures"]
    if isinstance(specs, dict):
        stored["structures"] = {k: upgraded(v) if isinstance(v, dict) else v for k, v in specs.items()}
    return stored


def save(results, specs):
    """Write {structure name: spec} to results/postprocess.json."""
    write_state(Path(results) / POSTPROCESS_FILE, {"structures": specs})


def mask_stats(probs, truth, candidates=CANDIDATES):
    """Predicted area and overlap with the truth at each image's own size, per (pixel threshold, keep largest)
    candidate and image: every gate and score follows from these counts without keeping masks. `truth` is
    iterated in step with `probs`, one label map at a time (a memory-map stays on disk)."""
    area = np.zeros((len(candidates), len(probs)))
    inter = np.zeros_like(area)
    truth_area, pixels = np.zeros(len(probs), int), np.ones(len(probs))
    for i, (prob, t) in enumerate(zip(probs, truth)):
        t = np.asarray(t) > 0
        prob = full_size(prob, t.shape)
        truth_area[i], pixels[i] = np.count_nonzero(t), t.size
        for c, (threshold, keep_largest) in enumerate(candidates):
            m = binary_mask(prob, threshold, keep_largest) > 0
            area[c, i], inter[c, i] = np.count_nonzero(m), np.count_nonzero(m & t)
    stats = {"candidates": list(candidates), "area": area, "inter": inter, "truth_area": truth_area}
    return {**stats, "fraction": area / pixels}  # the gate's unit: a share of each image's own pixels


def counts_under(stats, present, spec, idx):
    """Per-image true positive, false positive and false negative pixels of images idx under a spec."""
    c = stats["candidates"].index((spec["pixel_threshold"], spec["keep_largest"]))
    area, inter = stats["area"][c, idx], stats["inter"][c, idx]
    kept = gate(present[idx], stats["fraction"][c, idx], spec)
    tp = np.where(kept, inter, 0)
    return tp, np.where(kept, area - inter, 0), stats["truth_area"][idx] - tp


def can_gate(stats, idx):
    """Whether images idx hold enough without the structure to tune a gate on."""
    return np.count_nonzero(stats["truth_area"][idx] == 0) >= MIN_EMPTY_TO_GATE


def tune(stats, present, idx, prior=DEFAULT):
    """The spec with the best mean leaderboard Dice on images idx; unless can_gate(), the gate stays prior's."""
    best, best_score = None, -1.0
    min_areas, presences = MIN_AREA_FRACTIONS, PRESENCE_THRESHOLDS
    if not can_gate(stats, idx):
        min_areas, presences = [prior["min_area_fraction"]], [prior["presence_threshold"]]
    for (threshold, keep_largest), p, a in itertools.product(stats["candidates"], presences, min_areas):
        spec = {
            "presence_threshold": float(p),
            "pixel_threshold": float(threshold),
            "min_area_fraction": float(a),
            "keep_largest": bool(keep_largest),
        }
        score = dice_from_counts(*counts_under(stats, present, spec, idx)).mean()
        if score > best_score + 1e-12:
            best, best_score = spec, score
    return best


def cross_fit(stats, present, fold, prior=DEFAULT, tuned=True):
    """Per fold, the spec tuned on the other folds only (prior with a single fold), and the spec tuned on all
    folds together: {fold: spec}, spec. Untuned, prior everywhere."""
    if not tuned:
        return {int(k): prior for k in np.unique(fold)}, prior
    specs = {}
    for k in np.unique(fold):
        others = np.flatnonzero(fold != k)
        specs[int(k)] = tune(stats, present, others, prior) if len(others) else prior
    return specs, tune(stats, present, np.arange(len(fold)), prior)


def calibrate(present, temperature):
    """Presence probabilities (n, K) with each structure's logit divided by its temperature (K,)."""
    return expit(logit(np.clip(np.asarray(present, np.float64), EPSILON, 1 - EPSILON)) / np.asarray(temperature))


def fit_temperature(views, truth):
    """The temperature that minimises the cross-entropy of one structure's presence, views (v, n) averaged after
    calibration, against whether each image shows it; 1 where the images are all of one kind."""
    if truth.all() or not truth.any():
        return 1.0

    def loss(log_t):
        return log_loss(truth, np.mean([calibrate(v, np.exp(log_t)) for v in views], axis=0), labels=[False, True])

    return float(np.exp(minimize_scalar(loss, bounds=LOG_TEMPERATURES, method="bounded").x))


def temperatures(views, truth, fold):
    """Each structure's temperature fitted on all images, and each image's presence calibrated by the one fitted
    on the other folds (with one fold, on itself): [K], (n, K). views: presence (n, K) per view; truth (n, K)."""
    views = np.stack([np.asarray(v, np.float64) for v in views])
    structures = range(views.shape[-1])
    final = [fit_temperature(views[..., s], truth[:, s]) for s in structures]
    held_out = np.zeros(views.shape[1:])
    for k in np.unique(fold):
        idx, others = fold == k, fold != k
        if not others.any():
            others = idx
        t = [fit_temperature(views[:, others, s], truth[others, s]) for s in structures]
        held_out[idx] = np.mean([calibrate(v, t) for v in views[:, idx]], axis=0)
    return final, held_out
