"""Live input for predict.py --live: a source read on its own thread into a slot that holds only the newest frame,
so that a slow model drops frames instead of falling behind; the latency of each drawn frame; a window.

A source is a capture device index ("0"), anything else OpenCV's VideoCapture opens (a URL, a GStreamer
pipeline, a video file, which is played at its own frame rate as a scanner would send it), or
igtl://host:port, an OpenIGTLink server's image stream (PLUS, 3D Slicer) through pyigtl. A frame's latency runs
from the moment the reader thread has it to the moment its overlay is on screen and its labels are sent.
"""

import contextlib
import csv
import dataclasses
import os
import queue
import socket
import sys
import threading
import time
from urllib.parse import urlparse

from nerve.common import FRAMES_FILE, LATENCY_FILE, LIVE_NAME, OVERLAY_VIDEO_FILE, UserError, atomic_path, write_json

import cv2
import numpy as np

from nerve import deploy
from nerve.predictor import overlay, predict_frames
from nerve.sources import DEFAULT_FPS, whole_frame

IGTL_PREFIX = "igtl://"
IGTL_PORT = 18944  # OpenIGTLink's registered port
LABELS_DEVICE = "nerve_labels"  # the device name of the label maps sent back over OpenIGTLink
LATE_FRAMES = 2  # a frame drawn more than this many frame times after it came is late
REPORT_EVERY_S = 5.0  # seconds between the latency lines on a terminal


class Latest:
    """A slot for the newest frame: put() replaces a frame nobody took (counted as dropped), take() waits for one."""

    def __init__(self):
        self._ready = threading.Condition()
        self._frame, self.offered, self.dropped, self.ended = None, 0, 0, False
        self.first = self.last = None  # when the first and the latest frame came

    def put(self, frame, spacing=None):
        with self._ready:
            self.dropped += self._frame is not None
            self.last = time.perf_counter()
            self.first = self.first or self.last
            self._frame = (frame, self.last, self.offered, spacing)
            self.offered += 1
            self._ready.notify()

    def frame_time(self):
        """The mean time between the frames offered, in seconds (nan before two)."""
        return (self.last - self.first) / (self.offered - 1) if self.offered > 1 else float("nan")

    def end(self):
        with self._ready:
            self.ended = True
            self._ready.notify()

    def take(self, timeout):
        """(frame, arrival time (perf_counter), its index among the frames offered, mm per pixel or None), or None
        once the source has ended (or sent nothing for `timeout` seconds) and no frame waits."""
        with self._ready:
            self._ready.wait_for(lambda: self._frame is not None or self.ended, timeout)
            frame, self._frame = self._frame, None
            return frame


class Source:
    """A live source filling a Latest on a daemon thread; stop() ends it; send() is for OpenIGTLink only."""

    fps = None  # the source's own frame rate where it says (else the rate its frames come at)

    def __init__(self, name):
        self.name, self.latest, self._stop = name, Latest(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self):
        try:
            self.read()
        finally:
            self.latest.end()

    def send(self, labels, spacing):
        pass


class CaptureSource(Source):
    """A capture device, URL, pipeline or video file through OpenCV; a file is paced to its own frame rate."""

    def __init__(self, text):
        super().__init__(text)
        self.capture = cv2.VideoCapture(int(text) if text.isdigit() else text)
        if not self.capture.isOpened():
            what = "a capture device index, a URL, a pipeline or a video"
            raise UserError(f"--live {text}: OpenCV cannot open it ({what})")
        rate = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = rate if 0 < rate < 1000 else None
        # a file is read faster than it plays: pace it as a scanner would send it
        self.paced = self.capture.get(cv2.CAP_PROP_FRAME_COUNT) > 0 and self.fps is not None

    def read(self):
        start, n = time.perf_counter(), 0
        while not self._stop.is_set():
            ok, frame = self.capture.read()
            if not ok:
                break
            if self.paced:
                time.sleep(max(0.0, start + n / self.fps - time.perf_counter()))
            self.latest.put(frame)
            n += 1
        self.capture.release()


