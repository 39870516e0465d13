"""Accuracy benchmark: grouped K-fold cross-validation on the two real datasets in ../shared.

    python -m bench.accuracy --quick            # smoke run: 4 subjects, 1 epoch, tiny model
    python -m bench.accuracy                     # the default settings, 5 folds on each dataset
    python -m bench.accuracy --datasets usgra    # one of them
    python -m bench.accuracy --baseline          # also the tutorials' plain batch-Dice U-Net (Kaggle)

kaggle: a Kaggle-layout folder made from ../shared/data/nerve with ../shared/tools/make_real_input.py, folds
grouped by subject. That real set is 2% empty (Kaggle's is 59%), so cv_leaderboard is dominated by images
with a nerve and presence_auc rests on few negatives. `label_agreement` (duplicates.nearest_frame_agreement)
says how far the labels agree with themselves, the scale to read the others against.

usgra: ../shared/data/usgra read as it is (folder pairs, palette masks, nerve and vessel). It has no subject
ids; files are numbered in acquisition order, so each run of ten numbers (0000-0009, 0010-0019, ...) is one
group (USGRA_GROUPS). Neighbouring runs may still show one volunteer, so its figures lean optimistic.

Each runs data.py, train.py --folds K and evaluate.py; the benchmark ends with `name: value` lines.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import EVALUATION_FILE, arg_parser, comma_choice

from data import load_arrays
from duplicates import nearest_frame_agreement

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
    """Train K folds and evaluate them; return (cross-validated metrics per structure, minutes spent training)."""
    results = work / name
    started = time.time()
    run(
        ROOT / "train.py",
        "--input",
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
    run(ROOT / "evaluate.py", "--data", real, "--results", results)
    return json.loads((results / EVALUATION_FILE).read_text())["metrics"], minutes


def kaggle(args, folds, flags):
    """The competition images: cross-validated figures and the labels' self-agreement."""
    tool = args.shared / "tools" / "make_real_input.py"
    real = args.work / ("real-quick" if args.quick else "real")
    if not (real / "train_images.npy").exists():
        subset = ["--subjects", "1,2,3,5", "--limit", "30"] if args.quick else []
        run(tool, real, *subset)
        run(ROOT / "data.py", "--input", real)
    arrays = load_arrays(real, ("train_images", "train_masks", "train_subjects"))
    agreement, duplicate = nearest_frame_agreement(
        arrays["train_images"], arrays["train_masks"], arrays["train_subjects"]
    )
    rows, minutes = cross_validate(args.work, real, "default", folds, flags)
    nerve = rows["nerve"]["all folds"]
    auc = nerve["presence_auc"]  # null without empty images
    lines = {
        "cv_dice_nonempty": f"{nerve['dice_nonempty']:.4f}",
        "cv_leaderboard": f"{nerve['leaderboard']:.4f}",
        "presence_auc": f"{float('nan') if auc is None else auc:.4f}",
        "train_minutes": f"{minutes:.1f}",
    }
    if args.baseline:
        baseline, baseline_minutes = cross_validate(args.work, real, "baseline", folds, [*flags, "--baseline"])
        lines["baseline_cv_dice_nonempty"] = f"{baseline['nerve']['all folds']['dice_nonempty']:.4f}"
        lines["baseline_cv_leaderboard"] = f"{baseline['nerve']['all folds']['leaderboard']:.4f}"
        lines["baseline_train_minutes"] = f"{baseline_minutes:.1f}"
    lines["label_agreement"] = f"{agreement.mean():.4f}"
    lines["label_agreement_duplicates"] = f"{agreement[duplicate].mean() if duplicate.any() else float('nan'):.4f}"
    return lines


def usgra(args, folds, flags):
    """The second dataset, read as it is: cross-validated Dice per structure."""
    arrays = args.work / "usgra-input"  # beside the results folder usgra/
    source = args.shared / "data" / "usgra"
    run(
        ROOT / "data.py",
        "--input",
        source,
        "--output",
        arrays,
        "--classes",
        USGRA_CLASSES,
        "--group-pattern",
        USGRA_GROUPS,
    )
    rows, minutes = cross_validate(args.work, arrays, "usgra", folds, flags)
    lines = {f"usgra_dice_{name}": f"{sets['all folds']['dice_nonempty']:.4f}" for name, sets in rows.items()}
    lines.update(
        {f"usgra_leaderboard_{name}": f"{sets['all folds']['leaderboard']:.4f}" for name, sets in rows.items()}
    )
    lines["usgra_train_minutes"] = f"{minutes:.1f}"
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
