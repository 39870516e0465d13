"""What an application needs beside an exported model, with NumPy and OpenCV only: an image resized to the
model's input, the probabilities resized back to the image, and the post-processing train.py tuned.

The pipeline itself resizes and post-processes through these functions, and export.py copies this file
beside the artefact with deploy.json (input size, structures, the tuned specs), so an application that calls
them gets predict.py's masks:

    import json, deploy
    settings = json.load(open("deploy.json"))
    x = deploy.model_input(gray, settings["size"])  # gray: (H, W) uint8; x: (1, h, w, 1) float32, raw 0-255
    probs, present, ood = run_the_artefact(x)         # (1, h, w, K), (1, K) and (1,)
    labels = deploy.labels(probs[0], present[0], settings["postprocess"], gray.shape, ood[0], settings["ood_threshold"])

An image whose out-of-distribution score is above the threshold is not a scan the model knows: it gets no mask.
"""

import cv2
import numpy as np

# The gate's area is a share of the image's pixels, so that an image gets the same decision at any size
DEFAULT = {"presence_threshold": 0.5, "pixel_threshold": 0.5, "min_area_fraction": 0.0, "keep_largest": False}
KAGGLE_FRAME_PIXELS = 420 * 580  # the pixels that earlier releases' `min_area` counted
# the models' `ood` output is a distance in units of the threshold ood.py set on frames of held-out subjects
OOD_THRESHOLD = 1.0


def resize(image, size):
    """A uint8 image at size (h, w), area-averaged (the network's input)."""
    return cv2.resize(np.asarray(image), tuple(size)[::-1], interpolation=cv2.INTER_AREA)


def model_input(image, size):
    """A (H, W) uint8 gray image as the exported model's input: (1, h, w, 1) float32 pixel values."""
    return resize(image, size)[None, :, :, None].astype(np.float32)


def full_size(prob, shape):
    """A probability map (h, w) or (h, w, K) resized to an image's (height, width), before thresholding,
    so edges stay smooth."""
    prob = np.asarray(prob, np.float32)
    resized = cv2.resize(prob, tuple(shape[:2])[::-1], interpolation=cv2.INTER_LINEAR)
    return resized.reshape(*shape[:2], *prob.shape[2:])  # OpenCV drops a single channel's axis


def largest_component(mask):
    """The largest 8-connected component of a 0/1 mask (the first of equals in raster order)."""
    x, y, w, h = cv2.boundingRect(mask)  # labelled inside the box around the mask: the same, faster
    if not w:
        return mask  # empty (OpenCV cannot label an empty box)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask[y : y + h, x : x + w], connectivity=8)
    if n <= 2:
        return mask
    largest = np.zeros_like(mask)
    largest[y : y + h, x : x + w] = labels == 1 + np.argmax(stats[1:, cv2.CC_STAT_AREA])
    return largest


def binary_mask(prob, pixel_threshold, keep_largest):
    """One probability map -> 0/1 mask, optionally only its largest component."""
    mask = (prob >= pixel_threshold).astype(np.uint8)
    return largest_component(mask) if keep_largest else mask


def gate(present, area_fraction, spec):
    """Which masks survive: presence probability and predicted area (a share of the image) both at or above the
    spec's thresholds."""
    present, area_fraction = np.asarray(present).reshape(-1), np.asarray(area_fraction)
    return (present >= spec["presence_threshold"]) & (area_fraction >= spec["min_area_fraction"])


def upgraded(spec):
    """A spec as this release reads it: earlier releases gave the gate's area in pixels of a 420x580 frame."""
    spec = dict(spec)
    if "min_area" in spec:
        spec.setdefault("min_area_fraction", spec.pop("min_area") / KAGGLE_FRAME_PIXELS)
    return spec


def apply(probs, present, spec=None):
    """0/1 masks (n, h, w) from probabilities (n, h, w) and presence (n,) under a spec (DEFAULT if None)."""
    spec = {**DEFAULT, **(spec or {})}
    if not len(probs):
        return np.zeros(np.shape(probs), np.uint8)
    masks = np.stack([binary_mask(p, spec["pixel_threshold"], spec["keep_largest"]) for p in probs])
    keep = gate(present, masks.reshape(len(masks), -1).mean(axis=1), spec)
    return masks * keep[:, None, None].astype(np.uint8)


def apply_each(probs, present, specs):
    """(n, h, w, K) 0/1 masks from probabilities (n, h, w, K) and presence (n, K), structure k under specs[k]."""
    present = np.asarray(present).reshape(len(probs), -1)
    return np.stack([apply(probs[..., k], present[:, k], spec) for k, spec in enumerate(specs)], axis=-1)


def label_map(masks, probs):
    """(n, h, w) labels of per-structure masks (n, h, w, K): 0 background, else 1 + the most probable
    structure whose mask holds the pixel."""
    if masks.shape[-1] == 1:  # one structure: the mask is its label map (and the argmax a live frame's slowest step)
        return (masks[..., 0] > 0).astype(np.uint8)
    best = np.where(masks > 0, probs, -1.0).argmax(axis=-1)
    return np.where(masks.any(axis=-1), best + 1, 0).astype(np.uint8)


def unknown(ood, threshold=OOD_THRESHOLD):
    """Whether out-of-distribution scores are above the threshold: not scans the model knows (a model without
    the score, nan, knows every scan)."""
    return np.asarray(ood, np.float64) > threshold


def labels(probs, present, specs, shape, ood=np.nan, ood_threshold=OOD_THRESHOLD):
    """The label map (H, W) of one image of `shape` from the model's probabilities (h, w, K), presence (K,) and
    out-of-distribution score: all background where the score says the scan is unknown."""
    if unknown(ood, ood_threshold):
        return np.zeros(shape[:2], np.uint8)
    full = full_size(probs, shape)
    full = full.reshape(*full.shape[:2], -1)
    return label_map(apply_each(full[None], np.reshape(present, (1, -1)), specs), full[None])[0]


class Hysteresis:
    """Presence over a sequence of frames without flicker: a structure is shown once `frames` consecutive
    frames pass its gate and hidden once as many fail it (it starts hidden); frames <= 1 keeps each frame's own
    decision."""

    def __init__(self, frames, n_structures):
        self.frames = frames
        self.on = np.zeros(n_structures, bool)
        self.run = np.zeros(n_structures, int)  # consecutive frames that disagree with the state

    def update(self, kept):
        """The shown/hidden state of each structure after a frame whose gate kept `kept` (K,)."""
        kept = np.asarray(kept, bool)
        if self.frames <= 1:
            self.on = kept
            return kept
        self.run = np.where(kept != self.on, self.run + 1, 0)
        flip = self.run >= self.frames
        self.on = np.where(flip, kept, self.on)
        self.run[flip] = 0
        return self.on.copy()
