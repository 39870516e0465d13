"""The real-time model profile: how many frames a second smaller and shallower models draw, against their
validation Dice on both real datasets, in float32 and int8, so that a user can pick one.

    python -m bench.realtime --quick    # 2 configurations, a Kaggle subset, 1 epoch: the path, not the figures
    python -m bench.realtime

Each configuration of CONFIGS (base filters, depth, input size) is trained on one subject-held-out split of each
real dataset in ../shared (train.py --val-fraction 0.2; Kaggle: the CPU protocol's 7 epochs; usgra: 60 epochs,
a shortened protocol; --precision auto), exported with --fast (one model, no mirror view: what runs live) to
ONNX and quantised (export.py --quantize int8, calibrated on the training frames and checked on the held-out
ones). Per configuration:
- Dice on the held-out frames that show the structure (at most quantize.CHECK_FRAMES of them), as predict.py's
  live loop draws them (the tuned post-processing, the out-of-distribution flag, no mirror view), float32 and
  int8 (where export.py kept the int8 model: it refuses one that loses more than 0.01 Dice, whose
  out-of-distribution flag moves, or that runs no faster);
- frames/s of a frame's whole work in predict.py's live loop (resize, the model, the post-processing at
  580x420, the overlay drawn), on the Kaggle frames, in this process on two cores and on one (the process
  pinned to a core, the runtime and OpenCV on one thread): float32 and int8, each through ONNX Runtime and
  OpenVINO.

Headline lines: int8_speedup (the default model's frames/s in int8 over float32, both through ONNX Runtime, two
cores), int8_speedup_openvino (int8 through OpenVINO over the same float32), int8_dice_change per dataset and
structure, and per configuration fps and Dice. The CPU's instruction sets are printed with them; trade-off curve:
the picture (realtime.png in --work).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

from nerve.common import arg_parser, cpu_flags, read_settings

import cv2
import numpy as np

from bench.accuracy import ROOT, SHARED, device, kaggle_arrays, run, usgra_arrays
from nerve import inference, quantize, store
from nerve.figures import pyplot, save_figure
from nerve.live import gray
from nerve.metrics import leaderboard_dice
from nerve.predictor import Predictor, overlay, predict_frames
from nerve.sources import whole_frame

# name -> (base filters, depth, input size)
CONFIGS = {
    "default": (32, 4, (96, 128)),
    "small": (16, 4, (96, 128)),
    "small_64x80": (16, 4, (64, 80)),
    "base8_64x80": (8, 4, (64, 80)),
    "depth3_64x80": (16, 3, (64, 80)),
}
QUICK_CONFIGS = ("default", "small_64x80")
EPOCHS = {"kaggle": 7, "usgra": 60}
TIMED_FRAMES = 200  # frames of the Kaggle set whose whole live work is timed (--quick: 40)
# timed, by their keys in a row
RUNTIMES = {"onnx": "fp32", "openvino": "openvino", "onnx-int8": "int8", "openvino-int8": "openvino_int8"}
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def train_and_export(arrays, results, config, epochs, logs):
    """Train one configuration on `arrays` (one split) and export it in float32 and int8; None, or why export.py
    refused the int8 model."""
    filters, depth, size = config
    if not (results / "ensemble.json").exists():
        shape = f"{size[0]}x{size[1]}"
        run(ROOT / "train.py", "--arrays", arrays, "--results", results, "--logs", logs, "--val-fraction", 0.2,
            "--epochs", epochs, "--size", shape, "--base-filters", filters, "--depth", depth)  # fmt: skip
    run(ROOT / "export.py", "--fast", "--format", "onnx", "--results", results)
    int8 = subprocess.run(
        [sys.executable, ROOT / "export.py", "--fast", "--quantize", "int8", "--results", results],
        capture_output=True,
        text=True,
    )
    print(int8.stdout.strip().splitlines()[-1] if int8.returncode == 0 else int8.stderr.strip().splitlines()[-1])
    return None if int8.returncode == 0 else int8.stderr.strip().splitlines()[-1]


def live_dice(results, runtime, names):
    """Per structure, the mean Dice on held-out frames that show it, as predict.py's live loop draws them."""
    _, frames, truth = quantize.run_frames(results)
    predictor = Predictor(results, runtime=runtime)
    drawn = [predict_frames(predictor, [frame], [[whole_frame(frame)]])[0].labels for frame in frames]
    found = {}
    for k, name in enumerate(names):
        shown = [(t == k + 1, d == k + 1) for t, d in zip(truth, drawn) if np.any(t == k + 1)]
        found[name] = float(np.mean([leaderboard_dice(t[None], d[None])[0] for t, d in shown])) if shown else None
    return found


