"""Score predictions against labelled masks, and choose post-processing on out-of-fold predictions.

    python evaluate.py                  # cross-validated: the out-of-fold predictions train.py kept
    python evaluate.py --input DIR      # the trained model(s) on a labelled Kaggle-layout folder

Reports mean Dice on images with a nerve, the leaderboard score (mean per-image Dice, 1 when truth and
prediction are both empty), presence accuracy and ROC AUC, IoU, pixel precision and recall, and false
positive / negative pixel counts, as a table and results/evaluation.json, with a PNG of the worst cases.
In the cross-validated report, each fold's post-processing is tuned on the other folds only.
"""
import argparse
import itertools
import math
from pathlib import Path

import numpy as np

from utils import (DEFAULT_POSTPROCESS, INPUT_DIR, RESULTS_DIR, SETTINGS_FILE, UserError, binary_mask, overlay_grid,
                   dice_per_image, full_size, load_arrays, postprocess, read_json, run_cli, save_figure, write_json)

OOF_FILE = "oof.npz"  # in results/: out-of-fold predictions at the training size
PIXEL_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
PRESENCE_THRESHOLDS = tuple(np.round(np.arange(0.0, 0.96, 0.05), 2))
MIN_AREAS = (0, 250, 500, 1000, 1500, 2000, 3000, 4000)  # pixels at 580x420; Kaggle nerves average ~7000
WORST = 8  # cases shown in the worst-cases PNG
CANDIDATES = list(itertools.product(PIXEL_THRESHOLDS, (False, True)))  # (pixel threshold, keep largest)


def mask_stats(probs, truth, candidates):
    """Predicted area and overlap with the truth, per (pixel threshold, keep largest) candidate and image,
    at full size: every gate and metric follows from these counts without keeping masks. `truth` is
    iterated in step with `probs`, one mask at a time."""
    area = np.zeros((len(candidates), len(probs)))
    inter = np.zeros_like(area)
    truth_area = np.zeros(len(probs), int)
    for i, (prob, t) in enumerate(zip(probs, truth)):
        prob, t = full_size(prob), np.asarray(t) > 0
        truth_area[i] = np.count_nonzero(t)
        for c, (threshold, keep_largest) in enumerate(candidates):
            m = binary_mask(prob, threshold, keep_largest) > 0
            area[c, i], inter[c, i] = np.count_nonzero(m), np.count_nonzero(m & t)
    return {"candidates": list(candidates), "area": area, "inter": inter, "truth_area": truth_area}


def outcome(area, inter, truth_area, present, presence_threshold, min_area):
    """Per-image true positive, false positive and false negative pixels after the gate."""
    kept = (present >= presence_threshold) & (area >= min_area)
    tp = np.where(kept, inter, 0)
    fp = np.where(kept, area - inter, 0)
    return tp, fp, truth_area - tp


def dice(tp, fp, fn):
    total = 2 * tp + fp + fn
    return np.where(total == 0, 1.0, 2 * tp / np.maximum(total, 1))


def tune_postprocess(stats, present, idx):
    """The post-processing with the best leaderboard score on images idx."""
    best, best_score = None, -1.0
    for c, (threshold, keep_largest) in enumerate(stats["candidates"]):
        area, inter, truth_area = stats["area"][c, idx], stats["inter"][c, idx], stats["truth_area"][idx]
        for p, a in itertools.product(PRESENCE_THRESHOLDS, MIN_AREAS):
            score = dice(*outcome(area, inter, truth_area, present[idx], p, a)).mean()
            if score > best_score + 1e-12:
                best_score = score
                best = {"presence_threshold": float(p), "pixel_threshold": float(threshold),
                        "min_area": int(a), "keep_largest": bool(keep_largest)}
    return best


