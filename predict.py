"""Predict on new scans with the trained models in results/: image files, folders, videos and DICOM.

    python predict.py scan.png                       # results/predictions/scan_mask.png, scan_overlay.png
    python predict.py scans/ loop.mp4 --output out   # a folder (recursively) and a video, frame by frame
    python predict.py cine.dcm --smooth 3            # presence hysteresis over frames against flicker
    python predict.py scans/ --fast                  # one model, no mirror view

Each input is predicted at its own size with the ensemble, mirror view and tuned post-processing that
evaluate.py and submission.py use (deploy.py's functions, which an exported model's application calls too).
Per image: {name}_mask.png (0/255 for one structure; labels 1..K for several) and {name}_overlay.png (each
structure outlined in its colour, with its presence probability). Per video or multi-frame DICOM:
{name}_overlay.mp4 and {name}_frames.csv (frame, time, and per structure presence, area, centroid and
bounding box). For all still images: predictions.csv and predictions.json. Every image and frame has its
out-of-distribution score (ood_score; 1 is the threshold set on frames of subjects held out in training, nerve/ood.py):
above --ood-threshold it is not a scan this model knows, and it gets no mask and says so.

DICOM goes through pydicom: uncompressed pixel data (implicit or explicit VR little endian, explicit VR big
endian, deflated) and RLE lossless decode everywhere; JPEG and JPEG 2000 syntaxes only where a pydicom
decoder plugin for them is installed (pillow covers JPEG baseline); any other is refused, naming it.
"""

import csv
import itertools
from pathlib import Path

from nerve.common import (
    DEPLOY_FILE,
    EXPORT_DIR,
    FRAMES_FILE,
    MASK_FILE,
    OVERLAY_FILE,
    OVERLAY_VIDEO_FILE,
    PREDICTIONS_DIR,
    SUMMARY_FILE,
    NonNegative,
    Positive,
    Size,
    StateFile,
    UserError,
    add_flags,
    arg_parser,
    atomic_path,
    output_folder,
    read_state,
    run_cli,
    write_json,
)

import cv2
import numpy as np
from tqdm import tqdm

from nerve import deploy, inference, model, postprocess
from nerve.figures import annotated
from nerve.images import read_image
from nerve.layouts import IMAGE_SUFFIXES
from nerve.sources import DEFAULT_FPS, VIDEO_SUFFIXES, dicom_frames, input_files, video_frames

RUNTIMES = ("keras", "onnx", "litert", "savedmodel", "openvino")  # openvino runs the onnx export


class Deployed(StateFile):
    """What predict.py reads of export.py's deploy.json."""

    artefact: str
    size: Size
    structures: list[str]
    postprocess: list[dict]
    models: Positive
    tta: str
    ood_threshold: NonNegative


