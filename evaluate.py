"""Score predictions against labelled masks.

    python evaluate.py                  # cross-validated: the out-of-fold predictions train.py kept
    python evaluate.py --labelled DIR   # the trained model(s) on a labelled folder, any layout data.py reads

Reports, per structure, mean Dice on images that show it, the leaderboard score (mean per-image Dice, 1 when truth and
prediction are both empty), presence accuracy, ROC AUC and expected calibration error, IoU, pixel precision and
recall, and false positive / negative pixel counts, as a table and results/evaluation.json, with a PNG of the
worst cases; and how many of the frames the out-of-distribution score flags as scans the model does not know
(the masks are scored as predicted, the flag beside them). In the cross-validated report, each fold's
post-processing is tuned on the other folds only.
"""

import contextlib
import tempfile
from pathlib import Path

from nerve.common import (
    EVALUATION_FILE,
    MANIFEST,
    OOF_FILE,
    REPORT_FILE,
    Renamed,
    UserError,
    add_flags,
    arg_parser,
    exclusive,
    read_settings,
    run_cli,
)

import numpy as np

from nerve import cases, deploy, inference, layouts, postprocess, store
from nerve.crossval import (
    CROSS_VALIDATED,
    flagged,
    load_oof,
    oof_report,
    print_report,
    stored_report,
    worst_cases,
    write_report,
)
from nerve.metrics import dice_from_counts, scores
from nerve.report import about

WANTED = ("train_images", "train_masks", "train_ids", "train_subjects", "train_sizes")  # of the arrays


def evaluate_oof(results, arrays_dir, tta, tolerance=None):
    """Cross-validated report from results/oof.npz, scored with the views `tta` and the run's post-processing
    choice: (report, (images, truth, masks, ids) of the worst cases, what the report says of run and data)."""
    path = Path(results) / OOF_FILE
    oof = load_oof(path)
    settings = read_settings(inference.model_dirs(results)[0])
    arrays = store.load_arrays(arrays_dir, WANTED)
    index = oof["index"]
    if index.max(initial=-1) >= len(arrays["train_ids"]) or not np.array_equal(arrays["train_ids"][index], oof["ids"]):
        raise UserError(f"the arrays in {arrays_dir}/ are not the ones train.py used for {path}: pass --arrays")
    frames, labels = store.frames(arrays, "train_images"), store.frames(arrays, "train_masks")
    groups, spacing = arrays["train_subjects"], store.spacing(arrays_dir, len(arrays["train_ids"]))
    report, worst = oof_report(oof, frames, labels, settings["structures"], tta, settings, groups, spacing, tolerance)
    return report, worst, about(results, arrays_dir, arrays)


def evaluate_folder(results, folder, tta=None, batch_size=32, tolerance=None, **found):
    """The trained model(s) with their post-processing on a labelled folder: any layout data.py reads (its
    arrays made in a temporary folder, with `found`: store.convert's groups, group_pattern and spacing), or
    the arrays data.py wrote."""
    folder = Path(folder)
    nets, size, settings = inference.load_models(results)
    names = settings["structures"]
    with contextlib.ExitStack() as stack:
        if not (folder / "train_images.npy").exists():
            arrays_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evaluate-")))
            # folder pairs without names of their own: labels 1..K are the models' structures
            unnamed = layouts.detect(folder) == "folders" and not (folder / layouts.CLASSES_FILE).exists()
            classes = ",".join(names) if unnamed else None
            print(store.convert(folder, output_dir=arrays_dir, classes=classes, **found))
        else:
            arrays_dir = folder
        return _evaluate_arrays(nets, size, settings, results, arrays_dir, folder, tta, batch_size, tolerance)


def _evaluate_arrays(nets, size, settings, results, arrays_dir, folder, tta, batch_size, tolerance):
    arrays = store.load_arrays(arrays_dir, WANTED)
    names = settings["structures"]
    found = store.structures(arrays_dir) if (arrays_dir / MANIFEST).exists() else names
    if found != names:
        raise UserError(
            f"{folder} labels {', '.join(found)} but the models in {results}/ predict {', '.join(names)}: "
            "name the classes as in training (data.py --classes)"
        )
    tta = tta or settings["tta"]
    specs = postprocess.load(results, names)
    images, truth = store.frames(arrays, "train_images"), store.frames(arrays, "train_masks")
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
    ids, groups, spacing = arrays["train_ids"], arrays["train_subjects"], store.spacing(arrays_dir, len(probs))
    report["cases"] = cases.case_rows(
        probs, present, ood, truth, lambda i: specs, ids, groups, spacing, names, tolerance
    )
    report["summary"] = cases.summary(report["cases"], names)

    def masks_of(i):
        return deploy.labels(probs[i], present[i], specs, truth[i].shape)

    worst = worst_cases(report, lambda w: images[w], lambda w: truth[w], ids, masks_of)
    return report, worst, about(results, arrays_dir, arrays)


def main(argv=None):
    ap = arg_parser(__doc__)
    labelled = "a labelled folder (any layout data.py reads, or the arrays it wrote) to predict and score"
    ap.add_argument(
        "--labelled",
        "--input",
        type=Path,
        action=Renamed,
        help=f"{labelled}; unset: the cross-validated out-of-fold predictions",
    )
    add_flags(ap, "arrays", "results", "tta", arrays=dict(help="the arrays train.py used", old="--data"))
    ap.add_argument(
        "--nsd-tolerance",
        type=float,
        default=None,
        help="the normalised surface Dice's tolerance, in mm where every image's spacing is known, else in pixels; "
        f"unset: {cases.NSD_TOLERANCE['mm']:g} mm or {cases.NSD_TOLERANCE['px']:g} px (docs/metrics.md)",
    )
    found = ap.add_argument_group("--labelled DIR of a raw dataset", "as data.py reads it")
    add_flags(found, "groups", "group-pattern", "spacing")
    args = ap.parse_args(argv)
    if args.nsd_tolerance is not None and args.nsd_tolerance < 0:
        raise UserError("--nsd-tolerance must not be negative")
    with exclusive(args.results):
        report_on(args)


def report_on(args):
    """The report evaluate.py's flags ask for, printed and written to results/."""
    if args.labelled is None:
        tta = args.tta or read_settings(inference.model_dirs(args.results)[0])["tta"]
        stored = stored_report(args.results, tta) if args.nsd_tolerance is None else None
        if stored is not None:  # train.py scored these very predictions: read, not computed again
            print_report(stored)
            print(f"(as train.py wrote it beside {OOF_FILE}: {args.results / EVALUATION_FILE}, {REPORT_FILE})")
            return
        report, worst, facts = evaluate_oof(args.results, args.arrays, tta, args.nsd_tolerance)
        name = CROSS_VALIDATED
    else:
        found = {"groups": args.groups, "group_pattern": args.group_pattern, "spacing": args.spacing}
        report, worst, facts = evaluate_folder(
            args.results, args.labelled, args.tta, tolerance=args.nsd_tolerance, **found
        )
        name = args.labelled.name
    print_report(report)
    written = write_report(args.results, report, name, worst, facts)
    print(f"wrote {', '.join(map(str, written))}")


if __name__ == "__main__":
    run_cli(main)
