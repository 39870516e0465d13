"""nerve/live.py and predict.py --live: the newest frame only, a video played as a live source, an OpenIGTLink
stream from a loopback server with the labels sent back, and the latency figures."""

import csv
import json
import socket
import time

from nerve.common import FRAMES_FILE, LATENCY_FILE, LIVE_NAME, OVERLAY_VIDEO_FILE

import cv2
import numpy as np
import pyigtl
import pytest

from conftest import run_main
from nerve import live


def test_a_frame_nobody_took_is_replaced_by_the_newer_and_counted_as_dropped():
    latest = live.Latest()
    for i in range(3):
        latest.put(np.full((2, 2), i, np.uint8), spacing=(0.1, 0.2))
    frame, arrived, index, spacing = latest.take(timeout=1)
    assert frame[0, 0] == 2 and index == 2 and spacing == (0.1, 0.2) and arrived <= time.perf_counter()
    assert (latest.offered, latest.dropped) == (3, 2)
    assert latest.take(timeout=0.01) is None  # nothing new: it waits no longer than asked
    latest.put(np.zeros((2, 2), np.uint8))
    latest.end()
    assert latest.take(timeout=1) is not None and latest.take(timeout=5) is None  # ended: no wait


def test_frames_of_any_source_become_the_gray_uint8_image_the_model_takes():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (6, 8, 3), np.uint8)
    assert np.array_equal(live.gray(bgr), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    wide = np.linspace(0, 4095, 48).reshape(6, 8).astype(np.uint16)  # a 12-bit frame grabber
    assert live.gray(wide).dtype == np.uint8 and (live.gray(wide).min(), live.gray(wide).max()) == (0, 255)
    assert live.gray(bgr[None]).shape == live.gray(bgr[..., 0][None]).shape == (6, 8)  # OpenIGTLink's slice axis


def test_an_image_messages_matrix_gives_the_spacing_and_the_labels_go_back_with_it():
    message = pyigtl.ImageMessage(np.zeros((1, 4, 6), np.uint8), ijk_to_world_matrix=np.diag([0.2, 0.1, 1, 1]))
    assert live.igtl_spacing(message) == pytest.approx((0.1, 0.2))  # rows (j), columns (i)
    assert live.igtl_spacing(pyigtl.ImageMessage(np.zeros((1, 4, 6), np.uint8))) is None  # identity: not mm


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_video_played_live_is_drawn_frame_by_frame_with_its_latency(trained, tmp_path):
    results, _, _ = trained
    video = tmp_path / "loop.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (96, 64))
    for i in range(30):
        writer.write(np.full((64, 96, 3), 40 + 5 * i, np.uint8))
    writer.release()
    out = tmp_path / "out"
    result = run_main("predict", "--live", video, "--results", results, "--output", out, "--no-window")
    assert result.returncode == 0, result.stderr
    figures = json.loads((out / LATENCY_FILE).read_text())
    assert figures["frames_offered"] == 30 and figures["frames_drawn"] + figures["frames_dropped"] == 30
    assert figures["frame_time_ms"] == pytest.approx(1000 / 30, rel=0.01)  # the file's own rate
    assert 0 < figures["latency_p50_ms"] <= figures["latency_p95_ms"] <= figures["latency_max_ms"]
    rows = read_rows(out / FRAMES_FILE.format(name=LIVE_NAME))
    assert len(rows) == figures["frames_drawn"] and all(float(row["latency_ms"]) > 0 for row in rows)
    frames = [int(row["frame"]) for row in rows]
    assert frames == sorted(set(frames))  # the newest frame each time: none twice, none out of order
    capture = cv2.VideoCapture(str(out / OVERLAY_VIDEO_FILE.format(name=LIVE_NAME)))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == len(rows)
    assert "latency p50" in result.stdout and "dropped" in result.stdout


def test_an_openigtlink_stream_is_segmented_and_its_label_maps_come_back(trained, tmp_path):
    results, _, _ = trained
    frames = [np.full((48, 64), 30 + 10 * i, np.uint8) for i in range(20)]
    out, port = tmp_path / "out", free_port()
    with live.Replay(frames, port, fps=30, spacing=(0.25, 0.25)) as scanner:  # as PLUS sends a probe's images
        result = run_main(
            "predict", "--live", f"igtl://127.0.0.1:{port}", "--results", results, "--output", out,
            "--send-labels", "--no-window", "--live-timeout", 1.5,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert scanner.sent == len(frames)
    figures = json.loads((out / LATENCY_FILE).read_text())
    assert figures["frame_time_ms"] == pytest.approx(1000 / 30, rel=0.15)  # the stream's own pace: it gives no rate
    rows = read_rows(out / FRAMES_FILE.format(name=LIVE_NAME))
    assert 0 < len(rows) <= len(frames) and "0.25x0.25 mm per pixel" in rows[0]["region"]
    assert rows[0]["nerve_area_mm2"]
    labels = scanner.labels
    assert len(labels) == len(rows) and all(np.shape(m.image)[-2:] == (48, 64) for m in labels)
    assert set(np.unique(np.concatenate([np.ravel(m.image) for m in labels]))) <= {0, 1}


def test_live_mistakes_are_one_line_each(trained, tmp_path):
    results, _, _ = trained
    cases = [
        (["scan.png", "--live", "0"], "not both"),
        (["--live", str(tmp_path / "missing.mp4")], "OpenCV cannot open it"),
        (["--live", str(tmp_path / "missing.mp4"), "--send-labels"], "--send-labels sends over OpenIGTLink"),
        ([], "not both"),
        (["--live", f"igtl://127.0.0.1:{free_port()}", "--live-timeout", 0.2, "--no-window"], "no frame came"),
    ]
    for flags, message in cases:
        result = run_main("predict", *flags, "--results", results, "--output", tmp_path / "out")
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, flags


def test_a_recording_keeps_its_first_frame_size_when_the_source_changes_it(tmp_path):
    recording = live.Recording(tmp_path / "o.mp4", tmp_path / "o.csv", 10)
    for size in ((60, 80), (60, 80), (90, 120)):  # a scanner's depth changed mid-stream
        recording.add(np.full((*size, 3), 100, np.uint8), [{"frame": 0, "latency_ms": 1.0}])
    recording.close()
    capture = cv2.VideoCapture(str(tmp_path / "o.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3 and capture.get(cv2.CAP_PROP_FRAME_WIDTH) == 80
    assert len(read_rows(tmp_path / "o.csv")) == 3
