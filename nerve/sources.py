"""What predict.py reads: image files, folders of them, videos through OpenCV and DICOM through pydicom, as
uint8 gray frames with their frame rate."""

from pathlib import Path

from nerve.common import UserError

import cv2
import numpy as np

from nerve.images import to_uint8
from nerve.layouts import IMAGE_SUFFIXES

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v")


DICOM_SUFFIXES = (".dcm", ".dicom")


DEFAULT_FPS = 25.0  # for a cine loop that does not say its frame rate


def input_files(paths):
    """Every file to predict: the files given, and the images, videos and DICOM files under folders given."""
    known = IMAGE_SUFFIXES + VIDEO_SUFFIXES + DICOM_SUFFIXES
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in known)
            if not inside:
                raise UserError(f"{path}/ holds no images, videos or DICOM files ({', '.join(known)})")
            found += [(p, path.name / p.relative_to(path).with_suffix("")) for p in inside]
        elif path.is_file():
            if path.suffix.lower() not in known and not _is_dicom(path):
                raise UserError(f"{path}: not an image, video or DICOM file this reads ({', '.join(known)})")
            found.append((path, Path(path.stem)))
        else:
            raise UserError(f"{path} not found")
    seen = {}
    for path, name in found:  # scan.png and scan.dcm must not write over each other's outputs
        seen.setdefault(name, []).append(path)
    return [(p, n.with_name(f"{n.name}_{p.suffix[1:]}") if len(seen[n]) > 1 else n) for p, n in found]


def _is_dicom(path):
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def dicom_frames(path):
    """(frames (n, h, w) uint8 gray, frames per second or None) of a DICOM file."""
    import pydicom
    from pydicom.pixels import pixel_array

    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for files that are not DICOM
        raise UserError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise UserError(f"{path}: a DICOM file without pixel data")
    syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
    try:
        pixels = pixel_array(ds)
    except Exception as e:  # a transfer syntax without an installed decoder, or damaged pixel data
        name = getattr(syntax, "name", syntax)
        raise UserError(
            f"{path}: cannot decode its pixel data, transfer syntax {name} ({syntax}): {e}. Uncompressed and RLE "
            "lossless always work; for JPEG syntaxes install a pydicom decoder plugin (e.g. pylibjpeg)"
        ) from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    palette = ds.get("PhotometricInterpretation") == "PALETTE COLOR"
    if palette:  # indices into the file's colour table
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
    # pixel_array gives YBR colour as RGB already
    colour = palette or ds.get("SamplesPerPixel", 1) == 3
    pixels = pixels.reshape(frames, *pixels.shape[-3 if colour else -2 :])
    if colour:
        pixels = np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in pixels])
    try:
        pixels = to_uint8(pixels)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # 0 is white
        pixels = 255 - pixels
    fps = None
    if "FrameTime" in ds and float(ds.FrameTime) > 0:  # milliseconds per frame
        fps = 1000.0 / float(ds.FrameTime)
    elif "CineRate" in ds:
        fps = float(ds.CineRate)
    return pixels, fps


def video_frames(path):
    """(a generator of gray uint8 frames, frames per second, frame count) of a video, through OpenCV."""
    capture = cv2.VideoCapture(str(path))
    ok, first = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        capture.release()
        raise UserError(f"{path}: OpenCV cannot decode this video (unsupported codec or a damaged file)")
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None

    def frames():
        frame = first
        try:
            while frame is not None:
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
                ok, frame = capture.read()
                frame = frame if ok else None
        finally:
            capture.release()

    return frames(), fps, count
