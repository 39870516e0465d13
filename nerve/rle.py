"""Kaggle's run-length encoding of masks: 1-based starts and lengths, column-major (top to bottom, then left
to right), an empty string for an empty mask."""

from nerve.common import IMAGE_HEIGHT, IMAGE_WIDTH

import numpy as np


def rle_encode(mask):
    """Kaggle run-length string of a 2-D mask."""
    flat = np.asarray(mask).T.ravel() != 0
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flat, [False])).view(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    runs = np.empty(2 * len(starts), np.int64)
    runs[0::2], runs[1::2] = starts + 1, ends - starts
    return " ".join(map(str, runs))


def rle_decode(pixels, shape=(IMAGE_HEIGHT, IMAGE_WIDTH)):
    """Inverse of rle_encode: a uint8 0/1 mask of `shape` (height, width)."""
    h, w = shape
    flat = np.zeros(h * w + 1, np.int8)
    runs = np.array(str(pixels).split(), dtype=np.int64)
    if runs.size % 2 or (runs.size and (runs[0::2].min() < 1 or runs[1::2].min() < 1)):
        raise ValueError(f"not a run-length string: {str(pixels)[:40]!r}")
    starts, lengths = runs[0::2] - 1, runs[1::2]
    if runs.size and (starts + lengths).max() > h * w:
        raise ValueError(f"run-length string runs past {h}x{w} pixels")
    np.add.at(flat, starts, 1)
    np.add.at(flat, starts + lengths, -1)
    return (np.cumsum(flat[:-1]) > 0).astype(np.uint8).reshape(w, h).T
