"""Predicting frames with a trained run: its models through Keras or an exported artefact through its runtime,
each frame's regions predicted on their own at the models' size, post-processed at their own size by deploy.py's
functions and put back in place, with a row of figures per region (pixels, and mm where the spacing is known)
and the overlay drawn. predict.py, its --live stream and the benchmarks call these."""

import dataclasses
from pathlib import Path

from nerve.common import DEPLOY_FILE, EXPORT_DIR, NonNegative, Positive, Size, StateFile, UserError, read_state

import cv2
import numpy as np

from nerve import deploy, inference, postprocess
from nerve.figures import annotated

# an export's runtime -> (the export's folder in results/export/, the export.py flags that write it)
EXPORTS = {
    "onnx": ("onnx", "--format onnx"),
    "onnx-int8": ("onnx-int8", "--quantize int8"),
    "litert": ("litert", "--format litert"),
    "savedmodel": ("savedmodel", "--format savedmodel"),
    "openvino": ("onnx", "--format onnx"),  # OpenVINO runs the ONNX file
    "openvino-int8": ("onnx-int8", "--quantize int8"),  # and the int8 one, whose QDQ nodes it runs in int8
}
RUNTIMES = ("keras", *EXPORTS)


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
    tuned specs, predicting label maps at each image's own size (an export's runtime on `threads` cores where given)."""

    def __init__(self, results, fast=False, tta=None, batch_size=32, runtime="keras", ood_threshold=None, threads=None):
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
        kind, flags = EXPORTS[runtime]
        folder = Path(results) / EXPORT_DIR / kind
        remedy = f"export it with `python export.py {flags} --results {results}`"
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
        self.run = inference.runner(runtime.removesuffix("-int8"), folder / exported["artefact"], threads)

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


def geometry(mask):
    """(pixels, centroid (x, y), bounding box (x, y, w, h)) of a 0/1 mask; centroid nan where it is empty."""
    mask = np.ascontiguousarray(mask, np.uint8)
    moments = cv2.moments(mask, binaryImage=True)
    area = int(moments["m00"])
    centroid = (moments["m10"] / area, moments["m01"] / area) if area else (np.nan, np.nan)
    return area, centroid, cv2.boundingRect(mask)


def structure_row(names, present, masks, ood, unknown, region):
    """One region's row: its place and mm per pixel, the out-of-distribution score and flag, and per structure the
    presence probability and the area, centroid and bounding box of its mask (masks: at the region's size), in
    the frame's pixels and, where the region's spacing is known, in mm (depth: below the region's top edge,
    the skin line of a B-mode image)."""
    score = round(float(ood), 4) if np.isfinite(ood) else ""
    row = {"region": region.describe(), "ood_score": score, "unknown_scan": unknown}
    sy, sx = region.spacing or (np.nan, np.nan)
    for k, name in enumerate(names):
        area, (cx, cy), (x, y, w, h) = geometry(masks[..., k])
        found = area > 0
        row.update(
            {
                f"{name}_presence": round(float(present[k]), 4),
                f"{name}_area": area,
                f"{name}_cx": round(cx + region.x, 1) if found else "",
                f"{name}_cy": round(cy + region.y, 1) if found else "",
                f"{name}_x": x + region.x if found else "",
                f"{name}_y": y + region.y if found else "",
                f"{name}_w": w if found else "",
                f"{name}_h": h if found else "",
            }
        )
        if region.spacing:
            row.update(
                {
                    f"{name}_area_mm2": round(area * sy * sx, 3),
                    f"{name}_depth_mm": round(cy * sy, 2) if found else "",
                    f"{name}_top_mm": round(y * sy, 2) if found else "",
                    f"{name}_w_mm": round(w * sx, 2) if found else "",
                    f"{name}_h_mm": round(h * sy, 2) if found else "",
                }
            )
    return row


@dataclasses.dataclass
class Predicted:
    """One frame's prediction over its regions: the label map at its own size, the presence of each structure
    (the highest over the regions), whether the model knows none of the regions, one row per region."""

    labels: np.ndarray
    present: np.ndarray
    unknown: bool = True
    rows: list = dataclasses.field(default_factory=list)


def predict_frames(predictor, images, regions, states=None):
    """Each image's Predicted: every region predicted on its own and its masks put back in their place; nothing
    outside the regions. `states`: one deploy.Hysteresis per region (a sequence)."""
    placed = [(i, k, r, r.crop(image)) for i, (image, rs) in enumerate(zip(images, regions)) for k, r in enumerate(rs)]
    probs, present, ood = predictor.probabilities([crop for *_, crop in placed])
    out = [Predicted(np.zeros(np.shape(image), np.uint8), np.zeros(len(predictor.names))) for image in images]
    for j, (i, k, region, crop) in enumerate(placed):
        masks, kept, unknown, full = predictor.masks(crop, probs[j], present[j], ood[j])
        masks = masks * (states[k].update(kept) if states else kept).astype(np.uint8)
        out[i].labels[region.box] = deploy.label_map(masks[None], full[None])[0]
        out[i].present = np.maximum(out[i].present, present[j])
        out[i].unknown &= unknown
        out[i].rows.append(structure_row(predictor.names, present[j], masks, ood[j], unknown, region))
    return out


def overlay(image, labels, present, names, unknown, regions):
    """The overlay picture (BGR): the outlines and presence of figures.annotated, and each region's edge in gray
    where the regions are not the whole frame."""
    drawn = annotated(image, labels, present, names, unknown)
    for r in regions:
        if (r.w, r.h) != (np.shape(image)[1], np.shape(image)[0]):
            cv2.rectangle(drawn, (r.x, r.y), (r.x + r.w - 1, r.y + r.h - 1), (128, 128, 128), 1)
    return cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)
