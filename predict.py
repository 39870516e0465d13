"""Predict on new scans with the trained models in results/: image files, folders, videos and DICOM.

    python predict.py scan.png                       # results/predictions/scan_mask.png, scan_overlay.png
    python predict.py scans/ loop.mp4 --output out   # a folder (recursively) and a video, frame by frame
    python predict.py cine.dcm --smooth 3            # presence hysteresis over frames against flicker
    python predict.py scans/ --fast                  # one model, no mirror view
    python predict.py --live 0 --runtime onnx        # a capture device live: igtl://host:port for OpenIGTLink

Each input is predicted at its own size with the ensemble, mirror view and tuned post-processing that
evaluate.py and submission.py use (deploy.py's functions, which an exported model's application calls too).
Per image: {name}_mask.png (0/255 for one structure; labels 1..K for several) and {name}_overlay.png (each
structure outlined in its colour, with its presence probability). Per video or multi-frame DICOM:
{name}_overlay.mp4 and {name}_frames.csv (frame, time, and per structure presence, area, centroid and
bounding box). For all still images: predictions.csv and predictions.json. Every image and frame has its
out-of-distribution score (ood_score; 1 is the threshold set on frames of subjects held out in training, nerve/ood.py):
above --ood-threshold it is not a scan this model knows, and it gets no mask and says so.

DICOM goes through pydicom (with python-gdcm for the JPEG syntaxes): each tissue region of its Sequence of
Ultrasound Regions is predicted on its own, in mm where the region gives its pixel size, and a DICOM SEG of the
masks goes beside them (README.md, "DICOM"). A bad input is reported in one line and skipped.

--live SOURCE segments the newest frame of a stream (nerve/live.py: a frame grabber, a URL or pipeline OpenCV
opens, a video played at its own rate, or an OpenIGTLink server's images) until it ends, q or Esc in its window,
or Ctrl-C; a slow model drops frames rather than fall behind. It shows the overlay where a display exists and
writes live_overlay.mp4, live_frames.csv (with each frame's capture-to-drawn latency, as the stream runs) and
live_latency.json (p50, p95 and max latency, frames/s, frames dropped).
"""

import csv
import dataclasses
import itertools
import sys
from pathlib import Path

from nerve.common import (
    FRAMES_FILE,
    LATENCY_FILE,
    LIVE_NAME,
    MASK_FILE,
    OVERLAY_FILE,
    OVERLAY_VIDEO_FILE,
    PREDICTIONS_DIR,
    SEG_FILE,
    SUMMARY_FILE,
    UserError,
    add_flags,
    arg_parser,
    atomic_path,
    output_folder,
    run_cli,
    write_json,
)

import cv2
import numpy as np
from tqdm import tqdm

from nerve import deploy, inference, live, model
from nerve.images import read_image
from nerve.layouts import IMAGE_SUFFIXES
from nerve.predictor import RUNTIMES, Predictor, overlay, predict_frames
from nerve.seg import write_seg
from nerve.sources import VIDEO_SUFFIXES, Region, Scan, dicom_scan, input_files, video_scan


def write_png(path, image):
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise UserError(f"cannot write {path}")


def mask_png(labels, structures):
    """What {name}_mask.png holds: 0/255 for one structure, the label map itself for several."""
    return (labels > 0).astype(np.uint8) * 255 if structures == 1 else labels


def write_csv(path, rows):
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        columns = list(dict.fromkeys(key for row in rows for key in row)) or ["frame"]  # mm where a region has them
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def predict_stills(predictor, stills, out, failed, dicom_seg=True):
    """Masks and overlays of still images (and single-frame DICOM, with a DICOM SEG unless not `dicom_seg`),
    given as (path, name, Scan), each read when its chunk comes (a bad one is added to `failed`); return their
    summary rows, one per region."""
    rows = []
    for start in tqdm(range(0, len(stills), inference.CHUNK), desc="images", unit="chunk", leave=False):
        chunk, images = [], []
        for path, name, scan in stills[start : start + inference.CHUNK]:
            try:
                images.append(next(iter(scan.frames)))
            except UserError as e:
                skip(e, path, failed)
                continue
            chunk.append((path, name, scan))
        if not chunk:
            continue
        regions = [scan.regions_of(image) for (*_, scan), image in zip(chunk, images)]
        for (path, name, scan), image, rs, p in zip(chunk, images, regions, predict_frames(predictor, images, regions)):
            mask_name = MASK_FILE.format(name=name)
            write_png(out / mask_name, mask_png(p.labels, len(predictor.names)))
            if dicom_seg and scan.dataset is not None:
                seg_beside(out / SEG_FILE.format(name=name), scan.dataset, [p.labels], predictor.names)
            picture = overlay(image, p.labels, p.present, predictor.names, p.unknown, rs)
            write_png(out / OVERLAY_FILE.format(name=name), picture)
            size = {"height": image.shape[0], "width": image.shape[1]}
            rows += [{"file": str(path), **size, "mask": mask_name, **row} for row in p.rows]
    return rows


