"""Near-duplicate frames: pairs of one subject whose pixels correlate above a threshold, and those whose masks
disagree (duplicates.py reports them; train.py --conflicts acts on them)."""

import cv2
import numpy as np

from nerve.metrics import leaderboard_dice, presence

SIGNATURE = (44, 32)  # width, height of the signature


CANDIDATE_MARGIN = 2.0  # a signature distance under this many thresholds makes a candidate pair


THRESHOLD = 0.01  # full-resolution distance under which two frames are the same view (correlation 0.99)


CONFLICT_DICE = 0.5  # duplicates whose masks agree less than this conflict


def standardised(x):
    """Rows of x as float32 with zero mean and unit norm: their dot product is their correlation."""
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def signatures(images):
    """Standardised small copies of uint8 frames (n, h, w)."""
    return standardised(np.stack([cv2.resize(im, SIGNATURE, interpolation=cv2.INTER_AREA) for im in images]))


def frame_distance(images, a, b):
    """1 - the Pearson correlation of frames a and b at full resolution."""
    return 1.0 - float(np.prod(standardised(images[[a, b]]), axis=0).sum())


def near_pairs(images, groups, threshold=THRESHOLD, progress=None):
    """Frame pairs of one subject closer than threshold at full resolution, as (pairs (k, 2), distances (k,)),
    and the signature distances of every within-subject pair (for the histogram)."""
    sig = signatures(images)
    pairs, distances, every = [], [], []
    for group in np.unique(groups):
        idx = np.flatnonzero(groups == group)
        first, second = np.triu_indices(len(idx), 1)
        rough = 1.0 - np.einsum("ij,ij->i", sig[idx[first]], sig[idx[second]])
        every.append(rough)
        for k in np.flatnonzero(rough < CANDIDATE_MARGIN * threshold):
            a, b = idx[first[k]], idx[second[k]]
            exact = frame_distance(images, a, b)
            if exact < threshold:
                pairs.append((a, b))
                distances.append(exact)
        if progress:
            progress(len(idx))
    return (
        np.array(pairs, int).reshape(-1, 2),
        np.array(distances, float),
        np.concatenate(every) if every else np.zeros(0),
    )


def nearest_frame_agreement(images, masks, groups, threshold=THRESHOLD):
    """How far the labels agree with themselves: for each frame with a nerve, the Dice of its mask with that of
    the closest other frame of its subject (by signature), and whether that frame is a duplicate (closer than
    threshold at full resolution). Annotators who drew every view alike would score 1 throughout."""
    sig = signatures(images)
    agreement, duplicate = [], []
    for group in np.unique(groups):
        idx = np.flatnonzero(groups == group)
        if len(idx) < 2:
            continue
        closeness = sig[idx] @ sig[idx].T
        np.fill_diagonal(closeness, -np.inf)
        for row, a in enumerate(idx):
            b = idx[np.argmax(closeness[row])]
            m = np.asarray(masks[[a, b]])
            if m[0].any():
                agreement.append(leaderboard_dice(m[:1], m[1:])[0])
                duplicate.append(frame_distance(images, a, b) < threshold)
    return np.array(agreement), np.array(duplicate, bool)


def pair_stats(masks, pairs, dice=CONFLICT_DICE):
    """Per pair: the two mask areas, their Dice, whether exactly one is empty, and whether they conflict.
    One pair at a time: the masks may be a memory-mapped array larger than memory."""
    area, agreement = np.zeros((len(pairs), 2), int), np.zeros(len(pairs))
    for k, (a, b) in enumerate(pairs):
        m = np.asarray(masks[[a, b]])
        area[k] = np.count_nonzero(m.reshape(2, -1), axis=1)
        agreement[k] = leaderboard_dice(m[:1], m[1:])[0]
    one_empty = (area[:, 0] > 0) != (area[:, 1] > 0)
    return {"area": area, "dice": agreement, "one_empty": one_empty, "conflict": one_empty | (agreement < dice)}


def resolve_conflicts(masks, pairs, distances, one_empty, mode):
    """Training frames to use (bool) and their masks, after dealing with the pairs with one empty mask:
    'keep' them, 'drop' the empty-masked frame, or 'relabel' it with its twin's mask (the closest twin's)."""
    masks, use = np.array(masks), np.ones(len(masks), bool)
    if mode == "keep":
        return use, masks
    present = presence(masks)
    for k in np.argsort(-distances):  # farthest first, so that the closest twin's mask is the one that stays
        if one_empty[k]:
            marked, empty = pairs[k] if present[pairs[k, 0]] else pairs[k, ::-1]
            if mode == "drop":
                use[empty] = False
            else:
                masks[empty] = masks[marked]
    return use, masks
