"""The GPU check: one prepared command that installs what a bare GPU machine lacks, measures the default
model's throughput, and trains the default recipe under KERAS_BACKEND=jax, all inside a time budget.

    python -m bench.gpu_check --prepare     # here: wheels and a copy of the real data into .carry/ (ignored)
    python -m bench.gpu_check --out DIR     # on the GPU machine, from the repository root
    python -m bench.gpu_check --dry-run     # the same steps at toy sizes, on this CPU

With the device tool: carry [".carry"] and run `PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out $OUT`.

1. Throughput (bench.throughput --grid): training images/s of the default model at 96x128 and 128x160 for
   fp32, bf16 and fp16 at batch 4, 32 and 128, and the machine's fp32 and bf16 matrix-product GFLOP/s in
   the same run, as the ceiling.
2. Accuracy (bench.accuracy): the default recipe on the 5 subject-grouped folds of the real images, no
   size or filter overrides; fewer epochs than planned only where step 1's rate says those cannot fit (it
   says so).
3. Figures: every `name: value` line of both steps, labelled with the device, in DIR/figures.txt, each
   step's whole log beside it.
"""

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import arg_parser

from planning import EPOCHS

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"  # ignored by git; the device tool's `carry` takes it along
# What the GPU image lacks of requirements.txt (it has jax, numpy, h5py, opencv, scikit-learn, tifffile,
# tqdm, matplotlib, tensorboard, absl-py, rich, ml-dtypes, packaging): Keras and its two small dependencies
WHEELS = ("keras==3.15.1", "namex==0.1.0", "optree==0.20.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
FIGURE = re.compile(r"^([a-z][a-z0-9_]*): ([-+0-9.e]+|nan|True|False)$")  # a benchmark's `name: value` lines
DEVICE = re.compile(r"^device: (.+)$")
TRAIN_SHARE = 0.8  # of the images each of 5 folds trains on
FOLD_OVERHEAD_S = 60  # per fold: compiling, out-of-fold predictions, pictures (measured rate excludes them)

# (throughput grid flags, accuracy flags, images and folds of the accuracy set) per mode
REAL = (["--sizes", "96x128,128x160", "--precisions", "fp32,bf16,fp16", "--batches", "4,32,128"], [], 2026, 5)
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
    120,
    2,
)


def prepare():
    """Here, before the device run: the wheels and the real data into .carry/."""
    shared = ROOT.parent / "shared"
    (CARRY / "tools").mkdir(parents=True, exist_ok=True)
    shutil.copy2(shared / "tools" / "make_real_input.py", CARRY / "tools")
    for part in ("jpeg256", "jpeg256_test", "train_masks.csv"):
        source, target = shared / "data" / "nerve" / part, CARRY / "data" / "nerve" / part
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
        )
        deadline = time.time() + timeout
        for line in proc.stdout:
            log.write(line)
            lines.append(line.rstrip("\n"))
            print(line, end="", flush=True)
            if time.time() > deadline:
                proc.kill()
                print(f"{name}: stopped at its {timeout:.0f} s budget", flush=True)
                break
        proc.wait()
    figures = dict(m.groups() for m in map(FIGURE.match, lines) if m)
    devices = [m[1] for m in map(DEVICE.match, lines) if m]
    return {**figures, "device": devices[-1]} if devices else figures


def plan_epochs(figures, seconds, images, folds, on_gpu):
    """The most epochs up to the EPOCHS train.py plans for the real images whose K-fold run fits `seconds`, from
    the measured rate of the default size, batch and precision (mixed fp16 on a GPU, else fp32); and that
    epoch's estimated seconds."""
    size = "96x128" if on_gpu else "32x48"
    rate = float(figures.get(f"train_images_per_s_{size}_{'fp16' if on_gpu else 'fp32'}_b4", "nan"))
    # a training pass, plus two passes of predictions over the held-out fold (inference counted at 4x)
    epoch = images * TRAIN_SHARE / rate + 2 * images * (1 - TRAIN_SHARE) / (4 * rate)
    epochs = math.floor((seconds / folds - FOLD_OVERHEAD_S) / epoch) if math.isfinite(epoch) else 0
    return max(0, min(EPOCHS, epochs)), epoch


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--prepare", action="store_true", help="put the wheels and the real data into .carry/ and stop")
    ap.add_argument("--dry-run", action="store_true", help="the same steps at toy sizes, on a CPU")
    ap.add_argument("--budget", type=float, default=510, help="seconds for the whole check")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")), help="figures and logs")
    ap.add_argument("--shared", type=Path, default=CARRY, help="holds tools/make_real_input.py and data/nerve/")
    args = ap.parse_args()
    if args.prepare:
        return prepare()
    started = time.time()
    grid_flags, accuracy_flags, images, folds = DRY if args.dry_run else REAL
    throughput_s = 0.4 * args.budget
    print(
        f"budget: {args.budget:.0f} s in all; throughput at most {throughput_s:.0f} s, then the accuracy run "
        f"in what is left, its epochs planned from the measured rate",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    figures = step("throughput", ["bench.throughput", "--grid", *grid_flags], env, args.out, throughput_s)
    on_gpu = "cpu" not in figures.get("device", "cpu").lower()
    left = args.budget - (time.time() - started) - 60  # a minute for the data, evaluate.py and the figures
    epochs, epoch_s = plan_epochs(figures, left, images, folds, on_gpu)
    reduced = f"reduced from {EPOCHS}: those would take {folds * (FOLD_OVERHEAD_S + EPOCHS * epoch_s) / 60:.0f} min"
    print(
        f"plan: {epochs} epochs x {folds} folds in {left:.0f} s (an epoch ~{epoch_s:.1f} s)"
        f"{'' if epochs == EPOCHS or args.dry_run else '; ' + reduced}",
        flush=True,
    )
    run_epochs = min(epochs, 1) if args.dry_run else epochs  # a dry run shows the plan, then trains 1 epoch
    if run_epochs:
        work = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # a fresh run each time: nothing to resume or refuse
        train_flags = ["--", "--epochs", run_epochs]
        figures.update(
            step(
                "accuracy",
                [
                    "bench.accuracy",
                    "--datasets",
                    "kaggle",
                    "--shared",
                    args.shared,
                    "--work",
                    work,
                    *accuracy_flags,
                    *train_flags,
                ],
                env,
                args.out,
                left + 30,
            )
        )
    figures.update(
        planned_epochs=str(epochs),
        epochs_run=str(run_epochs),
        wall_seconds=f"{time.time() - started:.0f}",
    )
    device = figures.pop("device", "unknown")
    text = "".join(f"{name}: {value}  [{device}]\n" for name, value in figures.items())
    (args.out / "figures.txt").write_text(text)
    print(f"\n{text}device: {device}")


if __name__ == "__main__":
    main()