def frames_per_second(predictor, frames):
    """Frames a second of predict.py's live work on `frames` (after two warm-up frames): predict, post-process,
    draw."""
    states = None
    for i, frame in enumerate([*frames[:2], *frames]):
        if i == 2:
            start = time.perf_counter()
        image = gray(frame)
        regions = [whole_frame(image)]
        p = predict_frames(predictor, [image], [regions], states)[0]
        overlay(image, p.labels, p.present, predictor.names, p.unknown, regions)
    return len(frames) / (time.perf_counter() - start)


def speeds(results, frames, runtimes):
    """Frames/s of each runtime (RUNTIMES), on every core and on one."""
    found = {}
    for cores in (None, 1):
        if cores:  # one core: the process pinned, the runtime and OpenCV on one thread
            everywhere = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {min(everywhere)})
            cv2.setNumThreads(1)
        for runtime in runtimes:
            predictor = Predictor(results, runtime=runtime, threads=cores)
            found[f"{RUNTIMES[runtime]}_{cores or 'all'}"] = frames_per_second(predictor, frames)
        if cores:
            os.sched_setaffinity(0, everywhere)
            cv2.setNumThreads(-1)
    return found


def dice_cells(row):
    """The (float32, int8) Dice entries of a row: dataset_structure -> pair, where the structure was shown."""
    return {k: v for k, v in row.items() if isinstance(v, tuple) and v[0] is not None}


def shown(value, digits):
    return "refused" if value is None else f"{value:.{digits}f}"


def table(rows):
    """The profile as a Markdown table: frames/s on two cores and on one (float32 through ONNX Runtime /
    OpenVINO, then int8 through the same two), Dice (float32 / int8)."""
    dice_keys = list(dice_cells(next(iter(rows.values()))))
    print("\n| model | base, depth, input | frames/s | one core | " + " | ".join(dice_keys) + " |")
    print("|---" * (4 + len(dice_keys)) + "|")
    for name, row in rows.items():
        filters, depth, size = CONFIGS[name]
        fps = [" / ".join(shown(row.get(f"{k}_{c}"), 0) for k in RUNTIMES.values()) for c in ("all", 1)]
        dice = [f"{shown(row[k][0], 3)} / {shown(row[k][1], 3)}" for k in dice_keys]
        print(f"| {name} | {filters}, {depth}, {size[0]}x{size[1]} | " + " | ".join(fps + dice) + " |")


