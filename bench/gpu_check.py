"""The GPU check: one prepared command that installs what a bare GPU machine lacks, measures the default
model's throughput, and trains the default recipe on both real datasets under KERAS_BACKEND=jax, all inside
a time budget.

    python -m bench.gpu_check --prepare     # here: wheels and a copy of the real data into .carry/ (ignored)
    python -m bench.gpu_check --out DIR     # on the GPU machine, from the repository root
    python -m bench.gpu_check --dry-run     # the same steps at toy sizes, on this CPU
    python -m bench.gpu_check --datasets usgra --rates-only   # most of the budget for one dataset's folds

With the device tool: carry [".carry"] and run `PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out $OUT`.

1. Throughput (bench.throughput --grid): training images/s of the default model at 96x128 (the Kaggle
   frames' planned size) and 144x160 (usgra's) for fp32, bf16 and fp16 at batch 4, 32 and 128, and the
   machine's fp32 and bf16 matrix-product GFLOP/s in the same run, as the ceiling. `--rates-only`: just
   the rates step 2 plans with (mixed fp16, batch 4).
2. Accuracy (bench.accuracy, once per dataset): the default recipe on 5 grouped folds of the real
   competition images, then of usgra, with no flags at all. The time left is shared between them in
   proportion to their planned work; a dataset gets fewer epochs than train.py plans only where step 1's
   rate says those cannot fit in its share (it says so).
3. Figures: every `name: value` line of the steps, labelled with the device, in DIR/figures.txt, each
   step's whole log beside it.
"""

import contextlib
import importlib.util
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from nerve.common import arg_parser, comma_choice

from nerve import planning

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"  # ignored by git; the device tool's `carry` takes it along
# What the GPU image lacks of requirements.txt (it has jax, numpy, h5py, opencv, scikit-learn, tifffile,
# tqdm, matplotlib, tensorboard, absl-py, rich, ml-dtypes, packaging): Keras and its two small dependencies,
# and the results lock and the run settings' validation with theirs (pinned as here)
WHEELS = (
    "keras==3.15.1",
    "namex==0.1.0",
    "optree==0.20.0",
    "filelock==4.3.2",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
FIGURE = re.compile(r"^([a-z][a-z0-9_]*): ([-+0-9.e]+|nan|True|False)$")  # a benchmark's `name: value` lines
DEVICE = re.compile(r"^device: (.+)$")
TRAIN_SHARE = 0.8  # of the images each of 5 folds trains on
FOLD_OVERHEAD_S = 60  # per fold: compiling, out-of-fold predictions, pictures (measured rate excludes them)

# {dataset: (images, folds, the size train.py plans for it, whose measured rate plans its epochs)}
SETS = {"kaggle": (2026, 5, "96x128"), "usgra": (204, 5, "144x160")}
SIZES = ",".join(size for *_, size in SETS.values())
# (throughput grid flags, accuracy flags, sets) per mode
REAL = (["--sizes", SIZES, "--precisions", "fp32,bf16,fp16", "--batches", "4,32,128"], [], SETS)
RATES_ONLY = ["--sizes", SIZES, "--precisions", "fp16", "--batches", "4"]  # what plan() reads on a GPU
DRY = (
    [
        "--sizes",
        "32x48",
        "--precisions",
        "fp32",
        "--batches",
        "2,4",
        "--steps",
        "2",
        "--base-filters",
        "4",
        "--depth",
        "2",
    ],
    ["--quick"],
    {"kaggle": (120, 2, "32x48"), "usgra": (204, 2, "32x48")},
)


def prepare():
    """Here, before the device run: the wheels and the real data into .carry/."""
    shared = ROOT.parent / "shared"
    (CARRY / "tools").mkdir(parents=True, exist_ok=True)
    shutil.copy2(shared / "tools" / "make_real_input.py", CARRY / "tools")
    for part in ("nerve/jpeg256", "nerve/jpeg256_test", "nerve/train_masks.csv", "usgra/images", "usgra/masks"):
        source, target = shared / "data" / part, CARRY / "data" / part
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "-d",
            CARRY / "wheels",
            *WHEELS,
        ],
        check=True,
    )
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file()) / 2**20
    print(
        f'{CARRY} holds {size:.0f} MiB; on the GPU machine, with carry [".carry"]:\n'
        "  PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out $OUT"
    )


def environment():
    """The children's environment: the jax backend, and the carried wheels where Keras is missing."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONUNBUFFERED": "1"}
    if importlib.util.find_spec("keras") is None:
        wheels = sorted((CARRY / "wheels").glob("*.whl"))
        if not wheels:
            sys.exit(f"keras is not installed and {CARRY / 'wheels'} has no wheels: run --prepare where pip works")
        site = Path("/tmp/gpu-check-site")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--upgrade",
                "--target",
                site,
                *wheels,
            ],
            check=True,
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def stop_group(proc, stopped):
    """Kill a step's process group, unless it has ended."""
    if proc.poll() is None:
        stopped.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def step(name, args, env, out, timeout):
    """Run one benchmark module, its output streamed and kept in out/<name>.log; return its figures. A step
    that outlasts `timeout` is stopped, and what it printed so far still counts."""
    print(f"$ python -m {' '.join(map(str, args))}   (at most {timeout:.0f} s)", flush=True)
    lines = []
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *map(str, args)],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a stop ends the scripts it runs too
        )
        # a timer, not a check per output line: a step that hangs silently is stopped too
        stopped = threading.Event()
        timer = threading.Timer(timeout, stop_group, (proc, stopped))
        timer.start()
        for line in proc.stdout:
            log.write(line)
            lines.append(line.rstrip("\n"))
            print(line, end="", flush=True)
        proc.wait()
        timer.cancel()
        if stopped.is_set():
            print(f"{name}: stopped at its {timeout:.0f} s budget", flush=True)
    figures = dict(m.groups() for m in map(FIGURE.match, lines) if m)
    devices = [m[1] for m in map(DEVICE.match, lines) if m]
    return {**figures, "device": devices[-1]} if devices else figures


