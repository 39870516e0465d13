"""Decoding: an image file as the uint8 gray image the model sees, a mask file as a label map."""

from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

from nerve import layouts


def _decode(path):
    """A file's pixels as stored; ValueError says why a file is unreadable."""
    # OpenCV decodes with the GIL released, so threads scale (tifffile's LZW path does not); tifffile
    # reads TIFFs OpenCV cannot, and says why a damaged one is unreadable
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is not None:
        return image
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        raise ValueError("unreadable image")
    try:
        return tifffile.imread(path)
    except Exception as e:  # tifffile and its codecs raise many types for damaged files
        raise ValueError(f"unreadable TIFF ({type(e).__name__}: {e})") from None


def _one_channel(image):
    """The first channel of an image whose colour channels are identical, else None."""
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[-1] in (3, 4) and not np.any(image[..., 1:3] != image[..., :1]):
        return image[..., 0]
    return None


def read_image(path):
    """A uint8 grayscale image at its own size: colour converted to gray, 16 bits scaled to 8 (to_uint8)."""
    image = _decode(path)
    gray = _one_channel(image)
    if gray is None:
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"has shape {image.shape}; expected a gray or RGB(A) image")
        gray = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_BGR2GRAY)
    if gray.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"is {gray.dtype}; expected 8- or 16-bit pixels")
    return to_uint8(gray)


def to_uint8(pixels):
    """Gray pixels of any integer depth as uint8, scaled by the highest bit in use (12-bit data stored in 16 bits
    fills the range); ValueError for pixels that are not whole numbers."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind not in "ui":
        raise ValueError(f"pixels of type {pixels.dtype}: expected whole numbers")
    pixels = np.clip(pixels, 0, None)
    bits = max(8, int(pixels.max()).bit_length())
    return np.round(pixels * (255 / (2**bits - 1))).astype(np.uint8)


def read_labels(path, kind):
    """A uint8 label map (0 background, k structure k) from a mask file of the given kind (layouts.BINARY,
    LABELS or ANY: 0/1 or 0/255, integer labels, or VOC/LabelMe palette colours)."""
    raw = _decode(path)
    gray = _one_channel(raw)
    if gray is None:
        if kind != layouts.ANY or raw.ndim != 3:
            raise ValueError(f"is a colour image; expected a {kind} mask")
        return _palette_labels(raw)
    binary = not np.any((gray != 0) & (gray != 255))  # cheaper than np.unique on every mask
    if kind == layouts.BINARY and not binary:
        raise ValueError("is not a 0/255 mask")
    if kind != layouts.LABELS and binary:
        return (gray == 255).view(np.uint8)
    if gray.dtype.kind not in "ui" or gray.max() > 255:
        raise ValueError(f"has values up to {gray.max()}; labels are whole numbers 0 to 255")
    return gray.astype(np.uint8)


def _palette_labels(bgr):
    """Labels of a colour mask in the VOC/LabelMe palette; ValueError names a colour in no class."""
    rgb = bgr[..., 2::-1].astype(np.int32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    found, inverse = np.unique(codes, return_inverse=True)
    colours = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in found.tolist()]
    unknown = [c for c in colours if c not in layouts.PALETTE]
    if unknown:
        raise ValueError(f"has colours {', '.join(map(str, unknown[:3]))} that are in no class of the VOC palette")
    return np.array([layouts.PALETTE[c] for c in colours], np.uint8)[inverse].reshape(codes.shape)


def image_shape(path):
    """(height, width) from the file's header, without decoding the pixels; None where PIL cannot tell."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # a damaged or exotic file: decoding it later says what is wrong
        return None