def skip(error, path, failed):
    """Report a bad input in one line and add it to `failed`: the others are still predicted."""
    print(f"skipped: {error}", file=sys.stderr)
    failed.append(path.name)


def read_still(path):
    try:
        return read_image(path)
    except ValueError as e:
        raise UserError(f"{path} {e}") from None


def predict_sequence(predictor, scan, name, out, smooth, dicom_seg=True):
    """The overlay video and per-frame CSV (a row per frame and region) of a Scan of several frames, and for a
    DICOM file its SEG unless not `dicom_seg`; return the rows."""
    rows, writer, states, n, drawn = [], None, None, 0, []
    with atomic_path(out / OVERLAY_VIDEO_FILE.format(name=name)) as tmp:
        bar = tqdm(total=scan.count, desc=name.name, unit="frame", leave=False)
        frames = iter(scan.frames)
        while batch := list(itertools.islice(frames, inference.CHUNK)):
            regions = [scan.regions_of(image) for image in batch]
            states = states or [deploy.Hysteresis(smooth, len(predictor.names)) for _ in regions[0]]
            predicted = predict_frames(predictor, batch, regions, states)
            for image, rs, p in zip(batch, regions, predicted):
                if writer is None:
                    size = (image.shape[1], image.shape[0])
                    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), scan.fps, size)
                writer.write(overlay(image, p.labels, p.present, predictor.names, p.unknown, rs))
                drawn += [p.labels] if dicom_seg and scan.dataset is not None else []
                rows += [{"frame": n, "time_s": round(scan.time(n), 4), **row} for row in p.rows]
                n += 1
            bar.update(len(batch))
        bar.close()
        if writer is not None:
            writer.release()
    write_csv(out / FRAMES_FILE.format(name=name), rows)
    if drawn:
        seg_beside(out / SEG_FILE.format(name=name), scan.dataset, drawn, predictor.names)
    return rows


def seg_beside(path, dataset, labels, names):
    """The DICOM SEG of a DICOM input's label maps, or one line saying why there is none (the masks are written
    all the same)."""
    try:
        write_seg(path, dataset, np.stack(labels), names)
    except UserError as e:
        print(e, file=sys.stderr)


def scan_of(path, region=None, spacing=None):
    """The Scan of one input: a DICOM file with its own tissue regions, mm and frame times; a video or an image
    in `region` (a Region, or the whole frame) at `spacing` mm per pixel where given."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        scan = video_scan(path)
    elif suffix in IMAGE_SUFFIXES:
        scan = Scan((read_still(p) for p in [path]), 1)  # read when its chunk is predicted
    else:  # DICOM, by its suffix or its preamble
        return dicom_scan(path)
    scan.spacing = spacing
    scan.regions = [dataclasses.replace(region, spacing=spacing)] if region else []
    return scan


def main(argv=None):
    args = flag_parser().parse_args(argv)
    check_flags(args)
    files = input_files(args.paths) if args.paths else []
    out = output_folder(args.output or args.results / PREDICTIONS_DIR, "--output")
    model.set_precision(args.precision)
    predictor = Predictor(args.results, args.fast, args.tta, args.batch_size, args.runtime, args.ood_threshold)
    print(predictor.describe())
    if args.live:
        predict_live(args, predictor, out)
    else:
        predict_files(args, files, predictor, out)


def check_flags(args):
    if args.smooth < 0 or args.batch_size < 1 or (args.ood_threshold or 0) < 0 or args.live_timeout <= 0:
        raise UserError(
            "--smooth and --ood-threshold must not be negative, --batch-size must be at least 1 and --live-timeout "
            "more than 0"
        )
    if bool(args.paths) == bool(args.live):
        raise UserError("give the inputs to predict, or --live SOURCE for a stream, not both")
    if args.send_labels and not (args.live or "").startswith(live.IGTL_PREFIX):
        raise UserError(f"--send-labels sends over OpenIGTLink: give --live {live.IGTL_PREFIX}host:port")


def predict_live(args, predictor, out):
    """--live: the stream's frames until it ends; its latency figures printed."""
    if args.runtime == "keras":
        print("live through Keras, whose calls are slow on a CPU: `python export.py --fast`, then --runtime openvino")
    predictor.probabilities([np.zeros(predictor.size, np.uint8)])  # the first call compiles: not on a frame
    source = live.open_source(args.live)
    figures = live.stream(
        predictor, source, out, args.smooth, args.region, args.spacing, args.live_timeout, not args.no_window,
        args.send_labels,
    )  # fmt: skip
    written = f"{OVERLAY_VIDEO_FILE.format(name=LIVE_NAME)}, {FRAMES_FILE.format(name=LIVE_NAME)}, {LATENCY_FILE}"
    print(f"{args.live}: {live.summary_line(figures)} -> {out}/{written}")