class Predictor:
    """The run's models (through Keras, or an artefact export.py wrote, through its own runtime), views and
    tuned specs, predicting label maps at each image's own size."""

    def __init__(self, results, fast=False, tta=None, batch_size=32, runtime="keras", ood_threshold=None):
        self.batch_size, self.runtime = batch_size, runtime
        self.ood_threshold = deploy.OOD_THRESHOLD if ood_threshold is None else ood_threshold
        if runtime == "keras":
            nets, self.size, settings = inference.load_models(results)
            self.nets = nets[:1] if fast else nets
            self.tta = "none" if fast else tta or settings["tta"]
            self.views = f"{len(self.nets)} model(s), tta {self.tta}"
            self.names = settings["structures"]
            self.specs = postprocess.load(results, self.names)
            return
        if fast or tta:
            raise UserError(f"--runtime {runtime} runs the views exported with it: drop --fast and --tta")
        kind = "onnx" if runtime == "openvino" else runtime
        folder = Path(results) / EXPORT_DIR / kind
        remedy = f"export it with `python export.py --format {kind} --results {results}`"
        # an export of an earlier release has no score: nan, which flags nothing
        exported = read_state(
            folder / DEPLOY_FILE, Deployed, remedy, lambda d: {"ood_threshold": deploy.OOD_THRESHOLD, **d}
        )
        self.size, self.names, self.specs = (
            tuple(exported["size"]),
            exported["structures"],
            [deploy.upgraded(s) for s in exported["postprocess"]],
        )
        self.ood_threshold = exported["ood_threshold"] if ood_threshold is None else ood_threshold
        self.views = f"{exported['models']} model(s), tta {exported['tta']}, {runtime}"
        self.run = inference.runner(runtime, folder / exported["artefact"])

    def describe(self):
        return f"{self.views}, at {self.size[0]}x{self.size[1]}: {', '.join(self.names)}"

    def probabilities(self, images):
        """(probabilities at the models' size (n, h, w, K), presence (n, K), out-of-distribution score (n,)) of
        gray uint8 images."""
        small = np.stack([deploy.resize(image, self.size) for image in images])
        if self.runtime == "keras":
            return inference.predict(self.nets, small, self.tta, self.batch_size)
        parts = [
            self.run(small[i : i + self.batch_size, ..., None].astype(np.float32))
            for i in range(0, len(small), self.batch_size)
        ]
        return tuple(np.concatenate([part[k] for part in parts]) for k in range(3))

    def masks(self, image, probs, present, ood):
        """(per-structure 0/1 masks at the image's size (H, W, K) before the gate, whether each structure is
        shown (a mask that passes the gate, in a scan the model knows), whether the scan is unknown, the
        probabilities at that size). What is drawn is masks * shown, or masks * a decision smoothed over frames."""
        full = deploy.full_size(probs, image.shape).reshape(*image.shape, -1)
        ungated = [{**spec, "presence_threshold": 0.0, "min_area_fraction": 0.0} for spec in self.specs]
        masks = deploy.apply_each(full[None], present[None], ungated)[0]
        share = masks.reshape(-1, masks.shape[-1]).mean(axis=0)  # the gate's unit: a share of the image
        gated = np.array([deploy.gate(present[k], share[k], spec)[0] for k, spec in enumerate(self.specs)])
        unknown = bool(deploy.unknown(ood, self.ood_threshold))
        return masks, gated & (share > 0) & (not unknown), unknown, full


def structure_row(names, present, masks, ood, unknown):
    """The out-of-distribution score and flag, and per structure: presence probability, area, centroid and
    bounding box of its mask."""
    row = {"ood_score": round(float(ood), 4) if np.isfinite(ood) else "", "unknown_scan": unknown}
    for k, name in enumerate(names):
        ys, xs = np.nonzero(masks[..., k])
        found = len(xs) > 0
        row.update(
            {
                f"{name}_presence": round(float(present[k]), 4),
                f"{name}_area": int(len(xs)),
                f"{name}_cx": round(float(xs.mean()), 1) if found else "",
                f"{name}_cy": round(float(ys.mean()), 1) if found else "",
                f"{name}_x": int(xs.min()) if found else "",
                f"{name}_y": int(ys.min()) if found else "",
                f"{name}_w": int(xs.max() - xs.min() + 1) if found else "",
                f"{name}_h": int(ys.max() - ys.min() + 1) if found else "",
            }
        )
    return row


def write_png(path, image):
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise UserError(f"cannot write {path}")


def mask_png(labels, structures):
    """What {name}_mask.png holds: 0/255 for one structure, the label map itself for several."""
    return (labels > 0).astype(np.uint8) * 255 if structures == 1 else labels


def write_csv(path, rows):
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["frame"])
        writer.writeheader()
        writer.writerows(rows)