class Arrivals(dict):
    """pyigtl's store of the messages that come in, which keeps the latest of each device (a frame that comes
    before the last one was fetched would be lost uncounted): here each image message is handed to `receive` as it
    comes, on pyigtl's own thread, and the others are stored as before (pyigtl 0.3's `incoming_messages`)."""

    def __init__(self, receive):
        super().__init__()
        self.receive = receive

    def __setitem__(self, device, message):
        if message.message_type == "IMAGE":
            self.receive(message)
        else:
            super().__setitem__(device, message)


class IgtlSource(Source):
    """The image messages of an OpenIGTLink server (any device), with the spacing its matrix gives."""

    def __init__(self, text):
        super().__init__(text)
        import pyigtl

        where = urlparse(text)
        host, port = where.hostname or "127.0.0.1", where.port or IGTL_PORT
        self.client = pyigtl.OpenIGTLinkClient(host=host, port=port, start_now=False)
        self.client.incoming_messages = Arrivals(self.arrived)
        self.client.start()

    def arrived(self, message):
        if message.device_name != LABELS_DEVICE:
            self.latest.put(np.asarray(message.image), igtl_spacing(message))

    def read(self):
        self._stop.wait()  # the frames come on pyigtl's thread
        self.client.stop()

    def send(self, labels, spacing):
        import pyigtl

        message = pyigtl.ImageMessage(labels[None], ijk_to_world_matrix=igtl_matrix(spacing), device_name=LABELS_DEVICE)
        self.client.send_message(message, wait=False)


