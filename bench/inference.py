"""Inference speed on this CPU, every runtime side by side in one run.

    python -m bench.inference --quick    # fewer repetitions and video frames
    python -m bench.inference

For the default (32 base filters) and the small (16) model at 64x80 and 96x128, with untrained weights (the
speed is the same): single-frame latency under Keras' predict(), a direct Keras call, ONNX Runtime, LiteRT
and OpenVINO (where installed, as requirements.txt does: in float32, and in its own default precision,
bf16 on a CPU with bf16 units); the fastest is the fastest whose probabilities are within TOLERANCE of
Keras' (fastest_any: any, with how far it differs); batch throughput in GFLOP/s (the convolutions'
FLOPs, bench.throughput.forward_flops) against this machine's dense float32 matrix multiply, measured in the
same run; end-to-end video frames per second on the fastest runtime (decode an MP4, resize, predict one model
without the mirror view, post-process, draw: what predict.py does per frame); and the default model with the
mirror view per test image (submission.py's work) under Keras and the fastest runtime, scaled to Kaggle's
5508 test images.

Live (`--only live` alone): predict.py --live as a user runs it, in its own process, on the fastest runtime
that reproduces Keras' masks (of ONNX Runtime and OpenVINO where the runtime part is not run), exported with
--fast: 580x420 frames from a loopback OpenIGTLink server (live.Replay, as PLUS sends a probe's images) at 30
frames/s to the default model at 96x128 (live_*) and at 90 frames/s to the small one at 64x80 (live_small_*),
and a video file played as a live source at its own 30 frames/s to the default model (live_video_*):
capture-to-drawn latency p50 and p95, frames/s drawn, frames dropped, and frames drawn later than two frame
times (late), of the run whose p95 is the median of three (these shared cores vary from one minute to the
next). The runs are trained runs given with --default-run and --small-run (their held-out frames are
streamed, so that the masks and their post-processing are a real model's), else runs trained here for one
epoch on synthetic frames. The server shares the machine's cores with predict.py.
"""

import importlib.util
import itertools
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nerve.common import DEPLOY_FILE, EXPORT_DIR, LATENCY_FILE, arg_parser

import cv2
import keras
import numpy as np

from bench.throughput import forward_flops, matmul_gflops
from nerve import deploy, inference, live, model, quantize, synthetic
from nerve.figures import annotated

ROOT = Path(__file__).resolve().parent.parent

MODELS = {"default": 32, "small": 16}
SIZES = ((64, 80), (96, 128))
KAGGLE_TEST = 5508
BATCH = 32
TOLERANCE = 1e-4  # a runtime whose probabilities differ more from Keras' does not count as the fastest
EXPORTS = {"onnx": ("onnx", "model.onnx"), "litert": ("litert", "model.tflite")}
# live runs: line prefix -> (base filters, input size, frames/s offered, source)
LIVE = {
    "live_": (32, (96, 128), 30, "igtl"),
    "live_video_": (32, (96, 128), 30, "video"),
    "live_small_": (16, (64, 80), 90, "igtl"),
}
LIVE_SECONDS = 20  # of stream per run (--quick: 5)
LIVE_REPEATS = 3  # runs of each, the median reported: these shared cores vary from one minute to the next (--quick: 1)