def epoch_seconds(rate, images):
    """An epoch's estimated seconds at `rate` training images/s: a training pass, plus two passes of
    predictions over the held-out fold (inference counted at 4x)."""
    return images * TRAIN_SHARE / rate + 2 * images * (1 - TRAIN_SHARE) / (4 * rate)


def plan(figures, seconds, sets, on_gpu):
    """Per dataset: (epochs, the epochs train.py plans, an epoch's seconds, its share of `seconds`, the seconds
    its planned epochs need). `seconds` is shared in proportion to each set's planned K-fold time, at the
    measured rate of its size at batch 4 and the default precision (mixed fp16 on a GPU, else fp32); a set
    gets the most epochs up to its planned ones that fit its share."""
    precision = "fp16" if on_gpu else "fp32"
    setup = {}
    for name, (images, folds, size) in sets.items():
        rate = float(figures.get(f"train_images_per_s_{size}_{precision}_b4", "nan"))
        # train.py plans from fold 0's training set, which may differ from this share by an image or two
        planned = planning.epochs(round(images * TRAIN_SHARE))[0]
        setup[name] = folds, planned, epoch_seconds(rate, images)
    need = {name: folds * (FOLD_OVERHEAD_S + planned * epoch) for name, (folds, planned, epoch) in setup.items()}
    total, plans = sum(need.values()), {}
    for name, (folds, planned, epoch) in setup.items():
        share = seconds * need[name] / total if math.isfinite(total) else 0
        epochs = math.floor((share / folds - FOLD_OVERHEAD_S) / epoch) if math.isfinite(epoch) else 0
        plans[name] = max(0, min(planned, epochs)), planned, epoch, share, need[name]
    return plans


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--prepare", action="store_true", help="put the wheels and the real data into .carry/ and stop")
    ap.add_argument("--dry-run", action="store_true", help="the same steps at toy sizes, on a CPU")
    ap.add_argument("--budget", type=float, default=510, help="seconds for the whole check")
    ap.add_argument("--datasets", type=comma_choice(SETS), default=",".join(SETS), help="comma-separated")
    ap.add_argument("--rates-only", action="store_true", help="measure only the rates the accuracy runs plan with")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")), help="figures and logs")
    ap.add_argument("--shared", type=Path, default=CARRY, help="holds tools/make_real_input.py and data/")
    args = ap.parse_args()
    if args.prepare:
        return prepare()
    started = time.time()
    grid_flags, accuracy_flags, all_sets = DRY if args.dry_run else REAL
    if args.rates_only and not args.dry_run:
        grid_flags = RATES_ONLY
    throughput_s = 0.4 * args.budget
    print(
        f"budget: {args.budget:.0f} s in all; throughput at most {throughput_s:.0f} s, then the accuracy runs "
        f"({', '.join(args.datasets)}) in what is left, their epochs planned from the measured rate",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    figures = step("throughput", ["bench.throughput", "--grid", *grid_flags], env, args.out, throughput_s)
    on_gpu = "cpu" not in figures.get("device", "cpu").lower()
    left = args.budget - (time.time() - started) - 60 * len(args.datasets)  # a minute each: data, evaluate.py, figures
    plans = plan(figures, left, {name: all_sets[name] for name in args.datasets}, on_gpu)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # a fresh run each time: nothing to resume or refuse
    for name, (epochs, planned, epoch_s, share, need) in plans.items():
        folds = all_sets[name][1]
        reduced = f"; reduced from {planned}: those would take {need / 60:.0f} min"
        print(
            f"plan, {name}: {epochs} epochs x {folds} folds in {share:.0f} s (an epoch ~{epoch_s:.1f} s)"
            f"{'' if epochs == planned or args.dry_run else reduced}",
            flush=True,
        )
        run_epochs = 1 if args.dry_run else epochs  # a dry run shows the plan, then trains 1 epoch
        if run_epochs:
            # at the planned length no flag at all: train.py plans it, as for a user
            train_flags = [] if run_epochs == planned else ["--", "--epochs", run_epochs]
            command = ["bench.accuracy", "--datasets", name, "--shared", args.shared, "--work", work, *accuracy_flags]
            figures.update(step(f"accuracy_{name}", [*command, *train_flags], env, args.out, share + 30))
        figures.update({f"planned_epochs_{name}": str(planned), f"epochs_run_{name}": str(run_epochs)})
    figures["wall_seconds"] = f"{time.time() - started:.0f}"
    device = figures.pop("device", "unknown")
    text = "".join(f"{name}: {value}  [{device}]\n" for name, value in figures.items())
    (args.out / "figures.txt").write_text(text)
    print(f"\n{text}device: {device}")


if __name__ == "__main__":
    main()