def curve(rows, path):
    """The trade-off as a picture: per dataset and structure, held-out Dice against frames/s on two cores, each
    configuration in float32 (circles) and int8 (squares, where kept), both through OpenVINO."""
    keys = list(dice_cells(next(iter(rows.values()))))
    fig, axes = pyplot().subplots(1, len(keys), figsize=(4.6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        # (the timing's key, the Dice pair's index: float32, int8)
        for timed, index, marker, label in (("openvino", 0, "o", "float32"), ("openvino_int8", 1, "s", "int8")):
            points = [
                (name, row[f"{timed}_all"], row[key][index])
                for name, row in rows.items()
                if f"{timed}_all" in row and row[key][index] is not None
            ]
            ax.plot([p[1] for p in points], [p[2] for p in points], marker, label=label)
            for name, fps, dice in points if index == 0 else []:  # an int8 point sits by its float32 one
                ax.annotate(name, (fps, dice), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(
            title=key.replace("_", " "), xlabel="frames/s, whole live frame (OpenVINO, 2 cores)", ylabel="held-out Dice"
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def headline(rows):
    """The benchmark's `name: value` lines."""
    lines = {}
    for name, row in rows.items():
        for cores in ("all", 1):
            fps = ", ".join(f"{shown(row.get(f'{k}_{cores}'), 0)} {k}" for k in RUNTIMES.values())
            lines[f"{name}_fps" + ("_one_core" if cores == 1 else "")] = fps
        for key, (fp32, int8) in dice_cells(row).items():
            lines[f"{name}_dice_{key}"] = f"{fp32:.4f} fp32, {shown(int8, 4)} int8"
        if row["refused"]:
            lines[f"{name}_int8_refused"] = row["refused"]
    default = rows.get("default", {})
    if "int8_all" in default:
        lines["int8_speedup"] = f"{default['int8_all'] / default['fp32_all']:.2f} (whole live frame, two cores)"
        lines["int8_speedup_one_core"] = f"{default['int8_1'] / default['fp32_1']:.2f}"
        lines["int8_speedup_openvino"] = f"{default['openvino_int8_all'] / default['fp32_all']:.2f}"
        lines["int8_speedup_openvino_one_core"] = f"{default['openvino_int8_1'] / default['fp32_1']:.2f}"
        for key, (fp32, int8) in dice_cells(default).items():
            lines[f"int8_dice_change_{key}"] = "refused" if int8 is None else f"{int8 - fp32:+.4f}"
    return lines


def accuracy_row(name, datasets, args):
    """One configuration trained on each dataset and exported: its held-out Dice per dataset and structure
    (float32, int8: None where export.py refused the int8 model), and why it was refused."""
    row, refused = {}, []
    for dataset, folder in datasets.items():
        results = args.work / f"{dataset}-{name}"
        epochs = 1 if args.quick else EPOCHS[dataset]
        why = train_and_export(folder, results, CONFIGS[name], epochs, args.work / "logs")
        structures = read_settings(inference.model_dirs(results)[0])["structures"]
        fp32 = live_dice(results, "onnx", structures)
        int8 = live_dice(results, "onnx-int8", structures) if why is None else dict.fromkeys(structures)
        row.update({f"{dataset}_{s}": (fp32[s], int8[s]) for s in structures})
        refused += [f"{dataset}: {why}"] if why else []
    return {**row, "refused": "; ".join(refused)}


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="two configurations, a Kaggle subset, one epoch")
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared folder: tools/ and data/")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nerve-realtime"), help="scratch folder")
    args = ap.parse_args()
    if not (args.shared / "tools" / "make_real_input.py").exists():
        sys.exit(f"the real data tools are not at {args.shared}: this benchmark needs ../shared beside the repository")
    datasets = {"kaggle": kaggle_arrays(args.shared, args.work, args.quick)}
    if not args.quick:
        datasets["usgra"] = usgra_arrays(args.shared, args.work)
    names = QUICK_CONFIGS if args.quick else tuple(CONFIGS)
    arrays = store.load_arrays(datasets["kaggle"], ("train_images", "train_sizes"))
    kaggle_frames = store.frames(arrays, "train_images")
    timed = [kaggle_frames[i] for i in range(min(40 if args.quick else TIMED_FRAMES, len(kaggle_frames)))]
    rows = {}
    for name in names:  # first every training, export and Dice; then the timings, together, on a quiet machine
        rows[name] = accuracy_row(name, datasets, args)
    print(f"timing the live work of {len(names)} configurations on {len(timed)} frames", flush=True)
    for name in names:
        kept = rows[name]["kaggle_nerve"][1] is not None  # the timed run's int8 model: None where it was refused
        runtimes = [r for r in RUNTIMES if kept or not r.endswith("int8")]
        rows[name].update(speeds(args.work / f"kaggle-{name}", timed, runtimes))
        print(f"{name}: {rows[name]}", flush=True)
    table(rows)
    print(f"trade-off curve: {curve(rows, args.work / 'realtime.png')}")
    lines = headline(rows)
    flags = cpu_flags() or set()
    print()
    for key, value in lines.items():
        print(f"{key}: {value}")
    print(f"cpu_flags: {', '.join(f for f in SHOWN_FLAGS if f in flags)}")
    print(f"device: {device()}")


if __name__ == "__main__":
    main()
