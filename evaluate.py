"""Score predictions against labelled masks.

    python evaluate.py                  # cross-validated: the out-of-fold predictions train.py kept
    python evaluate.py --input DIR      # the trained model(s) on a labelled Kaggle-layout folder

Reports mean Dice on images with a nerve, the leaderboard score (mean per-image Dice, 1 when truth and
prediction are both empty), presence accuracy and ROC AUC, IoU, pixel precision and recall, and false
positive / negative pixel counts, as a table and results/evaluation.json, with a PNG of the worst cases.
In the cross-validated report, each fold's post-processing is tuned on the other folds only.
"""

import math
import zipfile
from pathlib import Path

from common import (
    EVALUATION_FILE,
    INPUT_DIR,
    OOF_FILE,
    WORST_CASES_FILE,
    UserError,
    add_flags,
    arg_parser,
    atomic_path,
    exclusive,
    read_settings,
    run_cli,
    write_json,
)

import numpy as np

import data
import inference
import postprocess
from augment import full_size
from figures import cases_png
from metrics import dice_from_counts, scores

WORST = 8  # cases shown in the worst-cases PNG
COLUMNS = [
    ("images", "{:d}"),
    ("with_nerve", "{:d}"),
    ("dice_nonempty", "{:.4f}"),
    ("leaderboard", "{:.4f}"),
    ("presence_accuracy", "{:.4f}"),
    ("presence_auc", "{:.4f}"),
    ("iou_nonempty", "{:.4f}"),
    ("precision", "{:.4f}"),
    ("recall", "{:.4f}"),
    ("false_positive_pixels", "{:d}"),
    ("false_negative_pixels", "{:d}"),
]


def oof_views(oof, tta):
    """A run's out-of-fold (probabilities, presence), averaged over the views `tta` names."""
    views = [(oof["probs"], oof["present"])]
    if tta == "hflip":
        views.append((oof["probs_flip"], oof["present_flip"]))
    return inference.mean_of_views(views)


def cross_validate(oof, masks, tta="hflip", fixed=None):
    """Per-fold and overall scores of out-of-fold predictions against masks[oof["index"]], each fold
    post-processed with the spec tuned on the other folds (or `fixed`), and the spec tuned on all of them."""
    probs, present = oof_views(oof, tta)
    stats = postprocess.mask_stats(probs, (masks[i] for i in oof["index"]))
    fold_specs, final = postprocess.cross_fit(stats, present, oof["fold"], fixed)
    tp, fp, fn = (np.zeros(len(probs)) for _ in range(3))
    rows = {}
    for k, spec in fold_specs.items():
        idx = np.flatnonzero(oof["fold"] == k)
        tp[idx], fp[idx], fn[idx] = postprocess.counts_under(stats, present, spec, idx)
        rows[f"fold {k}"] = scores(tp[idx], fp[idx], fn[idx], present[idx])
    rows["all folds"] = scores(tp, fp, fn, present)
    return {
        "rows": rows,
        "fold_postprocess": fold_specs,
        "postprocess": final,
        "dice": dice_from_counts(tp, fp, fn),
        "present": present,
        "probs": probs,
    }


def table(rows):
    """A plain-text table of scores, one row per set."""
    header = ["set"] + [c for c, _ in COLUMNS]
    body = [[name] + [fmt.format(r[c]) for c, fmt in COLUMNS] for name, r in rows.items()]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *body])


OOF_KEYS = ("probs", "probs_flip", "present", "present_flip", "index", "fold", "ids")


def save_oof(path, oof):
    """Write the out-of-fold predictions (OOF_KEYS) atomically, the probability maps as float16 (they are
    the largest file of a run); return them as stored, so scores computed from it match a later load."""
    oof = {**oof, "probs": oof["probs"].astype(np.float16), "probs_flip": oof["probs_flip"].astype(np.float16)}
    with atomic_path(path) as tmp:
        np.savez(tmp, **{key: oof[key] for key in OOF_KEYS})
    return oof


def load_oof(path):
    """The out-of-fold predictions train.py kept, checked: every array there, one length for all."""
    remedy = "retrain with `python train.py` (with --folds K for K-fold)"
    if not path.is_file():
        raise UserError(f"{path} not found: {remedy}")
    try:
        with np.load(path) as stored:
            oof = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} cannot be read ({e}; damaged?): {remedy}") from None
    missing = [key for key in OOF_KEYS if key not in oof]
    lengths = {len(oof[key]) for key in OOF_KEYS if key in oof}
    if missing or len(lengths) > 1:
        raise UserError(
            f"{path} does not hold what train.py writes (missing: {', '.join(missing) or 'none'}; "
            f"lengths {sorted(lengths)}): {remedy}"
        )
    return oof