def roc_auc(scores, labels):
    """Area under the ROC curve (Mann-Whitney, ties counted half); nan with a single class."""
    labels = np.asarray(labels, bool)
    pos, neg = np.asarray(scores)[labels], np.asarray(scores)[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def metrics(tp, fp, fn, present):
    """The evaluation figures for one set of images."""
    nerve = (tp + fn) > 0
    predicted = (tp + fp) > 0
    per_image = dice(tp, fp, fn)
    iou = tp / np.maximum(tp + fp + fn, 1)
    return {
        "images": int(len(tp)), "with_nerve": int(nerve.sum()),
        "dice_nonempty": float(per_image[nerve].mean()) if nerve.any() else float("nan"),
        "leaderboard": float(per_image.mean()),
        "presence_accuracy": float((predicted == nerve).mean()),
        "presence_auc": roc_auc(present, nerve),
        "iou_nonempty": float(iou[nerve].mean()) if nerve.any() else float("nan"),
        "precision": float(tp.sum() / max(tp.sum() + fp.sum(), 1)),
        "recall": float(tp.sum() / max(tp.sum() + fn.sum(), 1)),
        "false_positive_pixels": int(fp.sum()), "false_negative_pixels": int(fn.sum()),
    }


def _spec_outcome(stats, present, spec, idx):
    c = stats["candidates"].index((spec["pixel_threshold"], spec["keep_largest"]))
    return outcome(stats["area"][c, idx], stats["inter"][c, idx], stats["truth_area"][idx], present[idx],
                   spec["presence_threshold"], spec["min_area"])


def oof_predictions(oof, tta):
    probs = (oof["probs"].astype(np.float32) + oof["probs_flip"]) / 2 if tta else oof["probs"]
    present = (oof["present"] + oof["present_flip"]) / 2 if tta else oof["present"]
    return probs, present


def cross_validate(oof, masks, tta=True, baseline=False):
    """Per-fold and overall metrics of out-of-fold predictions against masks[oof["index"]], each fold
    post-processed with settings tuned on the other folds (defaults with a single fold), and the settings
    tuned on all of them. A baseline gets no presence gate and no tuning: a 0.5 pixel threshold only."""
    probs, present = oof_predictions(oof, tta)
    stats = mask_stats(probs, (masks[i] for i in oof["index"]), CANDIDATES)  # a memory-map stays on disk
    folds = np.unique(oof["fold"])
    fixed = {**DEFAULT_POSTPROCESS, "presence_threshold": 0.0} if baseline else DEFAULT_POSTPROCESS
    tp, fp, fn = (np.zeros(len(probs)) for _ in range(3))
    rows, specs = {}, {}
    for k in folds:
        idx = np.flatnonzero(oof["fold"] == k)
        others = np.flatnonzero(oof["fold"] != k)
        specs[int(k)] = tune_postprocess(stats, present, others) if not baseline and len(others) else fixed
        tp[idx], fp[idx], fn[idx] = _spec_outcome(stats, present, specs[int(k)], idx)
        rows[f"fold {k}"] = metrics(tp[idx], fp[idx], fn[idx], present[idx])
    rows["all folds"] = metrics(tp, fp, fn, present)
    everything = np.arange(len(probs))
    final = fixed if baseline else tune_postprocess(stats, present, everything)
    return {"rows": rows, "fold_postprocess": specs, "postprocess": final,
            "dice": dice(tp, fp, fn), "present": present, "probs": probs}


def table(rows):
    """A plain-text table of metrics, one row per set."""
    cols = [("images", "{:d}"), ("with_nerve", "{:d}"), ("dice_nonempty", "{:.4f}"), ("leaderboard", "{:.4f}"),
            ("presence_accuracy", "{:.4f}"), ("presence_auc", "{:.4f}"), ("iou_nonempty", "{:.4f}"),
            ("precision", "{:.4f}"), ("recall", "{:.4f}"), ("false_positive_pixels", "{:d}"),
            ("false_negative_pixels", "{:d}")]
    header = ["set"] + [c for c, _ in cols]
    body = [[name] + [fmt.format(r[c]) for c, fmt in cols] for name, r in rows.items()]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *body])


def cases_png(images, truth, masks, ids, path):
    """A PNG of the given cases with their Dice, true/false positive and false negative pixels tinted."""
    titles = [f"{i}  dice={d:.2f}" for i, d in zip(ids, dice_per_image(truth, masks))]
    return save_figure(overlay_grid(np.asarray(images), truth, masks, titles, cols=4), path)