def median_ms(repeats, run, *args):
    """The median wall time of run(*args) in milliseconds, after one warm-up call."""
    run(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def exported(net, kind, path, size):
    """An exported copy of net (input size (h, w)), run by its runtime."""
    signature = [keras.InputSpec(shape=(None, *size, 1), dtype="float32")]
    net.export(str(path), format=EXPORTS[kind][0], verbose=False, input_signature=signature)
    return inference.runner(kind, path)


def runtimes(net, work, tag):
    """name -> function (n, h, w, 1) float32 -> (mask, present, ood): every runtime this machine has."""
    found = {
        "keras_predict": lambda x: inference.mask_and_presence(net.predict(x, verbose=0)),
        "keras_call": lambda x: inference.mask_and_presence(net(x, training=False)),
    }
    for kind, (_, file) in EXPORTS.items():
        found[kind] = exported(net, kind, Path(work) / f"{tag}-{file}", net.input_shape[1:3])
    if importlib.util.find_spec("openvino"):
        import openvino

        onnx_file = Path(work) / f"{tag}-model.onnx"
        found["openvino"] = inference.runner("openvino", onnx_file)
        # OpenVINO's own default precision: bf16 on a CPU with bf16 units (faster; other masks)
        native = openvino.Core().compile_model(str(onnx_file), "CPU")
        found["openvino_native"] = lambda x: inference.mask_and_presence(dict(native(x)))
    else:
        print("openvino: not installed (pip install openvino to measure it)")
    return found


def video_fps(run, size, frames):
    """Frames per second of predict.py's per-frame work on an MP4 of synthetic frames."""
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "cine.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (580, 420))
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
        writer.release()
        capture = cv2.VideoCapture(str(path))
        specs, start, n = [deploy.DEFAULT], time.perf_counter(), 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            mask, present, _ = run(deploy.model_input(gray, size))
            labels = deploy.labels(np.asarray(mask)[0], np.asarray(present)[0], specs, gray.shape)
            annotated(gray, labels, np.asarray(present)[0], ["nerve"])
            n += 1
        return n / (time.perf_counter() - start)


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, video frames and seconds of stream")
    ap.add_argument("--only", choices=("runtimes", "live"), help="one part of the benchmark (unset: both)")
    ap.add_argument("--default-run", type=Path, help="live: a trained run of the default model at 96x128")
    ap.add_argument("--small-run", type=Path, help="live: a trained run of the small model at 64x80")
    args = ap.parse_args()
    repeats, n_frames = (10, 60) if args.quick else (50, 300)
    model.set_precision("fp32")
    frames = [f[1] for f in synthetic._subject_frames(0, 1, n_frames)]
    lines, fastest = {}, {}
    with tempfile.TemporaryDirectory() as work:
        if args.only != "live":
            peak = matmul_gflops()
            print(f"matmul: {peak:.0f} GFLOP/s (float32, 2048x2048)")
            lines["matmul_gflops"] = f"{peak:.0f}"
            for name, filters in MODELS.items():
                for size in SIZES:
                    tag = f"{name}_{size[0]}x{size[1]}"
                    net = model.build_model((*size, 1), base_filters=filters, mean=100.0, std=50.0)
                    figures, best = one_model(net, tag, work, repeats, frames, peak)
                    lines.update(figures)
                    fastest[(filters, size)] = (net, best)
            lines.update(submission_figures(*fastest[(32, (96, 128))], frames[: min(64, n_frames)], work))
        if args.only != "runtimes":
            seconds, repeats = (5, 1) if args.quick else (LIVE_SECONDS, LIVE_REPEATS)
            given, found = {32: args.default_run, 16: args.small_run}, {k: best for k, (_, best) in fastest.items()}
            lines.update(live_figures(Path(work), seconds, repeats, found, given))
    print()
    for key, value in lines.items():
        print(f"{key}: {value}")


def one_model(net, tag, work, repeats, frames, peak):
    """(the headline lines of one model in every runtime found, the fastest runtime that agrees with Keras)."""
    size = net.input_shape[1:3]
    single = np.random.default_rng(0).uniform(0, 255, (1, *size, 1)).astype(np.float32)
    batch = np.repeat(single, BATCH, axis=0)
    gflop = forward_flops(net) / 1e9
    found = runtimes(net, work, tag)
    reference = np.asarray(net(single, training=False)["mask"])
    differs = {r: float(np.abs(np.asarray(f(single)[0]) - reference).max()) for r, f in found.items()}
    latency = {r: median_ms(repeats, f, single) for r, f in found.items()}
    # LiteRT's signature takes one image at a time: its batch is a loop over them
    batch_ms = {r: median_ms(max(3, repeats // 5), f, batch) for r, f in found.items()}
    batched = {r: BATCH * gflop / (ms / 1e3) for r, ms in batch_ms.items()}
    exported_ones = [r for r in latency if not r.startswith("keras")]
    best = min((r for r in exported_ones if differs[r] <= TOLERANCE), key=latency.get)
    fastest_any = min(exported_ones, key=latency.get)
    print(f"{tag} largest difference from Keras: " + ", ".join(f"{r} {d:.1g}" for r, d in differs.items()))
    print(f"{tag}: " + ", ".join(f"{r} {ms:.1f} ms" for r, ms in latency.items()))
    print(f"{tag} batch {BATCH}: " + ", ".join(f"{r} {g:.0f} GFLOP/s" for r, g in batched.items()))
    ratio = latency[fastest_any] / latency["keras_predict"]
    top = max((r for r in batched if differs[r] <= TOLERANCE), key=batched.get)  # float32 vs matmul
    lines = {
        f"{tag}_keras_predict_ms": f"{latency['keras_predict']:.1f}",
        f"{tag}_fastest_ms": f"{latency[best]:.1f} ({best})",
        f"{tag}_latency_ratio": f"{latency[best] / latency['keras_predict']:.3f}",
        f"{tag}_fastest_any_ms": (
            f"{latency[fastest_any]:.1f} ({fastest_any}, ratio {ratio:.3f}, differs {differs[fastest_any]:.1g})"
        ),
        f"{tag}_batch_flops_ratio": f"{batched[top] / peak:.2f} ({top})",
        f"video_fps_{tag}": f"{video_fps(found[best], size, frames):.1f} ({best})",
    }
    return lines, best


def submission_figures(net, best, images, work):
    """submission.py's time per test image, one model with the mirror view: Keras against the fastest export."""
    submission = inference.Serving([net], "hflip")
    keras_ms = median_ms(2, _per_image, lambda x: inference.predict([net], x[..., 0], "hflip"), images)
    kind = best if best in EXPORTS else "onnx"
    run = exported(submission, kind, Path(work) / f"submission-{EXPORTS[kind][1]}", (96, 128))
    if best == "openvino":  # it runs the ONNX file
        kind, run = best, inference.runner(best, Path(work) / "submission-model.onnx")
    fast_ms = median_ms(2, _per_image, run, images)
    per_image = {"keras": keras_ms / len(images), kind: fast_ms / len(images)}
    print(f"default 96x128 with the mirror view, per test image: {per_image}")
    return {
        "submission_ms_per_image_keras": f"{per_image['keras']:.1f}",
        f"submission_ms_per_image_{kind}": f"{per_image[kind]:.1f}",
        "kaggle_test_minutes_keras": f"{per_image['keras'] * KAGGLE_TEST / 6e4:.1f}",
        f"kaggle_test_minutes_{kind}": f"{per_image[kind] * KAGGLE_TEST / 6e4:.1f}",
        "test_set_speedup": f"{per_image['keras'] / per_image[kind]:.1f}",
    }


def _per_image(run, images):
    """Resize, predict and post-process images at their own size, as submission.py does, in batches of BATCH."""
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        x = np.concatenate([deploy.model_input(image, (96, 128)) for image in chunk])
        mask, present, _ = run(x)
        for image, m, p in zip(chunk, np.asarray(mask), np.asarray(present)):
            deploy.labels(m.reshape(*m.shape[:2], -1), np.reshape(p, -1), [deploy.DEFAULT], image.shape)


def script(*args):
    """Run one of the project's commands; stop the benchmark if it fails."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"benchmark stopped: {Path(args[0]).name} failed: {result.stderr[-2000:]}")
    return result


def live_run(work, filters, size, runtime, given=None):
    """A run of `filters` base filters at `size` exported with --fast for `runtime` (OpenVINO runs the ONNX export,
    into the run's export folder): `given`, else one trained here for one epoch on a small synthetic set."""
    arrays, results = work / "live-input", given or work / f"live-{filters}-{size[0]}x{size[1]}"
    if given is None and not (arrays / "train_images.npy").exists():
        script(ROOT / "data.py", "--synthetic", "--dataset", arrays, "--subjects", 3, "--frames", 12)
    if not (results / "ensemble.json").exists():
        shape = f"{size[0]}x{size[1]}"
        flags = [
            "--epochs",
            1,
            "--size",
            shape,
            "--base-filters",
            filters,
            "--precision",
            "fp32",
            "--val-fraction",
            0.34,
        ]
        script(ROOT / "train.py", "--arrays", arrays, "--results", results, "--logs", work / "logs", *flags)
    # as a user would: the live model is one model without the mirror view, in the run's export folder
    script(ROOT / "export.py", "--fast", "--format", "onnx" if runtime == "openvino" else runtime, "--results", results)
    return results


def fastest_export(results):
    """Of ONNX Runtime and OpenVINO (where installed), the faster on `results`' ONNX export whose probabilities are
    within TOLERANCE of ONNX Runtime's."""
    path = results / EXPORT_DIR / "onnx" / "model.onnx"
    found = {"onnx": inference.runner("onnx", path)}
    if importlib.util.find_spec("openvino"):
        found["openvino"] = inference.runner("openvino", path)
    size = json.loads((path.parent / DEPLOY_FILE).read_text())["size"]
    x = np.random.default_rng(0).uniform(0, 255, (1, *size, 1)).astype(np.float32)
    reference = found["onnx"](x)[0]
    agree = [r for r, run in found.items() if np.abs(run(x)[0] - reference).max() <= TOLERANCE]
    latency = {r: median_ms(20, found[r], x) for r in agree}
    print(f"{results.name}: " + ", ".join(f"{r} {ms:.1f} ms" for r, ms in latency.items()))
    return min(latency, key=latency.get)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_stream(results, runtime, source, out):
    """predict.py --live SOURCE on `results`' export in its own process: its live_latency.json."""
    script(ROOT / "predict.py", "--live", source, "--results", results, "--runtime", runtime, "--output", out,
           "--no-window", "--live-timeout", 5)  # fmt: skip
    return json.loads((out / LATENCY_FILE).read_text())


def live_figures(work, seconds, repeats, fastest, given):
    """The live lines: each of LIVE streamed to predict.py --live `repeats` times, the run of median p95 latency
    reported with the range of all (fastest: (filters, size) -> the runtime that reproduces Keras' masks, where
    the runtime part measured it; given: filters -> a trained run or None)."""
    lines = {}
    for prefix, (filters, size, fps, source) in LIVE.items():
        # exported once: where the runtime part did not pick a runtime, the ONNX file that both candidates run
        results = live_run(work, filters, size, fastest.get((filters, size), "onnx"), given[filters])
        runtime = fastest.get((filters, size)) or fastest_export(results)
        frames = quantize.run_frames(results)[1]  # the run's held-out frames, in order
        played = list(itertools.islice(itertools.cycle(frames), int(fps * seconds)))
        runs = sorted(
            (stream_once(results, runtime, played, fps, source, work / f"{prefix}out") for _ in range(repeats)),
            key=lambda f: f["latency_p95_ms"],
        )
        figures = runs[len(runs) // 2]
        what = f"{source}, base {filters} at {size[0]}x{size[1]}, {runtime}, {fps} frames/s offered"
        spread = f"; p95 of the {repeats} runs {runs[0]['latency_p95_ms']:.1f}-{runs[-1]['latency_p95_ms']:.1f}"
        print(f"{prefix}: {live.summary_line(figures)} ({what}{spread})")
        lines.update(
            {
                f"{prefix}latency_p50_ms": f"{figures['latency_p50_ms']:.1f} ({what})",
                f"{prefix}latency_p95_ms": f"{figures['latency_p95_ms']:.1f} (the median of {repeats} runs{spread})",
                f"{prefix}fps": f"{figures['fps_drawn']:.1f}",
                f"{prefix}dropped": f"{figures['frames_dropped']} of {figures['frames_offered']}",
                f"{prefix}late": f"{figures['frames_late']}",
            }
        )
    return lines


def stream_once(results, runtime, played, fps, source, out):
    """One predict.py --live run on `played` frames at `fps`, from a video file or a loopback OpenIGTLink server."""
    if source == "video":
        path = out.parent / "live.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, played[0].shape[::-1])
        for frame in played:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
        writer.release()
        return live_stream(results, runtime, path, out)
    port = free_port()
    with live.Replay(played, port, fps):
        return live_stream(results, runtime, f"{live.IGTL_PREFIX}127.0.0.1:{port}", out)


if __name__ == "__main__":
    main()