def evaluate_oof(results, input_dir, tta=None):
    """Cross-validated report from results/oof.npz, scored with the run's views and post-processing choice
    unless `tta` says otherwise: (report, images, truth, masks, ids) of the worst cases."""
    path = Path(results) / OOF_FILE
    oof = load_oof(path)
    settings = read_settings(inference.model_dirs(results)[0])
    tta = tta or settings["tta"]
    arrays = data.load_arrays(input_dir, ("train_images", "train_masks", "train_ids"))
    index = oof["index"]
    if index.max(initial=-1) >= len(arrays["train_ids"]) or not np.array_equal(arrays["train_ids"][index], oof["ids"]):
        raise UserError(f"the arrays in {input_dir}/ are not the ones train.py used for {path}: pass --data")
    report = {**cross_validate(oof, arrays["train_masks"], tta, postprocess.fixed_for(settings)), "tta": tta}
    worst = np.argsort(report["dice"], kind="stable")[:WORST]
    masks = [
        postprocess.apply(
            full_size(report["probs"][i])[None],
            report["present"][i : i + 1],
            report["fold_postprocess"][int(oof["fold"][i])],
        )[0]
        for i in worst
    ]
    return report, arrays["train_images"][index[worst]], arrays["train_masks"][index[worst]], masks, oof["ids"][worst]


def evaluate_folder(results, folder, tta=None, batch_size=32):
    """The trained model(s) with their post-processing on a labelled folder (Kaggle layout or arrays)."""
    folder = Path(folder)
    if not (folder / "train_images.npy").exists() and (folder / "train").is_dir():
        print(data.convert(folder))
    arrays = data.load_arrays(folder, ("train_images", "train_masks", "train_ids"))
    nets, size, settings = inference.load_models(results)
    tta = tta or settings["tta"]
    spec = postprocess.load(results)
    images, truth = arrays["train_images"], arrays["train_masks"]
    chunks = list(inference.predict_chunks(nets, size, images, tta, batch_size))
    probs, present = np.concatenate([p for p, _ in chunks]), np.concatenate([q for _, q in chunks])
    stats = postprocess.mask_stats(probs, truth, [(spec["pixel_threshold"], spec["keep_largest"])])
    tp, fp, fn = postprocess.counts_under(stats, present, spec, np.arange(len(probs)))
    worst = np.argsort(dice_from_counts(tp, fp, fn), kind="stable")[:WORST]
    masks = postprocess.apply(np.stack([full_size(probs[i]) for i in worst]), present[worst], spec)
    report = {"rows": {folder.name or str(folder): scores(tp, fp, fn, present)}, "postprocess": spec, "tta": tta}
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
    ap = arg_parser(__doc__)
    labelled = "a labelled folder (Kaggle layout, or the arrays data.py wrote) to predict and score"
    ap.add_argument("--input", type=Path, help=f"{labelled}; unset: the cross-validated out-of-fold predictions")
    ap.add_argument("--data", type=Path, default=INPUT_DIR, help="the arrays train.py used")
    add_flags(ap, "results", "tta")
    args = ap.parse_args(argv)
    with exclusive(args.results):
        report_on(args)


def report_on(args):
    """The report evaluate.py's flags ask for, printed and written to results/."""
    if args.input is None:
        report, images, truth, masks, ids = evaluate_oof(args.results, args.data, args.tta)
        name = "cross-validated"
    else:
        report, images, truth, masks, ids = evaluate_folder(args.results, args.input, args.tta)
        name = args.input.name
    print(table(report["rows"]))
    out = {"evaluated": name, "tta": report["tta"], "metrics": report["rows"], "postprocess": report["postprocess"]}
    if "fold_postprocess" in report:
        out["fold_postprocess"] = report["fold_postprocess"]
    write_json(args.results / EVALUATION_FILE, finite(out))  # strict JSON: no NaN for an AUC without negatives
    png = cases_png(images, truth, masks, ids, args.results / WORST_CASES_FILE)
    print(f"wrote {args.results / EVALUATION_FILE} and {png}")


if __name__ == "__main__":
    run_cli(main)
