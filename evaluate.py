"""Score predictions against labelled masks.

    python evaluate.py                  # cross-validated: the out-of-fold predictions train.py kept
    python evaluate.py --input DIR      # the trained model(s) on a labelled folder, any layout data.py reads

Reports, per structure, mean Dice on images that show it, the leaderboard score (mean per-image Dice, 1 when truth and
prediction are both empty), presence accuracy, ROC AUC and expected calibration error, IoU, pixel precision and
recall, and false positive / negative pixel counts, as a table and results/evaluation.json, with a PNG of the
worst cases; and how many of the frames the out-of-distribution score flags as scans the model does not know
(the masks are scored as predicted, the flag beside them). In the cross-validated report, each fold's
post-processing is tuned on the other folds only.
"""

import contextlib
import math
import tempfile
import zipfile
from pathlib import Path

from common import (
    EVALUATION_FILE,
    INPUT_DIR,
    MANIFEST,
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

import augment
import data
import deploy
import inference
import layouts
import postprocess
from deploy import DEFAULT, OOD_THRESHOLD, full_size, unknown
from figures import cases_png
from metrics import dice_from_counts, scores

WORST = 8  # cases shown in the worst-cases PNG
COLUMNS = [
    ("images", "{:d}"),
    ("with_structure", "{:d}"),
    ("dice_nonempty", "{:.4f}"),
    ("leaderboard", "{:.4f}"),
    ("presence_accuracy", "{:.4f}"),
    ("sensitivity", "{:.4f}"),
    ("specificity", "{:.4f}"),
    ("presence_auc", "{:.4f}"),
    ("presence_ece", "{:.4f}"),
    ("iou_nonempty", "{:.4f}"),
    ("precision", "{:.4f}"),
    ("recall", "{:.4f}"),
    ("false_positive_pixels", "{:d}"),
    ("false_negative_pixels", "{:d}"),
]


def oof_views(oof, tta):
    """A run's out-of-fold (probabilities, presence, out-of-distribution score), averaged over the views `tta`
    names."""
    views = [(oof["probs"], oof["present"], oof["ood"])]
    if tta == "hflip":
        views.append((oof["probs_flip"], oof["present_flip"], oof["ood_flip"]))
    return inference.mean_of_views(views)


def flagged(ood):
    """How many frames the out-of-distribution score flags as scans the model does not know, of how many (None
    for models without the score)."""
    ood = np.asarray(ood)
    if np.isnan(ood).all():
        return None
    return {"frames": len(ood), "flagged": int(np.count_nonzero(unknown(ood))), "threshold": OOD_THRESHOLD}


def flagged_line(report):
    """The sentence saying how many frames the out-of-distribution score flags, or None without the score."""
    if not report.get("ood"):
        return None
    f = report["ood"]
    return (
        f"{f['flagged']} of {f['frames']} frames ({f['flagged'] / max(f['frames'], 1):.1%}) score above the "
        f"out-of-distribution threshold {f['threshold']:g}: predict.py shows them as not a scan the model knows"
    )


def is_view(oof):
    """Which out-of-fold rows are crop views of a held-out frame (train.py adds one per frame), not frames."""
    return oof["crop"][:, 0] >= 0


def row_labels(masks, oof):
    """The label map of each out-of-fold row: its frame's, or the crop of it a view shows (one at a time)."""
    for i, crop in zip(oof["index"], oof["crop"]):
        yield augment.cropped(masks[i], crop) if crop[0] >= 0 else np.asarray(masks[i])


def cross_validate(oof, masks, structures, tta="hflip", prior=DEFAULT, tuned=True):
    """Per-fold and overall scores of each structure's out-of-fold predictions against the label maps
    masks[oof["index"]] (cropped for the crop views), each fold post-processed with the spec tuned on the other
    folds (postprocess.cross_fit), and the specs tuned on all of them; `default_gate` names the structures too
    seldom absent to tune a gate. The specs are tuned on the frames and their crop views together, since the
    views without the structure are the absent cases that datasets labelled only where it is lack; the fold
    rows score the frames, the `crop views` row the views."""
    probs, present, ood = oof_views(oof, tta)
    views = is_view(oof)
    report = {"rows": {}, "fold_postprocess": {}, "postprocess": {}, "present": present, "probs": probs}
    report["ood"] = flagged(ood[~views])
    report["default_gate"] = []
    dice = np.zeros(present.shape)
    for s, name in enumerate(structures):
        stats = postprocess.mask_stats(probs[..., s], (labels == s + 1 for labels in row_labels(masks, oof)))
        fold_specs, final = postprocess.cross_fit(stats, present[:, s], oof["fold"], prior, tuned)
        tp, fp, fn = (np.zeros(len(probs)) for _ in range(3))
        for k, spec in fold_specs.items():
            idx = np.flatnonzero(oof["fold"] == k)
            tp[idx], fp[idx], fn[idx] = postprocess.counts_under(stats, present[:, s], spec, idx)
        sets = {f"fold {k}": (oof["fold"] == k) & ~views for k in fold_specs}
        sets.update({"all folds": ~views, "crop views": views} if views.any() else {"all folds": ~views})
        rows = {row: scores(tp[m], fp[m], fn[m], present[m, s]) for row, m in sets.items()}
        report["rows"][name], report["postprocess"][name] = rows, final
        report["fold_postprocess"][name] = fold_specs
        if tuned and not postprocess.can_gate(stats, np.arange(len(probs))):
            report["default_gate"].append(name)
        dice[:, s] = dice_from_counts(tp, fp, fn)
    report["dice"] = np.where(views, np.inf, dice.mean(axis=1))  # the worst cases are frames
    return report


def default_gate_line(report):
    """The sentence naming the structures whose gate kept its default, or None where every gate was tuned."""
    if not report.get("default_gate"):
        return None
    return (
        f"the gate of {', '.join(report['default_gate'])} keeps its default: fewer than "
        f"{postprocess.MIN_EMPTY_TO_GATE} of the out-of-fold images lack it, too few to tune one on"
    )


def table(rows):
    """A plain-text table of scores, one row per set of each structure ({structure: {set: scores}}); the
    structure's name leads each row where there are several."""
    header = ["set"] + [c for c, _ in COLUMNS]
    named = len(rows) > 1
    body = [
        [f"{structure} {name}" if named else name] + [fmt.format(r[c]) for c, fmt in COLUMNS]
        for structure, sets in rows.items()
        for name, r in sets.items()
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *body])