def predict_files(args, files, predictor, out):
    """Every input file: videos and cine loops one by one, stills in chunks; a bad one skipped and counted."""
    stills, failed = [], []
    for path, name in files:
        try:
            scan = scan_of(path, args.region, args.spacing)
            if scan.count == 1:
                stills.append((path, name, scan))
                continue
            rows = predict_sequence(predictor, scan, name, out, args.smooth, not args.no_seg)
        except UserError as e:
            skip(e, path, failed)
            continue
        written = f"{OVERLAY_VIDEO_FILE.format(name=name)}, {FRAMES_FILE.format(name=name)}"
        timing = f"{scan.fps:.3g} frames/s from {scan.timing}"
        print(f"{path}: {scan.count or len(rows)} frames, {timing}{unknown_note(rows)} -> {out}/{written}")
    if stills:
        rows = predict_stills(predictor, stills, out, failed, not args.no_seg)
        write_csv(out / SUMMARY_FILE.format(ext="csv"), rows)
        summary = {"models": predictor.describe(), "ood_threshold": predictor.ood_threshold, "images": rows}
        write_json(out / SUMMARY_FILE.format(ext="json"), summary)
        print(
            f"{len({row['file'] for row in rows})} image(s){unknown_note(rows)} -> {out}/ (masks, overlays, "
            f"{SUMMARY_FILE.format(ext='csv')} and .json)"
        )
    if failed:
        raise UserError(
            f"{len(files) - len(failed)} of {len(files)} inputs written; {len(failed)} failed: {', '.join(failed)}"
        )


def flag_parser():
    ap = arg_parser(__doc__)
    ap.add_argument("paths", nargs="*", type=Path, help="image files, folders, videos, DICOM files")
    ap.add_argument(
        "--live",
        metavar="SOURCE",
        help=f"a stream instead: a capture device index (0), a URL, pipeline or video OpenCV opens, or "
        f"{live.IGTL_PREFIX}host:port (OpenIGTLink)",
    )
    ap.add_argument(
        "--live-timeout", type=float, default=10.0, help="--live: seconds without a frame that end the stream"
    )
    ap.add_argument("--no-window", action="store_true", help="--live: no window even where a display exists")
    ap.add_argument(
        "--send-labels", action="store_true", help="--live igtl://: send each label map back as an image message"
    )
    ap.add_argument("--output", type=Path, help=f"where the outputs go; unset: results/{PREDICTIONS_DIR}")
    ap.add_argument("--fast", action="store_true", help="the first model alone, without the mirror view")
    smooth = "video: a structure is shown after this many frames that show it and hidden after as many that do not"
    ap.add_argument("--smooth", type=int, default=0, help=f"{smooth} (0: each frame on its own)")
    ap.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="keras",
        help="keras: the models in --results; else the artefact `python export.py --format RUNTIME` wrote",
    )
    ap.add_argument(
        "--ood-threshold",
        type=float,
        default=None,
        help="out-of-distribution score above which an image is not a scan the model knows and gets no mask; "
        f"unset: {deploy.OOD_THRESHOLD:g} (the threshold set on held-out subjects' frames), or deploy.json's",
    )
    ap.add_argument(
        "--region",
        type=parse_region,
        default=None,
        help="images and videos: predict only in the rectangle x,y,w,h (pixels; DICOM files give their own)",
    )
    where = "images and videos: mm per pixel, 0.1 or 0.1x0.12 (rows x columns), for areas, depths and boxes in mm"
    add_flags(ap, "spacing", spacing=dict(help=f"{where} (DICOM files give their own)"))
    ap.add_argument("--no-seg", action="store_true", help=f"no DICOM SEG ({SEG_FILE}) beside a DICOM input's masks")
    add_flags(ap, "results", "tta", "precision", "batch-size")
    return ap


def parse_region(text):
    """'x,y,w,h' -> a Region."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--region {text!r} is not x,y,w,h in pixels, e.g. 120,60,680,458") from None
    if min(x, y) < 0 or min(w, h) < 1:
        raise UserError(f"--region {text!r}: x and y must not be negative, w and h at least 1")
    return Region(x, y, w, h)


def unknown_note(rows):
    """', N not scans this model knows' where the out-of-distribution score flagged any of the rows."""
    n = sum(row["unknown_scan"] for row in rows)
    return f", {n} not scans this model knows (no mask)" if n else ""


if __name__ == "__main__":
    run_cli(main)
