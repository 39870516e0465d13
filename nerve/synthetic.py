"""A synthetic ultrasound nerve dataset in the exact Kaggle layout, for users without the data and for tests.

Each subject gets its own anatomy: wavy tissue layers with speckle, striated muscle, dark round vessels
and a brachial-plexus-like nerve (an oval of dark fascicles in a brighter matrix with a bright rim).
Frames of a subject drift slightly; in about 40% of them the probe sees the nerve, and its mask is the
filled outline of that oval. Everything is deterministic for a seed.

    train/{subject}_{n}.tif, train/{subject}_{n}_mask.tif, test/{id}.tif   (Kaggle: 580x420, uint8, LZW)
    imagesTr/s{subject}_{n}_0000.png, labelsTr/s{subject}_{n}.png, imagesTs/, dataset.json   (nnU-Net)

The nnU-Net layout can be written at another size and with the vessels labelled (label 2, the nerve 1).
"""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nerve.common import IMAGE_HEIGHT as H
from nerve.common import IMAGE_WIDTH as W

import cv2
import numpy as np
import tifffile

NERVE_FRACTION = 0.4  # Kaggle: 41% of train frames show the nerve
MARGIN = 40  # the subject's tissue map is larger than a frame, so drifting frames stay filled


def _smooth_noise(rng, shape, sigma):
    """Zero-mean, unit-variance Gaussian noise blurred with (sigma_y, sigma_x)."""
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma[1], sigmaY=sigma[0])
    return field / max(float(field.std()), 1e-6)


FOLDERS = {"kaggle": ("train", "test"), "nnunet": ("imagesTr", "labelsTr", "imagesTs")}
NERVE, VESSEL = 1, 2  # labels in the nnU-Net layout


def _tissue_map(rng):
    """Echogenicity of one subject's neck without the nerve: layers, muscle striation, vessels; and the
    vessels' lumens as a 0/1 map."""
    h, w = H + 2 * MARGIN, W + 2 * MARGIN
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    bounds = np.cumsum(rng.uniform(45, 110, size=6)) + MARGIN + rng.uniform(5, 20)
    levels = rng.uniform(0.25, 0.7, size=7)
    levels[0] = 0.15  # gel / skin surface
    tissue = np.full((h, w), levels[-1], np.float32)
    vessels = np.zeros((h, w), np.uint8)
    for b, level in zip(bounds[::-1], levels[-2::-1]):
        wave = b + rng.uniform(5, 20) * np.sin(2 * np.pi * x / rng.uniform(300, 900) + rng.uniform(0, 6.3))
        tissue = np.where(y < wave, level, tissue)
        tissue += 0.7 * np.exp(-(((y - wave) / 2.5) ** 2))  # bright fascia between layers
    tissue *= 1 + 0.3 * _smooth_noise(rng, (h, w), (1.5, 25))  # muscle fibres run laterally
    for _ in range(rng.integers(15, 30)):  # short bright connective-tissue streaks
        centre = (int(rng.uniform(0, w)), int(rng.uniform(MARGIN + 30, h)))
        axes = (int(rng.uniform(15, 70)), int(rng.uniform(1, 4)))
        cv2.ellipse(tissue, centre, axes, rng.uniform(-15, 15), 0, 360, rng.uniform(0.7, 1.0), -1)
    for _ in range(rng.integers(1, 4)):  # vessels: anechoic lumen, bright wall
        centre = (int(rng.uniform(60, w - 60)), int(rng.uniform(150, h - 60)))
        r = int(rng.uniform(12, 32))
        axes = (r, int(r * rng.uniform(0.7, 1.0)))
        cv2.ellipse(tissue, centre, (axes[0] + 3, axes[1] + 3), 0, 0, 360, 0.8, -1)
        cv2.ellipse(tissue, centre, axes, 0, 0, 360, 0.04, -1)
        cv2.ellipse(vessels, centre, axes, 0, 0, 360, 1, -1)
    return tissue, vessels


def _nerve(rng):
    """One subject's nerve: an oval with fascicle positions relative to its centre."""
    axes = np.array([rng.uniform(38, 62), rng.uniform(24, 40)])
    n = int(rng.integers(7, 14))
    # fascicles: random points inside the unit disc, scaled into the oval
    r, t = np.sqrt(rng.uniform(0, 0.75, n)), rng.uniform(0, 2 * np.pi, n)
    return {
        "centre": np.array([rng.uniform(150, W - 150), rng.uniform(140, H - 110)]),
        "axes": axes,
        "angle": rng.uniform(-25, 25),
        "fascicles": np.stack([r * np.cos(t) * axes[0], r * np.sin(t) * axes[1]], axis=1),
        "fascicle_radius": rng.uniform(5, 9, n),
    }


def subject_anatomy(seed, subject):
    """Tissue map and nerve shared by every frame of one subject."""
    rng = np.random.default_rng([seed, subject])
    tissue, vessels = _tissue_map(rng)
    return {"tissue": tissue, "vessels": vessels, "nerve": _nerve(rng)}


def _draw_nerve(tissue, nerve, shift, mask):
    """Draw the nerve into `tissue` (in place) and its filled outline into `mask`."""
    cx, cy = nerve["centre"] + shift
    rot = np.deg2rad(nerve["angle"])
    c, s = np.cos(rot), np.sin(rot)
    centre, axes = (int(round(cx)), int(round(cy))), tuple(int(round(a)) for a in nerve["axes"])
    cv2.ellipse(tissue, centre, axes, nerve["angle"], 0, 360, 0.7, -1)
    for (fx, fy), r in zip(nerve["fascicles"], nerve["fascicle_radius"]):
        fc = (int(round(cx + c * fx - s * fy)), int(round(cy + s * fx + c * fy)))
        cv2.circle(tissue, fc, int(round(r)), 0.15, -1)
    cv2.ellipse(tissue, centre, axes, nerve["angle"], 0, 360, 1.0, 4)
    cv2.ellipse(mask, centre, axes, nerve["angle"], 0, 360, 255, -1)


