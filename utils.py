"""The REPL's front door: look at predictions and augmented samples, and the helpers users call themselves.

>>> import utils
>>> utils.inspect_set("val")        # predictions on the validation set, as a window or a PNG
>>> utils.examine_generator()       # augmented training samples with their masks tinted
>>> utils.rle_encode(mask), utils.rle_decode(pixels), utils.mean_dice(truth, masks)
"""

from pathlib import Path

from nerve.common import EXAMINE_FILE, INPUT_DIR, INSPECT_FILE, RESULTS_DIR, UserError, read_settings

import numpy as np

from nerve import augment, deploy, inference, postprocess, store
from nerve.figures import label_dice, overlay_grid, show_or_save
from nerve.metrics import mean_dice
from nerve.rle import rle_decode, rle_encode

__all__ = ["inspect_set", "examine_generator", "rle_encode", "rle_decode", "mean_dice"]


def inspect_set(subset="val", n=16, results=RESULTS_DIR, input_dir=INPUT_DIR, seed=0, cols=4):
    """Show n images of the train or val set with true-positive, false-positive and false-negative pixels tinted.

    Titles give the image id, the presence probability of each structure and the per-image Dice (the mean
    over the structures). With several structures each has its colour: predicted pixels filled, the truth
    outlined. After
    `train.py --folds K` this is the first fold's model on its own validation subjects. Returns the
    PNG path when no display is available, otherwise None after showing a window.
    """
    if subset not in ("train", "val"):
        raise UserError(f"subset must be 'train' or 'val', not {subset!r}")
    folder = inference.model_dirs(results)[0]
    settings = read_settings(folder)
    arrays = store.load_arrays(input_dir, ("train_images", "train_masks", "train_ids", "train_sizes"))
    is_val = np.isin(arrays["train_ids"], settings["val_ids"])
    pool = np.flatnonzero(is_val if subset == "val" else ~is_val)
    pick = np.sort(np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False))
    images, truth = store.frames(arrays, "train_images")[pick], store.frames(arrays, "train_masks")[pick]
    nets, names = [inference.load_model(folder)], settings["structures"]
    chunks = list(inference.predict_chunks(nets, tuple(settings["size"]), images, settings["tta"]))
    probs, present = (np.concatenate([chunk[k] for chunk in chunks]) for k in range(2))
    specs = postprocess.load(results, names)
    masks = [deploy.labels(prob, p, specs, t.shape) for prob, p, t in zip(probs, present, truth)]  # each at its size
    titles = [
        f"{i}  p={'/'.join(f'{v:.2f}' for v in p)}  dice={d:.2f}"
        for i, p, d in zip(arrays["train_ids"][pick], present, label_dice(truth, masks, len(names)))
    ]
    return show_or_save(
        overlay_grid(images, truth, masks, titles, cols, names), Path(results) / INSPECT_FILE.format(subset=subset)
    )


def examine_generator(n=16, input_dir=INPUT_DIR, size=(96, 128), seed=0, cols=4, results=RESULTS_DIR, **options):
    """Show n augmented training samples at `size` with their masks tinted.

    Extra keyword arguments go to augment.AugmentedBatches (e.g. flips=("horizontal", "vertical")).
    Returns the PNG path when no display is available.
    """
    arrays = store.load_arrays(input_dir, ("train_images", "train_masks", "train_sizes"))
    names = store.structures(input_dir)
    n = min(n, len(arrays["train_images"]))
    idx = np.sort(np.random.default_rng(seed).choice(len(arrays["train_images"]), size=n, replace=False))
    images = augment.resize_images(store.frames(arrays, "train_images")[idx], size)
    masks = augment.resize_masks(store.frames(arrays, "train_masks")[idx], size, len(names))
    batches = augment.AugmentedBatches(images, masks, n, seed, shuffle=False, n_structures=len(names), **options)
    x, y = batches[0]
    labels = (y["mask"] * np.arange(1, len(names) + 1)).max(axis=-1).astype(np.uint8)
    titles = [f"sample {i}  " + " ".join(f"{a}={int(b)}" for a, b in zip(names, p)) for i, p in enumerate(y["present"])]
    return show_or_save(overlay_grid(x[..., 0], labels, None, titles, cols, names), Path(results) / EXAMINE_FILE)
