"""Planning: the training input size and length, chosen from the dataset when --size or --epochs is not given,
as nnU-Net plans from a dataset's fingerprint.

The size keeps the images' aspect ratio at a pixel budget a CPU trains at in reasonable time, and grows
(up to MAX_PIXELS) while the small structures would be too few pixels across to keep their shape.
The length is EPOCHS passes over the training images, or more passes where those would show the network
fewer than MIN_IMAGES augmented images: a network trained from scratch needs to see some number of images,
whatever the number of distinct ones, so a set of a few hundred needs many passes (nnU-Net fixes its length
in steps). Counting images rather than steps keeps a large set's length whatever the batch size.
"""

import numpy as np

PIXELS = 96 * 128  # the default budget: the Kaggle frames' planned size, 96x128
MAX_PIXELS = 4 * PIXELS
GROWTH = 1.25  # budget step while the small structures are too small
MIN_ACROSS = 12  # pixels across the small structures at the training size: a few at the coarsest skip level
SMALL_PERCENTILE = 5  # "the small structures": this percentile of their sizes, not one outlier
EPOCHS = 30  # passes over a training set of thousands of images (the Kaggle frames)
MIN_IMAGES = 20_000  # EPOCHS passes over the Kaggle frames (2,000-5,600 of them) show more: they keep EPOCHS


def structure_sizes(masks, n_structures):
    """Per structure, the side of a square of its area (pixels at the arrays' size) in each image that shows
    it: one array per structure."""
    sizes = [[] for _ in range(n_structures)]
    for mask in masks:
        counts = np.bincount(np.asarray(mask).ravel(), minlength=n_structures + 1)
        for k in range(n_structures):
            if counts[k + 1]:
                sizes[k].append(np.sqrt(counts[k + 1]))
    return [np.array(s) for s in sizes]


def _fit(pixels, aspect, multiple):
    """(h, w), each a multiple of `multiple`, of about `pixels` pixels at aspect ratio h / w."""
    h = max(multiple, round(np.sqrt(pixels * aspect) / multiple) * multiple)
    w = max(multiple, round(np.sqrt(pixels / aspect) / multiple) * multiple)
    return int(h), int(w)


def training_size(masks, stored, names, depth):
    """(h, w) for training on label maps `masks` stored at `stored` (h, w), and a sentence saying why."""
    multiple = 2**depth
    aspect = stored[0] / stored[1]
    sizes = structure_sizes(masks, len(names))
    small = {n: float(np.percentile(s, SMALL_PERCENTILE)) for n, s in zip(names, sizes) if len(s)}
    pixels, size = PIXELS, _fit(PIXELS, aspect, multiple)

    def scale(size):
        return min(size[0] / stored[0], size[1] / stored[1])

    while small and min(small.values()) * scale(size) < MIN_ACROSS:
        bigger = _fit(pixels * GROWTH, aspect, multiple)
        if bigger[0] * bigger[1] > MAX_PIXELS:
            break
        pixels, size = pixels * GROWTH, bigger
    scale = scale(size)
    across = ", ".join(f"{n} {v * scale:.0f}" for n, v in small.items())
    why = (
        f"{size[0]}x{size[1]}: the images' {stored[0]}x{stored[1]} aspect at about {round(pixels):,} pixels, "
        f"multiples of 2**depth = {multiple}"
    )
    if small:
        why += f"; the small structures ({SMALL_PERCENTILE}th percentile) are {across} pixels across there"
        if min(small.values()) * scale < MIN_ACROSS:
            why += f", under {MIN_ACROSS} even at the largest planned size"
    return size, why


def epochs(train_images):
    """Passes over a training set of `train_images` images, and a sentence saying why."""
    train_images = int(train_images)  # a NumPy count would reach the run record, which JSON cannot write
    planned = max(EPOCHS, -(-MIN_IMAGES // train_images))
    why = f"{planned} passes over {train_images} images"
    if planned > EPOCHS:
        why += f": {EPOCHS} would show the network {EPOCHS * train_images:,} images, under {MIN_IMAGES:,}"
    return planned, why
