"""Validation splits: which images each model is scored on.

Frames of one subject are near-duplicates, so whole subjects are held out by default
(scikit-learn's StratifiedGroupKFold), with the share of images showing a structure kept close to the
whole set's; `by="image"` stratifies single images instead (StratifiedKFold). A single validation split
is the first of round(1 / val_fraction) such folds, so one algorithm serves both.
"""

import warnings

from nerve.common import UserError

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold


def assign_folds(present, groups, folds, seed, by="subject"):
    """Fold number (0 .. folds - 1) of every image: each group in exactly one fold, stratified by `present`."""
    present = np.asarray(present, bool)
    if by == "subject":
        n_groups = len(np.unique(groups))
        if n_groups < folds:
            raise UserError(
                f"{n_groups} subjects cannot fill {folds} subject-grouped folds: use fewer --folds (or --split image)"
            )
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    fold = np.zeros(len(present), int)
    with warnings.catch_warnings():
        # "the least populated class has fewer members than n_splits": a set almost without empty images
        # (or without any) is still split by group; the stratification is only as good as it can be
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(present)), present, groups)):
            fold[held_out] = k
    return fold


def validation_split(present, groups, val_fraction, seed, by="subject"):
    """Boolean mask of the images held out for validation: about val_fraction of them."""
    folds = max(2, round(1 / val_fraction))
    if by == "subject":
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            raise UserError("only one subject: a subject-grouped split is impossible; use --split image")
        folds = min(folds, n_groups)
    return assign_folds(present, groups, folds, seed, by) == 0