def predict_stills(predictor, files, out):
    """Masks and overlays of still images (and single-frame DICOM); return their summary rows."""
    rows = []
    for start in tqdm(range(0, len(files), inference.CHUNK), desc="images", unit="chunk", leave=False):
        chunk = files[start : start + inference.CHUNK]
        images = [read_still(path) for path, _ in chunk]
        for (path, name), image, *prediction in zip(chunk, images, *predictor.probabilities(images)):
            masks, kept, unknown, full = predictor.masks(image, *prediction)
            masks = masks * kept.astype(np.uint8)
            labels = deploy.label_map(masks[None], full[None])[0]
            mask_name = MASK_FILE.format(name=name)
            write_png(out / mask_name, mask_png(labels, len(predictor.names)))
            overlay = annotated(image, labels, prediction[1], predictor.names, unknown)
            write_png(out / OVERLAY_FILE.format(name=name), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
            size = {"height": image.shape[0], "width": image.shape[1]}
            row = structure_row(predictor.names, prediction[1], masks, prediction[2], unknown)
            rows.append({"file": str(path), **size, "mask": mask_name, **row})
    return rows


def read_still(path):
    if path.suffix.lower() not in IMAGE_SUFFIXES:  # input_files let it in as DICOM
        return dicom_frames(path)[0][0]
    try:
        return read_image(path)
    except ValueError as e:
        raise UserError(f"{path} {e}") from None


def predict_sequence(predictor, frames, fps, count, name, out, smooth):
    """The overlay video and per-frame CSV of a sequence of gray frames; return its rows."""
    rows, writer, state = [], None, deploy.Hysteresis(smooth, len(predictor.names))
    with atomic_path(out / OVERLAY_VIDEO_FILE.format(name=name)) as tmp:
        bar = tqdm(total=count, desc=name.name, unit="frame", leave=False)
        batch = []
        for frame in itertools.chain(frames, [None]):  # None: the end, where the last batch goes
            if frame is not None:
                batch.append(frame)
            if batch and (frame is None or len(batch) == inference.CHUNK):
                for image, *prediction in zip(batch, *predictor.probabilities(batch)):
                    masks, kept, unknown, full = predictor.masks(image, *prediction)
                    masks = masks * state.update(kept).astype(np.uint8)
                    labels = deploy.label_map(masks[None], full[None])[0]
                    drawn = annotated(image, labels, prediction[1], predictor.names, unknown)
                    drawn = cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)
                    if writer is None:
                        size = (image.shape[1], image.shape[0])
                        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
                    writer.write(drawn)
                    timing = {"frame": len(rows), "time_s": round(len(rows) / fps, 4)}
                    row = structure_row(predictor.names, prediction[1], masks, prediction[2], unknown)
                    rows.append({**timing, **row})
                bar.update(len(batch))
                batch = []
        bar.close()
        if writer is not None:
            writer.release()
    write_csv(out / FRAMES_FILE.format(name=name), rows)
    return rows


def main(argv=None):
    ap = arg_parser(__doc__)
    ap.add_argument("paths", nargs="+", type=Path, help="image files, folders, videos, DICOM files")
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
    add_flags(ap, "results", "tta", "precision", "batch-size")
    args = ap.parse_args(argv)
    if args.smooth < 0 or args.batch_size < 1 or (args.ood_threshold or 0) < 0:
        raise UserError("--smooth and --ood-threshold must not be negative and --batch-size must be at least 1")
    files = input_files(args.paths)
    out = output_folder(args.output or args.results / PREDICTIONS_DIR, "--output")
    model.set_precision(args.precision)
    predictor = Predictor(args.results, args.fast, args.tta, args.batch_size, args.runtime, args.ood_threshold)
    print(predictor.describe())
    stills, sequences = [], []
    for path, name in files:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            sequences.append((path, name, *video_frames(path)))
        elif path.suffix.lower() not in IMAGE_SUFFIXES:  # DICOM, by suffix or by its preamble
            frames, fps = dicom_frames(path)
            if len(frames) > 1:
                sequences.append((path, name, iter(frames), fps or DEFAULT_FPS, len(frames)))
            else:
                stills.append((path, name))
        else:
            stills.append((path, name))
    for path, name, frames, fps, count in sequences:
        rows = predict_sequence(predictor, frames, fps, count, name, out, args.smooth)
        written = f"{OVERLAY_VIDEO_FILE.format(name=name)}, {FRAMES_FILE.format(name=name)}"
        print(f"{path}: {len(rows)} frames{unknown_note(rows)} -> {out}/{written}")
    if stills:
        rows = predict_stills(predictor, stills, out)
        write_csv(out / SUMMARY_FILE.format(ext="csv"), rows)
        summary = {"models": predictor.describe(), "ood_threshold": predictor.ood_threshold, "images": rows}
        write_json(out / SUMMARY_FILE.format(ext="json"), summary)
        print(
            f"{len(rows)} image(s){unknown_note(rows)} -> {out}/ (masks, overlays, "
            f"{SUMMARY_FILE.format(ext='csv')} and .json)"
        )


def unknown_note(rows):
    """', N not scans this model knows' where the out-of-distribution score flagged any of the rows."""
    n = sum(row["unknown_scan"] for row in rows)
    return f", {n} not scans this model knows (no mask)" if n else ""


if __name__ == "__main__":
    run_cli(main)