class Replay:
    """Gray frames served as a scanner's OpenIGTLink server serves them (PLUS, 3D Slicer): to the first client that
    connects to `port`, at `fps`, each sent when it is due (on the clock, packed just before), in `spacing` (rows,
    columns) mm per pixel; the label maps the client sends back are kept in `labels`. For trying a set-up without
    a scanner, and for the tests and benchmarks. A context manager: the frames go out while inside it, on a
    thread. (pyigtl's own server sends what is queued only between 10 ms waits for input, which bunches frames.)"""

    def __init__(self, frames, port, fps, spacing=None):
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.05)
        self.labels, self.sent, self._stop, self.connection = [], 0, threading.Event(), None
        self._thread = threading.Thread(target=self._serve, args=(frames, fps, spacing), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()

    def _serve(self, frames, fps, spacing):
        import pyigtl

        while self.connection is None:
            if self._stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                self.connection, _ = self.listener.accept()
        threading.Thread(target=self._receive, daemon=True).start()
        matrix = igtl_matrix(spacing)
        packed = {}  # a frame's message packed once: pyigtl's checksum is Python, a scanner's server is not
        start = time.perf_counter()
        for i, frame in enumerate(frames):
            if id(frame) not in packed:
                image = np.asarray(frame)[None]
                packed[id(frame)] = pyigtl.ImageMessage(image, ijk_to_world_matrix=matrix, device_name="Image").pack()
            time.sleep(max(0.0, start + i / fps - time.perf_counter()))
            self.connection.sendall(packed[id(frame)])
            self.sent += 1
        self._stop.wait()  # the client's last label maps are still on their way
        self.connection.close()

    def _receive(self):
        from pyigtl.messages import MessageBase

        with contextlib.suppress(OSError):  # the connection closed
            while header := _received(self.connection, MessageBase.IGTL_HEADER_SIZE):
                fields = MessageBase.parse_header(header)
                body = _received(self.connection, fields["body_size"])
                message = MessageBase.create_message(fields["message_type"])
                if message is not None and body is not None:
                    message.unpack(fields, body)
                    if message.device_name == LABELS_DEVICE:
                        self.labels.append(message)


def _received(connection, size):
    """Exactly `size` bytes from a socket, or None where it closed first."""
    chunks, left = [], size
    while left:
        chunk = connection.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def igtl_matrix(spacing):
    """An image message's ijk-to-world matrix for (rows, columns) mm per pixel (None: 1 mm)."""
    return np.diag([*(spacing[::-1] if spacing else (1.0, 1.0)), 1.0, 1.0])


def igtl_spacing(message):
    """(rows, columns) mm per pixel from an image message's ijk-to-world matrix, or None where it gives none."""
    matrix = getattr(message, "ijk_to_world_matrix", None)
    if matrix is None:
        return None
    sx, sy = np.linalg.norm(np.asarray(matrix, float)[:3, :2], axis=0)
    return (float(sy), float(sx)) if sx > 0 and sy > 0 and (sx, sy) != (1.0, 1.0) else None


def open_source(text):
    """The started Source that --live SOURCE names."""
    return (IgtlSource(text) if text.startswith(IGTL_PREFIX) else CaptureSource(text)).start()


def gray(frame):
    """A frame as the gray uint8 image the model expects: colour by OpenCV's weights, a volume's first slice."""
    frame = np.asarray(frame)
    if frame.ndim == 4 or (frame.ndim == 3 and frame.shape[-1] not in (3, 4)):
        frame = frame[0]  # OpenIGTLink's (slices, rows, columns[, components])
    if frame.ndim == 3:
        frame = cv2.cvtColor(frame[..., :3], cv2.COLOR_BGR2GRAY)
    if frame.dtype != np.uint8:
        frame = cv2.normalize(frame.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return frame


class Latency:
    """Capture-to-drawn times of the drawn frames, and the pace of the stream."""

    def __init__(self):
        self.ms, self.arrivals = [], []

    def add(self, arrived, drawn):
        self.ms.append(1e3 * (drawn - arrived))
        self.arrivals.append(arrived)

    def summary(self, latest, fps=None):
        """The figures: p50, p95 and max latency (ms), frames drawn, offered and dropped, frames/s drawn, the
        source's frame time (its own rate's, else that of the frames it offered) and how many frames were drawn
        later than LATE_FRAMES of them."""
        frame_ms = 1e3 / fps if fps else 1e3 * latest.frame_time()
        ms = np.asarray(self.ms) if self.ms else np.full(1, np.nan)
        elapsed = (self.arrivals[-1] - self.arrivals[0]) if len(self.arrivals) > 1 else float("nan")
        return {
            "latency_p50_ms": round(float(np.percentile(ms, 50)), 2),
            "latency_p95_ms": round(float(np.percentile(ms, 95)), 2),
            "latency_max_ms": round(float(ms.max()), 2),
            "frames_drawn": len(self.ms),
            "frames_offered": latest.offered,
            "frames_dropped": latest.dropped,
            "fps_drawn": round((len(self.ms) - 1) / elapsed, 2) if elapsed > 0 else float("nan"),
            "frame_time_ms": round(frame_ms, 2),
            "frames_late": int(np.count_nonzero(ms > LATE_FRAMES * frame_ms)),
        }


def summary_line(figures):
    return (
        f"latency p50 {figures['latency_p50_ms']:.1f} ms, p95 {figures['latency_p95_ms']:.1f} ms, max "
        f"{figures['latency_max_ms']:.1f} ms; {figures['fps_drawn']:.1f} frames/s drawn, {figures['frames_drawn']} "
        f"of {figures['frames_offered']} ({figures['frames_dropped']} dropped, {figures['frames_late']} later than "
        f"{LATE_FRAMES} frame times of {figures['frame_time_ms']:.1f} ms)"
    )


class Window:
    """A Tk window showing BGR pictures; closed, or q or Esc pressed, it says so through `closed`."""

    def __init__(self, title):
        import tkinter

        self.root = tkinter.Tk()
        self.root.title(title)
        self.label = tkinter.Label(self.root)
        self.label.pack()
        self.closed = False
        for key in ("q", "<Escape>"):
            self.root.bind(key, self.close)
        self.root.protocol("WM_DELETE_WINDOW", self.close)

    def close(self, *_):
        self.closed = True

    def show(self, picture):
        import tkinter

        ok, ppm = cv2.imencode(".ppm", picture)
        self.image = tkinter.PhotoImage(data=ppm.tobytes(), format="PPM")  # kept: Tk shows it while referenced
        self.label.configure(image=self.image)
        self.root.update()

    def destroy(self):
        self.root.destroy()


def window(title):
    """A Window where a display exists, else None."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        return None
    try:
        return Window(title)
    except Exception:  # no usable display or no Tk: the outputs are written instead
        return None


class Recording:
    """The overlay video (at `video`, a temporary path) and the per-frame CSV (at `table`), written as the stream
    runs on a thread of their own, off the path from a frame to its overlay (OpenCV encodes without the GIL): the
    CSV row by row, flushed, so that it can be followed and survives a crash. A recording that falls QUEUED
    frames behind holds the stream up rather than lose frames."""

    QUEUED = 8

    def __init__(self, video, table, fps):
        self.paths, self.fps = (video, table), fps
        self.video = self.table = self.columns = self.size = self.error = None  # opened at the first frame
        self._queue = queue.Queue(self.QUEUED)
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()

    def add(self, picture, rows):
        self._queue.put((picture, rows))

    def close(self):
        """Write what is queued and close the files; raise what went wrong in writing them (an OSError, which
        atomic_path turns into one line)."""
        self._queue.put(None)
        self._thread.join()
        if self.video is not None:
            self.video.release()
            self.table.close()
        if self.error:
            raise self.error

    def _write(self):
        while (item := self._queue.get()) is not None:
            if self.error is None:  # after a failure the frames are taken and dropped, so that add() never blocks
                try:
                    self._record(*item)
                except OSError as e:
                    self.error = e

    def _record(self, picture, rows):
        if self.video is None:
            self.size = (picture.shape[1], picture.shape[0])
            self.video = cv2.VideoWriter(str(self.paths[0]), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            self.table = open(self.paths[1], "w", newline="")
            self.columns = csv.DictWriter(self.table, fieldnames=list(rows[0]), restval="", extrasaction="ignore")
            self.columns.writeheader()
        if picture.shape[1::-1] != self.size:  # the source changed its frame size: a video keeps its first
            picture = cv2.resize(picture, self.size, interpolation=cv2.INTER_AREA)
        self.video.write(picture)
        self.columns.writerows(rows)
        self.table.flush()


def stream(predictor, source, out, smooth=0, region=None, spacing=None, timeout=10.0, show=True, send=False):
    """Segment the newest frame of a started Source until it ends (or sends nothing for `timeout` s), its window is
    closed, or Ctrl-C; return the latency figures (also in live_latency.json). Each frame: predicted in `region`
    (else the whole frame) at `spacing` mm per pixel (else the stream's own), post-processed, smoothed over
    `smooth` frames, drawn (in a window where a display exists and `show`), its labels sent back (`send`,
    OpenIGTLink), recorded. A frame's latency ends when its overlay is on screen and sent, before it is recorded."""
    view = window(f"{source.name}: q or Esc stops") if show else None
    latency, states = Latency(), [deploy.Hysteresis(smooth, len(predictor.names))]
    report = time.perf_counter() + REPORT_EVERY_S
    with atomic_path(out / OVERLAY_VIDEO_FILE.format(name=LIVE_NAME)) as tmp:
        recording = Recording(tmp, out / FRAMES_FILE.format(name=LIVE_NAME), source.fps or DEFAULT_FPS)
        try:
            while not (view and view.closed) and (taken := source.latest.take(timeout)) is not None:
                frame, arrived, index, sent_spacing = taken
                image = gray(frame)
                mm = spacing or sent_spacing  # the user's flag before the stream's own
                regions = [dataclasses.replace(region, spacing=mm) if region else whole_frame(image, mm)]
                p = predict_frames(predictor, [image], [regions], states)[0]
                picture = overlay(image, p.labels, p.present, predictor.names, p.unknown, regions)
                if view:
                    view.show(picture)
                if send:
                    source.send(p.labels, mm)
                drawn = time.perf_counter()
                latency.add(arrived, drawn)
                timing = {"frame": index, "time_s": round(arrived - latency.arrivals[0], 4)}
                recording.add(
                    picture, [{**timing, "latency_ms": round(1e3 * (drawn - arrived), 2), **r} for r in p.rows]
                )
                if drawn > report and sys.stdout.isatty():
                    print(summary_line(latency.summary(source.latest, source.fps)), flush=True)
                    report = drawn + REPORT_EVERY_S
        except KeyboardInterrupt:  # the usual way to stop a stream: the outputs are closed as at its end
            pass
        finally:
            source.stop()
            if view:
                view.destroy()
            recording.close()
        if not latency.ms:
            raise UserError(f"--live {source.name}: no frame came within {timeout:g} s; is the source sending?")
    figures = {"source": source.name, "models": predictor.describe(), **latency.summary(source.latest, source.fps)}
    write_json(out / LATENCY_FILE, figures)
    return figures
