"""What predict.py reads: image files, folders of them, videos through OpenCV and DICOM through pydicom, as
uint8 gray frames with their frame rate."""

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Region:
    """A part of a frame predicted on its own (a B-mode image on the scanner's screen): x, y, width and height
    in pixels, and (row, column) mm per pixel where known."""

    x: int
    y: int
    w: int
    h: int
    spacing: tuple | None = None

    @property
    def box(self):
        """The region's rows and columns, to index a frame with."""
        return np.s_[self.y : self.y + self.h, self.x : self.x + self.w]

    def crop(self, image):
        return np.asarray(image)[self.box]

    def describe(self):
        mm = f", {self.spacing[0]:.4g}x{self.spacing[1]:.4g} mm per pixel" if self.spacing else ""
        return f"{self.w}x{self.h} at ({self.x}, {self.y}){mm}"


def whole_frame(image, spacing=None):
    return Region(0, 0, np.shape(image)[1], np.shape(image)[0], spacing)


@dataclass
class Scan:
    """What predict.py predicts on: gray uint8 frames (an iterable), how many, each frame's time in seconds and
    where those times came from, and the regions each frame is predicted in (empty: the whole frame)."""

    frames: object
    count: int | None
    times: list | None = None  # None: frame i at i / fps
    fps: float = DEFAULT_FPS
    timing: str = "the default rate"
    regions: list = field(default_factory=list)
    spacing: tuple | None = None  # mm per pixel of the whole frame, where it has no regions
    dataset: object = None  # a DICOM file's dataset, which a SEG of the masks references

    def time(self, i):
        return self.times[i] if self.times is not None else i / self.fps

    def regions_of(self, image):
        """The regions a frame is predicted in: the scan's, or the whole frame."""
        return self.regions or [whole_frame(image, self.spacing)]


# RegionDataType 1: tissue (B-mode); PhysicalUnits 3: cm
TISSUE, CENTIMETRES = 1, 3


def dicom_regions(ds, shape):
    """The tissue regions of a DICOM file's Sequence of Ultrasound Regions, clipped to the frame, each with its
    pixel size in mm where the file gives it in cm."""
    regions = []
    for r in ds.get("SequenceOfUltrasoundRegions", []):
        if r.get("RegionDataType") != TISSUE:
            continue
        x0, y0 = max(0, int(r.RegionLocationMinX0)), max(0, int(r.RegionLocationMinY0))
        x1, y1 = min(shape[1] - 1, int(r.RegionLocationMaxX1)), min(shape[0] - 1, int(r.RegionLocationMaxY1))
        if x1 <= x0 or y1 <= y0:
            continue
        in_cm = r.get("PhysicalUnitsXDirection") == CENTIMETRES == r.get("PhysicalUnitsYDirection")
        dx, dy = float(r.get("PhysicalDeltaX") or 0), float(r.get("PhysicalDeltaY") or 0)
        spacing = (10 * dy, 10 * dx) if in_cm and dx > 0 and dy > 0 else None
        regions.append(Region(x0, y0, x1 - x0 + 1, y1 - y0 + 1, spacing))
    return regions


def dicom_timing(ds, frames):
    """(each frame's time in seconds or None, frames per second, where they came from), in the standard's order
    of preference: FrameTime, FrameTimeVector, CineRate, RecommendedDisplayFrameRate, else the default rate."""
    if float(ds.get("FrameTime") or 0) > 0:  # milliseconds per frame
        return None, 1000.0 / float(ds.FrameTime), "FrameTime"
    vector = ds.get("FrameTimeVector")
    if vector is not None and len(vector) == frames:  # milliseconds since the previous frame
        times = list(np.cumsum([float(v) for v in vector]) / 1000.0)
        span = times[-1] - times[0]
        return times, (frames - 1) / span if span > 0 else DEFAULT_FPS, "FrameTimeVector"
    for key in ("CineRate", "RecommendedDisplayFrameRate"):
        if float(ds.get(key) or 0) > 0:
            return None, float(ds.get(key)), key
    return None, DEFAULT_FPS, f"the default {DEFAULT_FPS:g} frames/s (the file gives no frame time)"


def read_dicom(path):
    """(the dataset, its frames (n, h, w) uint8 gray) of a DICOM file. Colour becomes gray one way: palette
    colour through the file's colour table, YBR as RGB (pydicom converts it), then OpenCV's RGB to gray (ITU-R
    BT.601 luma); MONOCHROME1 is inverted."""
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
        why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, per decoder
        raise UserError(f"{path}: cannot decode its pixel data, transfer syntax {name} ({syntax}): {why}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    palette = ds.get("PhotometricInterpretation") == "PALETTE COLOR"
    if palette:  # indices into the file's colour table
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
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
    return ds, pixels


def dicom_scan(path):
    """A DICOM file as a Scan: its frames, their times, its tissue regions (with their mm per pixel)."""
    ds, pixels = read_dicom(path)
    times, fps, timing = dicom_timing(ds, len(pixels))
    return Scan(iter(pixels), len(pixels), times, fps, timing, dicom_regions(ds, pixels.shape[1:]), dataset=ds)


def video_scan(path):
    """A video as a Scan, through OpenCV: its frames read as they are predicted, at the rate it gives."""
    capture = cv2.VideoCapture(str(path))
    ok, first = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        capture.release()
        raise UserError(f"{path}: OpenCV cannot decode this video (unsupported codec or a damaged file)")
    fps = capture.get(cv2.CAP_PROP_FPS)
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

    timing = "the video's frame rate" if fps else f"the default {DEFAULT_FPS:g} frames/s (the video gives none)"
    return Scan(frames(), count, None, fps or DEFAULT_FPS, timing)
