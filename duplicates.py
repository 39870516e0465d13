"""Find near-identical train frames within each subject, and the pairs whose masks disagree.

    python duplicates.py                   # results/duplicates.csv, duplicates_hist.png, duplicates_pairs.png
    python duplicates.py --threshold 0.02  # looser: more pairs

The Kaggle frames are shuffled video: two frames can show almost the same image with one mask marked and
the other empty, and such contradictions cap any model's score. Distance is 1 - the Pearson correlation
of two frames' pixels. A 32x44 signature of every frame (speckle averages out) finds candidates within a
subject; only candidates are compared at full resolution. A duplicate pair conflicts when exactly one of
its masks is empty, or when its masks' Dice is under --dice. `train.py --conflicts drop|relabel` acts on
the pairs with one empty mask.
"""

import csv

from common import (
    DUPLICATES_FILE,
    DUPLICATES_HIST_FILE,
    DUPLICATES_PAIRS_FILE,
    UserError,
    add_flags,
    arg_parser,
    atomic_path,
    output_folder,
    run_cli,
)

import cv2
import numpy as np
from tqdm import tqdm

from data import load_arrays
from figures import overlay_grid, pyplot, save_figure
from metrics import leaderboard_dice, presence

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


def near_pairs(images, subjects, threshold=THRESHOLD, progress=None):
    """Frame pairs of one subject closer than threshold at full resolution, as (pairs (k, 2), distances (k,)),
    and the signature distances of every within-subject pair (for the histogram)."""
    sig = signatures(images)
    pairs, distances, every = [], [], []
    for subject in np.unique(subjects):
        idx = np.flatnonzero(subjects == subject)
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


def nearest_frame_agreement(images, masks, subjects, threshold=THRESHOLD):
    """How far the labels agree with themselves: for each frame with a nerve, the Dice of its mask with that of
    the closest other frame of its subject (by signature), and whether that frame is a duplicate (closer than
    threshold at full resolution). Annotators who drew every view alike would score 1 throughout."""
    sig = signatures(images)
    agreement, duplicate = [], []
    for subject in np.unique(subjects):
        idx = np.flatnonzero(subjects == subject)
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


def write_pairs_csv(path, ids, pairs, distances, stats):
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id_a", "id_b", "distance", "area_a", "area_b", "dice", "one_empty", "conflict"])
        for k, (a, b) in enumerate(pairs):
            out.writerow(
                [
                    ids[a],
                    ids[b],
                    f"{distances[k]:.5f}",
                    *stats["area"][k],
                    f"{stats['dice'][k]:.3f}",
                    int(stats["one_empty"][k]),
                    int(stats["conflict"][k]),
                ]
            )


def histogram_png(every, threshold, path):
    """Histogram of within-subject signature distances, on a log scale, with the thresholds marked."""
    fig, ax = pyplot().subplots(figsize=(8, 4))
    ax.hist(np.maximum(every, 1e-6), bins=np.logspace(-6, 0.5, 80), color="0.4")
    ax.axvline(threshold, color="red", label=f"duplicate threshold {threshold:g} (full resolution)")
    ax.axvline(CANDIDATE_MARGIN * threshold, color="orange", linestyle="--", label="candidate limit (signature)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="1 - correlation of two frames of one subject (signature)",
        ylabel="pairs",
        title=f"{len(every):,} within-subject frame pairs",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def pairs_png(images, masks, ids, pairs, distances, path, n):
    """The n closest conflicting pairs side by side, each frame with its mask tinted."""
    order = np.argsort(distances)[:n]
    frames = [i for k in order for i in pairs[k]]
    titles = [
        f"{ids[i]} ({int(np.count_nonzero(masks[i]))} px)" + (f"  d={distances[k]:.4f}" if j else "")
        for k in order
        for j, i in enumerate(pairs[k])
    ]
    fig = overlay_grid(np.asarray(images[frames]), np.asarray(masks[frames]), None, titles, cols=4)
    return save_figure(fig, path)


def main(argv=None):
    ap = arg_parser(__doc__)
    ap.add_argument("--threshold", type=float, default=THRESHOLD, help="largest 1 - correlation for a duplicate")
    ap.add_argument(
        "--dice", type=float, default=CONFLICT_DICE, help="duplicates whose masks' Dice is below this conflict"
    )
    ap.add_argument("--show", type=int, default=8, help=f"conflicting pairs drawn in {DUPLICATES_PAIRS_FILE}")
    add_flags(ap, "input", "results", results=dict(help="where the CSV and figures go"))
    args = ap.parse_args(argv)
    if not 0 < args.threshold < 1 or not 0 <= args.dice <= 1 or args.show < 0:
        raise UserError("--threshold must be in (0, 1), --dice in [0, 1], --show at least 0")

    output_folder(args.results, "--results")
    arrays = load_arrays(args.input, ("train_images", "train_masks", "train_ids", "train_subjects"))
    images, masks, ids = arrays["train_images"], arrays["train_masks"], arrays["train_ids"]
    with tqdm(total=len(ids), desc="comparing frames", unit="img", leave=False) as bar:
        pairs, distances, every = near_pairs(images, arrays["train_subjects"], args.threshold, bar.update)
    stats = pair_stats(masks, pairs, args.dice)
    conflict, one_empty = stats["conflict"], stats["one_empty"]
    write_pairs_csv(args.results / DUPLICATES_FILE, ids, pairs, distances, stats)
    print(
        f"{len(pairs)} near-identical pairs among {len(ids)} frames; {int(conflict.sum())} conflict "
        f"({int(one_empty.sum())} with one mask empty, {int((conflict & ~one_empty).sum())} with Dice < {args.dice})"
    )
    written = [
        args.results / DUPLICATES_FILE,
        histogram_png(every, args.threshold, args.results / DUPLICATES_HIST_FILE),
    ]
    if conflict.any() and args.show:
        written.append(
            pairs_png(
                images,
                masks,
                ids,
                pairs[conflict],
                distances[conflict],
                args.results / DUPLICATES_PAIRS_FILE,
                args.show,
            )
        )
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    run_cli(main)
