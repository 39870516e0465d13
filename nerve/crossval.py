"""The out-of-fold store and cross-validation: oof.npz (what train.py keeps of each held-out frame and crop
view), each fold scored under the post-processing tuned on the other folds, and the tables train.py and
evaluate.py print."""

import json
import math
import zipfile
from pathlib import Path

from nerve.common import EVALUATION_FILE, OOF_FILE, WORST_CASES_FILE, UserError, atomic_path, write_json

import numpy as np

from nerve import augment, cases, deploy, inference, postprocess
from nerve.deploy import DEFAULT, OOD_THRESHOLD, unknown
from nerve.figures import cases_png
from nerve.metrics import dice_from_counts, scores
from nerve.report import write_html

WORST = 8  # cases shown in the worst-cases PNG
CROSS_VALIDATED = "cross-validated"  # evaluation.json's `evaluated` for the out-of-fold report

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
    report = {"rows": {}, "fold_postprocess": {}, "postprocess": {}, "present": present, "probs": probs, "scores": ood}
    report["ood"] = flagged(ood[~views])
    report["default_gate"], report["tuned_on"] = [], {}
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
        without = int(np.count_nonzero(stats["truth_area"] == 0))
        report["tuned_on"][name] = {"rows": len(probs), "crop_views": int(views.sum()), "without": without}
        dice[:, s] = dice_from_counts(tp, fp, fn)
    report["dice"] = np.where(views, np.inf, dice.mean(axis=1))  # the worst cases are frames
    return report


def print_report(report):
    """What train.py and evaluate.py print of a report: the table, the headline figures with their intervals, the
    detection counts, and the notes on the gate and the out-of-distribution score."""
    print(table(report["rows"]))
    print(cases.headline_table(report["summary"]))
    for line in (cases.detection_line(report["summary"]), default_gate_line(report), flagged_line(report)):
        if line:
            print(line)


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
        [f"{structure} {name}" if named else name]
        + [fmt.format(r[c]) if r[c] is not None and r[c] == r[c] else "n/a" for c, fmt in COLUMNS]  # None: JSON's NaN
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


def worst_cases(report, images, truth, ids, masks_of):
    """The WORST lowest-scored cases: (images, truth, predicted label maps, ids)."""
    worst = np.argsort(report["dice"], kind="stable")[:WORST]
    return images(worst), truth(worst), [masks_of(i) for i in worst], ids[worst]


def oof_report(oof, frames, labels, names, tta, settings, groups, spacing, tolerance=None):
    """A run's cross-validated report (cross_validate under the run's post-processing choice, with `tta`'s views;
    its held-out frames scored one by one, each with its fold's specs, in report["cases"]) and its worst cases,
    the frames and label maps at their own sizes: (report, (images, truth, masks, ids)). groups and spacing
    (mm per pixel, nan unknown) are those of every training frame."""
    report = {**cross_validate(oof, labels, names, tta, *postprocess.for_run(settings)), "tta": tta}
    report["structures"], folds, index = names, report["fold_postprocess"], oof["index"]

    def specs_of(i):
        return [folds[name][int(oof["fold"][i])] for name in names]

    def masks_of(i):
        return deploy.labels(report["probs"][i], report["present"][i], specs_of(i), labels[index[i]].shape)

    rows = np.flatnonzero(~is_view(oof))
    at = index[rows]
    report["cases"] = cases.case_rows(
        report["probs"][rows],
        report["present"][rows],
        report["scores"][rows],
        [labels[j] for j in at],
        lambda i: specs_of(rows[i]),
        oof["ids"][rows],
        np.asarray(groups)[at],
        np.asarray(spacing)[at],
        names,
        tolerance,
    )
    report["summary"] = cases.summary(report["cases"], names)
    return report, worst_cases(report, lambda w: frames[index[w]], lambda w: labels[index[w]], oof["ids"], masks_of)


def finite(obj):
    """`obj` with every non-finite float inside it replaced by None, for strict JSON readers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_report(results, report, evaluated, worst, about):
    """results/evaluation.json, cases.csv, the worst cases' PNG and report.html of a report (`worst`: the cases
    worst_cases() picked; `about`: the run's settings and report.data_facts() of its data); their paths."""
    out = {
        "evaluated": evaluated,
        "tta": report["tta"],
        "structures": report["structures"],
        "metrics": report["rows"],
        "postprocess": report["postprocess"],
        "out_of_distribution": report["ood"],
        "default_gate": report.get("default_gate", []),
        "tuned_on": report.get("tuned_on", {}),
        "summary": report["summary"],
        "data": about["data"],
    }
    if "fold_postprocess" in report:
        out["fold_postprocess"] = report["fold_postprocess"]
    write_json(Path(results) / EVALUATION_FILE, finite(out))  # strict JSON: no NaN for an AUC without negatives
    table_csv = cases.write_csv(results, report["cases"])
    png = cases_png(*worst, Path(results) / WORST_CASES_FILE, report["structures"])
    page = write_html(results, evaluated, {**report, "table": table(report["rows"])}, png, about)
    return [Path(results) / EVALUATION_FILE, table_csv, Path(png), page]


def stored_report(results, tta):
    """The cross-validated report train.py wrote beside oof.npz, as the parts evaluate.py prints, where it is
    that of the current oof.npz with the views `tta`; else None (it is computed again)."""
    path, oof = Path(results) / EVALUATION_FILE, Path(results) / OOF_FILE
    if not (path.is_file() and oof.is_file()) or path.stat().st_mtime_ns < oof.stat().st_mtime_ns:
        return None
    try:
        stored = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None  # damaged: computed again and rewritten
    if not isinstance(stored, dict) or stored.get("evaluated") != CROSS_VALIDATED or stored.get("tta") != tta:
        return None
    keys = {"rows": "metrics", "ood": "out_of_distribution", "default_gate": "default_gate", "summary": "summary"}
    return {key: stored[name] for key, name in keys.items()} if all(n in stored for n in keys.values()) else None