def render_frame(anatomy, rng, with_nerve):
    """One 420x580 uint8 frame of a subject, its nerve's 0/255 mask and its vessels' 0/1 map."""
    shift = rng.normal(0, 8, size=2)
    tx, ty = MARGIN - shift[0], MARGIN - shift[1]
    move = np.float32([[1, 0, -tx], [0, 1, -ty]])
    view = cv2.warpAffine(anatomy["tissue"], move, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    vessels = cv2.warpAffine(anatomy["vessels"], move, (W, H), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)
    mask = np.zeros((H, W), np.uint8)
    if with_nerve:
        _draw_nerve(view, anatomy["nerve"], shift, mask)
    view = cv2.GaussianBlur(view, (0, 0), 1.2)
    # fully developed speckle: Rayleigh amplitude, elongated laterally, partly averaged out
    rayleigh = np.hypot(_smooth_noise(rng, (H, W), (1.0, 2.5)), _smooth_noise(rng, (H, W), (1.0, 2.5)))
    depth = np.exp(-np.arange(H, dtype=np.float32) / rng.uniform(600, 900))[:, None]
    image = 330 * view * (0.45 + 0.45 * rayleigh) * depth * rng.uniform(0.85, 1.15)
    return np.clip(image, 0, 255).astype(np.uint8), mask, vessels


def _write_tiff(path, image):
    tifffile.imwrite(path, image, compression="lzw")


def _subject_frames(seed, subject, frames):
    """Yield (n, image, nerve mask, vessel map) for n = 1..frames of one subject."""
    anatomy = subject_anatomy(seed, subject)
    for n in range(1, frames + 1):
        rng = np.random.default_rng([seed, subject, n])
        yield n, *render_frame(anatomy, rng, with_nerve=rng.random() < NERVE_FRACTION)


def cine(seed, subject, frames, visible):
    """A cine loop of one subject as the probe sweeps: `frames` drifting frames, the nerve in view for frames
    visible[0] <= n < visible[1]. Returns (frames, whether each shows the nerve)."""
    anatomy = subject_anatomy(seed, subject)
    shown = [visible[0] <= n < visible[1] for n in range(frames)]
    images = [render_frame(anatomy, np.random.default_rng([seed, subject, n]), s)[0] for n, s in enumerate(shown)]
    return images, np.array(shown)


def label_map(mask, vessels, with_vessels):
    """nnU-Net's labels of a frame: the nerve 1 (over a vessel it hides), the vessels 2 where labelled."""
    labels = np.where(mask > 0, NERVE, 0).astype(np.uint8)
    if with_vessels:
        labels[(vessels > 0) & (labels == 0)] = VESSEL
    return labels


def _png(path, array, size, labels=False):
    """Write a frame (area-resized) or a label map (nearest) at size (h, w) as PNG."""
    if size and tuple(size) != array.shape:
        interpolation = cv2.INTER_NEAREST if labels else cv2.INTER_AREA
        array = cv2.resize(array, size[::-1], interpolation=interpolation)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"cannot write {path}")


def write_dataset(
    root, subjects=6, frames=120, test_subjects=2, seed=0, progress=None, layout="kaggle", size=None, vessels=False
):
    """Write a dataset under root in the Kaggle or nnU-Net layout; return (n_train, n_test).

    Train subjects are 1..subjects; test images come from further subjects, shuffled and numbered
    1..test_subjects*frames as Kaggle's are. `progress(k)` is called as frames are written. The nnU-Net layout
    is written at `size` (h, w; unset 420x580), with the vessels labelled if `vessels`.
    """
    root = Path(root)
    for folder in FOLDERS[layout]:
        (root / folder).mkdir(parents=True, exist_ok=True)
    test_ids = np.random.default_rng([seed, 0]).permutation(test_subjects * frames) + 1

    def train_subject(s):
        for n, image, mask, vessel_map in _subject_frames(seed, s, frames):
            if layout == "kaggle":
                _write_tiff(root / "train" / f"{s}_{n}.tif", image)
                _write_tiff(root / "train" / f"{s}_{n}_mask.tif", mask)
            else:
                _png(root / "imagesTr" / f"s{s}_{n}_0000.png", image, size)
                _png(root / "labelsTr" / f"s{s}_{n}.png", label_map(mask, vessel_map, vessels), size, labels=True)
        return frames

    def test_subject(k):
        for n, image, _, _ in _subject_frames(seed, subjects + 1 + k, frames):
            i = test_ids[k * frames + n - 1]
            if layout == "kaggle":
                _write_tiff(root / "test" / f"{i}.tif", image)
            else:
                _png(root / "imagesTs" / f"t{i}_0000.png", image, size)
        return frames

    if layout == "nnunet":
        labels = {"background": 0, "nerve": NERVE, **({"vessel": VESSEL} if vessels else {})}
        meta = {"channel_names": {"0": "US"}, "labels": labels, "numTraining": subjects * frames, "file_ending": ".png"}
        (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    with ThreadPoolExecutor(2) as pool:  # cv2 and the LZW codec release the GIL
        jobs = [pool.submit(train_subject, s) for s in range(1, subjects + 1)]
        jobs += [pool.submit(test_subject, k) for k in range(test_subjects)]
        for job in jobs:
            done = job.result()
            if progress:
                progress(done)
    return subjects * frames, test_subjects * frames
