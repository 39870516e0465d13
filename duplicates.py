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

from nerve.common import (
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

import numpy as np
from tqdm import tqdm

from nerve.figures import overlay_grid, pyplot, save_figure
from nerve.neardup import CANDIDATE_MARGIN, CONFLICT_DICE, THRESHOLD, near_pairs, pair_stats
from nerve.store import load_arrays


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
    add_flags(ap, "arrays", "results", results=dict(help="where the CSV and figures go"))
    args = ap.parse_args(argv)
    if not 0 < args.threshold < 1 or not 0 <= args.dice <= 1 or args.show < 0:
        raise UserError("--threshold must be in (0, 1), --dice in [0, 1], --show at least 0")

    output_folder(args.results, "--results")
    arrays = load_arrays(args.arrays, ("train_images", "train_masks", "train_ids", "train_subjects"))
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
