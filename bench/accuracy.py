"""Accuracy benchmark: grouped K-fold cross-validation on the two real datasets in ../shared.

    python -m bench.accuracy --quick            # smoke run: 4 subjects, 1 epoch, tiny model
    python -m bench.accuracy                     # the default settings, 5 folds on each dataset
    python -m bench.accuracy --datasets usgra    # one of them
    python -m bench.accuracy --baseline          # also the tutorials' plain batch-Dice U-Net (Kaggle)

kaggle: a Kaggle-layout folder made from ../shared/data/nerve with ../shared/tools/make_real_input.py, folds
grouped by subject. That real set is 2% empty (Kaggle's is 59%), so cv_leaderboard is dominated by images
with a nerve and presence_auc rests on few negatives. `label_agreement` (neardup.nearest_frame_agreement)
says how far the labels agree with themselves, the scale to read the others against.

usgra: ../shared/data/usgra read as it is (folder pairs, palette masks, nerve and vessel). It has no subject
ids; files are numbered in acquisition order, so each run of ten numbers (0000-0009, 0010-0019, ...) is one
group (USGRA_GROUPS). Neighbouring runs may still show one volunteer, so its figures lean optimistic.

Each runs data.py, train.py --folds K and evaluate.py; the benchmark ends with `name: value` lines (usgra's
prefixed usgra_).

Saying "no nerve here" and "not a scan I know", measured on real frames no threshold was tuned on:
- ood_auroc: the out-of-distribution score of the held-out frames (each by the fold model that did not train
  on it) against that of real ultrasound of other anatomy (../shared/data/us_other and the frames of the
  DICOM files in ../shared/data/dicom that this install decodes), scored by every fold model;
  ood_flagged_other and other_nerve_drawn: what predict.py (the fold ensemble) does with those frames: the share
  it calls not a scan it knows, and the share it draws a nerve on; other_presence_over_half: the share whose
  nerve presence is over 0.5; ood_flagged_heldout: the share of frames of new subjects the stored threshold
  flags, estimated by each model on its validation subjects (ood.held_out_flagged), averaged; ood_auroc's
  held-out side is frames only; ood_flagged_crop_views: the share of the crop views below (zoomed-in views
  of held-out frames) that the stored threshold flags.
- absent_view_presence_auc, absent_view_nerve_drawn, present_view_nerve_found: evaluate.py's `crop views` row,
  one crop view of each held-out frame drawn by the training rule (augment.held_out_crop: without the nerve or
  with it whole, a fair coin), predicted by the model that did not train on it, under the run's post-processing:
  how well the presence tells the two kinds apart, how often a nerve is drawn where there is none, and how often
  one is where there is one.
- presence_ece and presence_ece_uncalibrated: the expected calibration error of the out-of-fold presence
  (calibration.json), after (each fold by the other folds' temperature) and before.
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from nerve.common import CALIBRATION_FILE, EVALUATION_FILE, OOF_FILE, UserError, arg_parser, comma_choice, read_settings

import numpy as np

from nerve import crossval, deploy, inference
from nerve.cases import span
from nerve.images import read_image
from nerve.layouts import IMAGE_SUFFIXES
from nerve.metrics import roc_auc
from nerve.neardup import nearest_frame_agreement
from nerve.sources import read_dicom
from nerve.store import load_arrays

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
USGRA_CLASSES = "nerve,vessel"
USGRA_GROUPS = r"^(\d{3})"  # the file number without its last digit: runs of ten acquisitions


def run(*args):
    """Run one of the project's scripts, streaming its output; stop the benchmark if it fails."""
    print("$", " ".join(map(str, args)), flush=True)
    if subprocess.run([sys.executable, *map(str, args)], cwd=ROOT).returncode:
        sys.exit(f"benchmark stopped: {args[0]} failed")