OOF_KEYS = ("probs", "probs_flip", "present", "present_flip", "ood", "ood_flip", "index", "fold", "ids", "crop")


def save_oof(path, oof):
    """Write the out-of-fold predictions (OOF_KEYS) atomically, the probability maps as float16 (they are
    the largest file of a run); return them as stored, so scores computed from it match a later load."""
    oof = {**oof, "probs": oof["probs"].astype(np.float16), "probs_flip": oof["probs_flip"].astype(np.float16)}
    with atomic_path(path) as tmp:
        np.savez(tmp, **{key: oof[key] for key in OOF_KEYS})
    return oof


def load_oof(path):
    """The out-of-fold predictions train.py kept, checked: every array there, one length for all; those of an
    earlier release (one structure, without its axis) get it, those without an out-of-distribution score nan for
    it, and those without crop views are all frames."""
    remedy = "retrain with `python train.py` (with --folds K for K-fold)"
    if not path.is_file():
        raise UserError(f"{path} not found: {remedy}")
    try:
        with np.load(path) as stored:
            oof = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} cannot be read ({e}; damaged?): {remedy}") from None
    if "fold" in oof:
        n = len(oof["fold"])
        oof = {"ood": np.full(n, np.nan, np.float32), "crop": np.full((n, 4), -1), **oof}
        oof.setdefault("ood_flip", oof["ood"])
    missing = [key for key in OOF_KEYS if key not in oof]
    lengths = {len(oof[key]) for key in OOF_KEYS if key in oof}
    if missing or len(lengths) > 1:
        raise UserError(
            f"{path} does not hold what train.py writes (missing: {', '.join(missing) or 'none'}; "
            f"lengths {sorted(lengths)}): {remedy}"
        )
    for key in ("probs", "probs_flip"):
        oof[key] = oof[key][..., None] if oof[key].ndim == 3 else oof[key]
    for key in ("present", "present_flip"):
        oof[key] = oof[key].reshape(len(oof[key]), -1)
    return oof


def _worst(report, images, truth, ids, masks_of):
    """The WORST lowest-scored cases: (images, truth, predicted label maps, ids)."""
    worst = np.argsort(report["dice"], kind="stable")[:WORST]
    return images(worst), truth(worst), [masks_of(i) for i in worst], ids[worst]