def evaluate_oof(results, input_dir, tta):
    """Cross-validated report from results/oof.npz: (report, images, truth, masks, ids) for the worst cases.
    A --baseline run is scored as the tutorials used it: no mirror averaging, no tuned gate."""
    import submission

    path = Path(results) / OOF_FILE
    if not path.exists():
        raise UserError(f"{path} not found: run `python train.py` (with --folds K for K-fold) first")
    oof = dict(np.load(path))
    baseline = read_json(submission.model_dirs(results)[0] / SETTINGS_FILE).get("baseline", False)
    arrays = load_arrays(input_dir, ("train_images", "train_masks", "train_ids"))
    index = oof["index"]
    if index.max(initial=-1) >= len(arrays["train_ids"]) or not np.array_equal(arrays["train_ids"][index], oof["ids"]):
        raise UserError(f"the arrays in {input_dir}/ are not the ones train.py used for {path}: pass --data")
    tta = tta and not baseline
    report = {**cross_validate(oof, arrays["train_masks"], tta, baseline), "tta": tta}
    worst = np.argsort(report["dice"], kind="stable")[:WORST]
    masks = {i: postprocess(full_size(report["probs"][i])[None], report["present"][i:i + 1],
                            report["fold_postprocess"][int(oof["fold"][i])])[0] for i in worst}
    return (report, arrays["train_images"][index[worst]], arrays["train_masks"][index[worst]],
            [masks[i] for i in worst], oof["ids"][worst])


def evaluate_folder(results, folder, tta, batch_size=32):
    """The trained model(s) with their post-processing on a labelled folder (Kaggle layout or arrays)."""
    import data
    import submission

    folder = Path(folder)
    if not (folder / "train_images.npy").exists() and (folder / "train").is_dir():
        print(data.convert(folder))
    arrays = load_arrays(folder, ("train_images", "train_masks", "train_ids"))
    nets, size = submission.load_models(results)
    spec = submission.load_postprocess(results)
    images, truth = arrays["train_images"], arrays["train_masks"]
    chunks = list(submission.predict_chunks(nets, size, images, batch_size, tta))
    probs, present = np.concatenate([p for p, _ in chunks]), np.concatenate([q for _, q in chunks])
    stats = mask_stats(probs, truth, [(spec["pixel_threshold"], spec["keep_largest"])])
    tp, fp, fn = _spec_outcome(stats, present, spec, np.arange(len(probs)))
    scores = dice(tp, fp, fn)
    worst = np.argsort(scores, kind="stable")[:WORST]
    masks = postprocess(np.stack([full_size(probs[i]) for i in worst]), present[worst], spec)
    report = {"rows": {folder.name or str(folder): metrics(tp, fp, fn, present)}, "postprocess": spec, "tta": tta}
    return report, images[worst], truth[worst], list(masks), arrays["train_ids"][worst]


def finite(obj):
    """`obj` with every non-finite float inside it replaced by None, for strict JSON readers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, default=None,
                    help="a labelled folder (Kaggle layout, or the arrays data.py wrote) to predict and score; "
                         "default: the cross-validated out-of-fold predictions")
    ap.add_argument("--data", type=Path, default=INPUT_DIR, help="the arrays train.py used (default: input)")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR,
                    help="what train.py wrote; evaluation.json and worst_cases.png go here (default: %(default)s)")
    ap.add_argument("--tta", choices=("hflip", "none"), default="hflip",
                    help="test-time augmentation: average with the mirrored image (default: %(default)s)")
    args = ap.parse_args(argv)
    tta = args.tta == "hflip"
    if args.input is None:
        report, images, truth, masks, ids = evaluate_oof(args.results, args.data, tta)
        name = "cross-validated"
    else:
        report, images, truth, masks, ids = evaluate_folder(args.results, args.input, tta)
        name = args.input.name
    print(table(report["rows"]))
    out = {"evaluated": name, "tta": "hflip" if report["tta"] else "none", "metrics": report["rows"],
           "postprocess": report["postprocess"]}
    if "fold_postprocess" in report:
        out["fold_postprocess"] = report["fold_postprocess"]
    write_json(args.results / "evaluation.json", finite(out))  # strict JSON: no NaN for an AUC without negatives
    png = cases_png(images, truth, masks, ids, args.results / "worst_cases.png")
    print(f"wrote {args.results / 'evaluation.json'} and {png}")


if __name__ == "__main__":
    run_cli(main)