def device():
    """The accelerator Keras trains on, else the CPU model and core count."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "jax":
        import jax

        return f"{jax.devices()[0].device_kind} (jax)"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return f"{tf.config.experimental.get_device_details(gpus[0]).get('device_name', 'GPU')} (tensorflow)"
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} cores ({backend})"


def cross_validate(work, real, name, folds, train_flags):
    """Train K folds and evaluate them; return (evaluation.json: the cross-validated metrics per structure and
    their summary with intervals, minutes spent training)."""
    results = work / name
    started = time.time()
    run(
        ROOT / "train.py",
        "--arrays",
        real,
        "--results",
        results,
        "--logs",
        work / "logs",
        "--run",
        name,
        "--folds",
        folds,
        *train_flags,
    )
    minutes = (time.time() - started) / 60
    run(ROOT / "evaluate.py", "--arrays", real, "--results", results)
    return json.loads((results / EVALUATION_FILE).read_text()), minutes


def other_anatomy(shared):
    """Real ultrasound of other anatomy: (gray frames, the files predict.py is given, DICOM files this install
    cannot decode); None where ../shared has none (bench.gpu_check carries only the two labelled sets)."""
    if not (shared / "data" / "us_other").is_dir():
        print(f"no scans of other anatomy at {shared / 'data' / 'us_other'}: ood_auroc and other_* are left out")
        return None
    files = sorted(p for p in (shared / "data" / "us_other").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    frames = [read_image(p) for p in files]
    skipped = []
    for path in sorted((shared / "data" / "dicom").glob("*.dcm")):
        try:
            frames += list(read_dicom(path)[1])
            files.append(path)
        except UserError:  # a compressed syntax without its decoder
            skipped.append(path.name)
    return frames, files, skipped


def fold_models(results):
    """(each fold's model, its settings), in the order of the folds oof.npz numbers."""
    return [(inference.load_model(d), read_settings(d)) for d in inference.model_dirs(results)]


def ood_figures(results, other, work):
    """ood_flagged_heldout and, with the other-anatomy frames, ood_auroc and what predict.py does with them."""
    models = fold_models(results)
    estimates = np.array([s["ood"]["held_out_flagged"] for _, s in models], float)  # None (one group): nan
    figures = {"ood_flagged_heldout": np.nanmean(estimates)}
    if other is None:
        return figures
    frames, files, skipped = other
    oof = crossval.load_oof(results / OOF_FILE)
    ood = crossval.oof_views(oof, read_settings(inference.model_dirs(results)[0])["tta"])[2]
    views = crossval.is_view(oof)
    held_out = ood[~views]  # frames only: crop views are zoomed in, not what predict.py is given
    figures["ood_flagged_crop_views"] = float(np.mean(deploy.unknown(ood[views]))) if views.any() else np.nan
    scores = [
        np.concatenate([c[2] for c in inference.predict_chunks([net], tuple(s["size"]), frames, s["tta"])])
        for net, s in models
    ]
    other_scores = np.concatenate(scores)
    labels = np.r_[np.zeros(len(held_out)), np.ones(len(other_scores))]
    figures["ood_auroc"] = roc_auc(np.r_[held_out, other_scores], labels)
    out = work / f"{results.name}-other-anatomy"
    run(ROOT / "predict.py", *files, "--results", results, "--output", out)
    rows = [r for path in sorted(out.glob("*.csv")) for r in csv.DictReader(path.open())]
    figures["ood_flagged_other"] = np.mean([r["unknown_scan"] == "True" for r in rows])
    figures["other_nerve_drawn"] = np.mean([int(r["nerve_area"]) > 0 for r in rows])
    figures["other_presence_over_half"] = np.mean([float(r["nerve_presence"]) > 0.5 for r in rows])
    figures["other_frames"] = len(rows)
    if skipped:
        print(f"other anatomy: {', '.join(skipped)} left out (no decoder for their transfer syntax here)")
    return figures


def presence_figures(results, other, work, rows):
    """The out-of-distribution, crop-view and calibration figures of a trained run (rows: evaluation.json's
    metrics of its nerve)."""
    calibration = json.loads((results / CALIBRATION_FILE).read_text())["nerve"]
    views = rows["crop views"]
    return {
        **ood_figures(results, other, work),
        "absent_view_presence_auc": views["presence_auc"],
        "absent_view_nerve_drawn": 1 - views["specificity"],
        "present_view_nerve_found": views["sensitivity"],
        "absent_views": views["images"] - views["with_structure"],
        "presence_ece": calibration["ece_after"],
        "presence_ece_uncalibrated": calibration["ece_before"],
    }


def as_lines(figures, prefix=""):
    """Figures as the benchmark's `name: value` lines."""
    return {f"{prefix}{k}": f"{v}" if isinstance(v, int) else f"{v:.4f}" for k, v in figures.items()}


HEADLINE = ("dice_nonempty", "hd95_", "nsd_", "sensitivity", "specificity")  # with their intervals


def interval_lines(summary, prefix=""):
    """The headline figures of evaluation.json's summary with their 95% intervals over groups, one line each."""
    lines = {}
    for name, s in summary.items():
        for key, f in s["figures"].items():
            if key.startswith(HEADLINE):
                shown = "n/a" if f["value"] is None else f"{f['value']:.4f} ({span(f, 4)})"
                lines[f"{prefix}ci_{name}_{key}"] = shown
    return lines


def kaggle_arrays(shared, work, quick):
    """The competition images in the Kaggle layout and their arrays, in `work` (made once): the folder."""
    real = work / ("real-quick" if quick else "real")
    if not (real / "train_images.npy").exists():
        subset = ["--subjects", "1,2,3,5", "--limit", "30"] if quick else []
        run(shared / "tools" / "make_real_input.py", real, *subset)
        run(ROOT / "data.py", "--dataset", real)
    return real


def usgra_arrays(shared, work):
    """usgra's arrays, read as it is with USGRA_GROUPS, in `work`: the folder."""
    arrays = work / "usgra-input"  # beside the results folder usgra/
    source = shared / "data" / "usgra"
    run(ROOT / "data.py", "--dataset", source, "--arrays", arrays, "--classes", USGRA_CLASSES, "--group-pattern",
        USGRA_GROUPS)  # fmt: skip
    return arrays


def kaggle(args, folds, flags):
    """The competition images: cross-validated figures and the labels' self-agreement."""
    real = kaggle_arrays(args.shared, args.work, args.quick)
    arrays = load_arrays(real, ("train_images", "train_masks", "train_subjects"))
    agreement, duplicate = nearest_frame_agreement(
        arrays["train_images"], arrays["train_masks"], arrays["train_subjects"]
    )
    evaluation, minutes = cross_validate(args.work, real, "default", folds, flags)
    rows = evaluation["metrics"]
    nerve = rows["nerve"]["all folds"]
    auc = nerve["presence_auc"]  # null without empty images
    lines = {
        "cv_dice_nonempty": f"{nerve['dice_nonempty']:.4f}",
        "cv_leaderboard": f"{nerve['leaderboard']:.4f}",
        "presence_auc": f"{float('nan') if auc is None else auc:.4f}",
        "train_minutes": f"{minutes:.1f}",
        **as_lines(presence_figures(args.work / "default", args.other, args.work, rows["nerve"])),
        **interval_lines(evaluation["summary"]),
    }
    if args.baseline:
        baseline, baseline_minutes = cross_validate(args.work, real, "baseline", folds, [*flags, "--baseline"])
        baseline = baseline["metrics"]
        lines["baseline_cv_dice_nonempty"] = f"{baseline['nerve']['all folds']['dice_nonempty']:.4f}"
        lines["baseline_cv_leaderboard"] = f"{baseline['nerve']['all folds']['leaderboard']:.4f}"
        lines["baseline_train_minutes"] = f"{baseline_minutes:.1f}"
    lines["label_agreement"] = f"{agreement.mean():.4f}"
    lines["label_agreement_duplicates"] = f"{agreement[duplicate].mean() if duplicate.any() else float('nan'):.4f}"
    return lines


def usgra(args, folds, flags):
    """The second dataset, read as it is: cross-validated Dice per structure."""
    arrays = usgra_arrays(args.shared, args.work)
    evaluation, minutes = cross_validate(args.work, arrays, "usgra", folds, flags)
    rows = evaluation["metrics"]
    lines = {f"usgra_dice_{name}": f"{sets['all folds']['dice_nonempty']:.4f}" for name, sets in rows.items()}
    lines.update(
        {f"usgra_leaderboard_{name}": f"{sets['all folds']['leaderboard']:.4f}" for name, sets in rows.items()}
    )
    lines["usgra_train_minutes"] = f"{minutes:.1f}"
    lines.update(as_lines(presence_figures(args.work / "usgra", args.other, args.work, rows["nerve"]), "usgra_"))
    lines.update(interval_lines(evaluation["summary"], "usgra_"))
    return lines


DATASETS = {"kaggle": kaggle, "usgra": usgra}


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, tiny model (Kaggle: 4 subjects x 30)")
    ap.add_argument("--folds", type=int, default=None, help="unset: 5 (quick: 2)")
    ap.add_argument("--datasets", type=comma_choice(DATASETS), default=",".join(DATASETS), help="comma-separated")
    ap.add_argument("--baseline", action="store_true", help="also run the plain batch-Dice U-Net, same protocol")
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared folder: tools/ and data/")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nerve-bench"), help="scratch folder")
    ap.add_argument(
        "train_flags", nargs=argparse.REMAINDER, help="further train.py flags after --, e.g. -- --epochs 8 --size 64x80"
    )
    args = ap.parse_args()
    if not (args.shared / "tools" / "make_real_input.py").exists():
        sys.exit(f"the real data tools are not at {args.shared}: this benchmark needs ../shared beside the repository")
    flags = [f for f in args.train_flags if f != "--"]
    args.other = other_anatomy(args.shared)
    folds = args.folds or (2 if args.quick else 5)
    if args.quick:
        flags = ["--epochs", "1", "--size", "32x48", "--base-filters", "4", *flags]
    lines = {}
    for name in args.datasets:
        lines.update(DATASETS[name](args, folds, flags))
    print(f"\nsettings: --folds {folds} {' '.join(flags) or '(train.py defaults)'}")
    for key, value in lines.items():
        print(f"{key}: {value}")
    print(f"device: {device()}")


if __name__ == "__main__":
    main()