def evaluate_oof(results, input_dir, tta=None):
    """Cross-validated report from results/oof.npz, scored with the run's views and post-processing choice
    unless `tta` says otherwise: (report, and images, truth, masks, ids of the worst cases)."""
    path = Path(results) / OOF_FILE
    oof = load_oof(path)
    settings = read_settings(inference.model_dirs(results)[0])
    tta, names = tta or settings["tta"], settings["structures"]
    arrays = data.load_arrays(input_dir, ("train_images", "train_masks", "train_ids"))
    index = oof["index"]
    if index.max(initial=-1) >= len(arrays["train_ids"]) or not np.array_equal(arrays["train_ids"][index], oof["ids"]):
        raise UserError(f"the arrays in {input_dir}/ are not the ones train.py used for {path}: pass --data")
    scored = cross_validate(oof, arrays["train_masks"], names, tta, *postprocess.for_run(settings))
    report = {**scored, "tta": tta, "structures": names}
    folds = report["fold_postprocess"]

    def masks_of(i):
        full = full_size(report["probs"][i], arrays["train_masks"].shape[1:])
        specs = [folds[name][int(oof["fold"][i])] for name in names]
        return deploy.label_map(deploy.apply_each(full[None], report["present"][i : i + 1], specs), full)[0]

    return report, *_worst(
        report,
        lambda w: arrays["train_images"][index[w]],
        lambda w: arrays["train_masks"][index[w]],
        oof["ids"],
        masks_of,
    )


def evaluate_folder(results, folder, tta=None, batch_size=32):
    """The trained model(s) with their post-processing on a labelled folder: any layout data.py reads (its
    arrays made in a temporary folder), or the arrays data.py wrote."""
    folder = Path(folder)
    nets, size, settings = inference.load_models(results)
    names = settings["structures"]
    with contextlib.ExitStack() as stack:
        if not (folder / "train_images.npy").exists():
            arrays_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evaluate-")))
            # folder pairs without names of their own: labels 1..K are the models' structures
            unnamed = layouts.detect(folder) == "folders" and not (folder / layouts.CLASSES_FILE).exists()
            print(data.convert(folder, output_dir=arrays_dir, classes=",".join(names) if unnamed else None))
        else:
            arrays_dir = folder
        return _evaluate_arrays(nets, size, settings, results, arrays_dir, folder, tta, batch_size)


def _evaluate_arrays(nets, size, settings, results, arrays_dir, folder, tta, batch_size):
    arrays = data.load_arrays(arrays_dir, ("train_images", "train_masks", "train_ids"))
    names = settings["structures"]
    found = data.structures(arrays_dir) if (arrays_dir / MANIFEST).exists() else names
    if found != names:
        raise UserError(
            f"{folder} labels {', '.join(found)} but the models in {results}/ predict {', '.join(names)}: "
            "name the classes as in training (data.py --classes)"
        )
    tta = tta or settings["tta"]
    specs = postprocess.load(results, names)
    images, truth = arrays["train_images"], arrays["train_masks"]
    chunks = list(inference.predict_chunks(nets, size, images, tta, batch_size))
    probs, present, ood = (np.concatenate([chunk[i] for chunk in chunks]) for i in range(3))
    rows, dice = {}, np.zeros(present.shape)
    for s, (name, spec) in enumerate(zip(names, specs)):
        candidates = [(spec["pixel_threshold"], spec["keep_largest"])]
        stats = postprocess.mask_stats(probs[..., s], (np.asarray(t) == s + 1 for t in truth), candidates)
        tp, fp, fn = postprocess.counts_under(stats, present[:, s], spec, np.arange(len(probs)))
        rows[name] = {folder.name or str(folder): scores(tp, fp, fn, present[:, s])}
        dice[:, s] = dice_from_counts(tp, fp, fn)
    report = {"rows": rows, "postprocess": dict(zip(names, specs)), "tta": tta, "structures": names}
    report["dice"], report["ood"] = dice.mean(axis=1), flagged(ood)

    def masks_of(i):
        full = full_size(probs[i], truth.shape[1:])
        return deploy.label_map(deploy.apply_each(full[None], present[i : i + 1], specs), full)[0]

    return report, *_worst(report, lambda w: images[w], lambda w: truth[w], arrays["train_ids"], masks_of)


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
    labelled = "a labelled folder (any layout data.py reads, or the arrays it wrote) to predict and score"
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
    for line in (default_gate_line(report), flagged_line(report)):
        if line:
            print(line)
    out = {
        "evaluated": name,
        "tta": report["tta"],
        "structures": report["structures"],
        "metrics": report["rows"],
        "postprocess": report["postprocess"],
        "out_of_distribution": report["ood"],
    }
    if "fold_postprocess" in report:
        out["fold_postprocess"] = report["fold_postprocess"]
    write_json(args.results / EVALUATION_FILE, finite(out))  # strict JSON: no NaN for an AUC without negatives
    png = cases_png(images, truth, masks, ids, args.results / WORST_CASES_FILE, report["structures"])
    print(f"wrote {args.results / EVALUATION_FILE} and {png}")


if __name__ == "__main__":
    run_cli(main)
