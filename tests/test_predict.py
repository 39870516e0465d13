"""predict.py on the inputs users have: images of any size and colour, nested folders, a cine loop as MP4,
multi-frame and single-frame DICOM; and its one-line errors."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import predict
from conftest import ROOT, assert_picture, run_main, run_script
from nerve import common, deploy, sources, synthetic

FRAMES = 12


def _cine(n=FRAMES):
    """n drifting frames of one synthetic subject, the nerve in view in the middle third."""
    return synthetic.cine(0, 1, n, (n // 3, 2 * n // 3))[0]


def write_video(path, frames, fps=20):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, frames[0].shape[::-1])
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()


def write_dicom(path, frames, syntax=None):
    """An ultrasound DICOM file of 8-bit gray frames (multi-frame when there are several)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    pixels = np.stack(frames)
    ds.NumberOfFrames, ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.FrameTime = 50  # ms: 20 frames a second
    if syntax:  # a compressed syntax: frames encapsulated (here raw bytes that no decoder accepts)
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([frame.tobytes() for frame in pixels])
    else:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.slow
def test_images_folders_videos_and_dicom_come_back_at_their_own_size(trained, tmp_path):
    results = trained[0]
    frames = _cine()
    scans = tmp_path / "scans"
    (scans / "left").mkdir(parents=True)
    rgb = cv2.cvtColor(cv2.resize(frames[0], (300, 200)), cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(scans / "left" / "small.png"), rgb)
    cv2.imwrite(str(scans / "frame.jpg"), frames[1])
    write_video(tmp_path / "loop.mp4", frames)
    write_dicom(tmp_path / "loop.dcm", frames[:5])
    write_dicom(tmp_path / "still.dcm", frames[:1])
    out = tmp_path / "out"
    inputs = [scans, tmp_path / "loop.mp4", tmp_path / "loop.dcm", tmp_path / "still.dcm"]
    result = run_script(ROOT / "predict.py", *inputs, "--results", results, "--output", out, "--smooth", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    mask = cv2.imread(str(out / "scans" / "left" / "small_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (200, 300) and set(np.unique(mask)) <= {0, 255}
    assert_picture(out / "scans" / "left" / "small_overlay.png", 150, 250)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 3 and {r["width"] for r in rows} == {"300", "580"}
    assert {"nerve_presence", "nerve_area", "nerve_cx", "nerve_x", "nerve_h"} <= set(rows[0])
    assert all(float(r["ood_score"]) >= 0 and r["unknown_scan"] in ("True", "False") for r in rows)
    assert len(json.loads((out / "predictions.json").read_text())["images"]) == 3
    for name, n in (("loop_mp4", FRAMES), ("loop_dcm", 5)):  # one stem, two inputs: neither overwrites the other
        per_frame = list(csv.DictReader(open(out / f"{name}_frames.csv")))
        assert [int(r["frame"]) for r in per_frame] == list(range(n)) and float(per_frame[1]["time_s"]) == 0.05
        video = cv2.VideoCapture(str(out / f"{name}_overlay.mp4"))
        assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == n and int(video.get(cv2.CAP_PROP_FRAME_WIDTH)) == 580


@pytest.mark.slow
def test_a_scan_over_the_out_of_distribution_threshold_gets_no_mask_and_says_so(trained, tmp_path):
    frames = _cine()
    cv2.imwrite(str(tmp_path / "scan.png"), frames[FRAMES // 2])  # the nerve in view
    write_dicom(tmp_path / "loop.dcm", frames[:4])
    out = tmp_path / "out"
    args = [tmp_path / "scan.png", tmp_path / "loop.dcm", "--results", trained[0], "--output", out]
    args += ["--precision", "fp32"]  # the test process's own policy
    known = run_main("predict", *args, "--ood-threshold", 1e9)
    assert known.returncode == 0 and "not scans this model knows" not in known.stdout
    assert list(csv.DictReader(open(out / "predictions.csv")))[0]["unknown_scan"] == "False"
    unknown = run_main("predict", *args, "--ood-threshold", 0)
    assert unknown.returncode == 0, unknown.stderr
    assert "1 image(s), 1 not scans this model knows" in unknown.stdout
    assert "4 frames, 4 not scans this model knows" in unknown.stdout
    row = list(csv.DictReader(open(out / "predictions.csv")))[0]
    assert row["unknown_scan"] == "True" and row["nerve_area"] == "0"
    assert not cv2.imread(str(out / "scan_mask.png"), cv2.IMREAD_UNCHANGED).any()
    assert all(r["unknown_scan"] == "True" for r in csv.DictReader(open(out / "loop_frames.csv")))


def test_palette_colour_dicom_becomes_gray_through_its_colour_table():
    folder = ROOT.parent / "shared" / "data" / "dicom"
    if not (folder / "OBXXXX1A_rle_2frame.dcm").exists():
        pytest.skip(f"the real DICOM files are not at {folder} (the ../shared folder beside the repo)")
    import pydicom

    frames, _ = sources.dicom_frames(folder / "OBXXXX1A_rle_2frame.dcm")  # 8-bit palette, RLE, two frames
    indices = pydicom.dcmread(folder / "OBXXXX1A_rle_2frame.dcm").pixel_array
    assert frames.shape == (2, 600, 800) and frames.dtype == np.uint8
    assert not np.array_equal(frames, indices)  # the table's colours, not its indices
    ybr, _ = sources.dicom_frames(folder / "US1_J2KR.dcm")  # JPEG 2000 in YBR_RCT: pydicom gives RGB already
    rgb, _ = sources.dicom_frames(folder / "US1_UNCR.dcm")  # the same image uncompressed, in RGB
    np.testing.assert_array_equal(ybr, rgb)


@pytest.mark.slow
def test_bad_inputs_are_one_line_each(trained, tmp_path):
    from pydicom.uid import JPEG2000

    results = trained[0]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    write_dicom(tmp_path / "j2k.dcm", _cine(2), syntax=JPEG2000)  # raw bytes labelled as JPEG 2000
    (tmp_path / "empty").mkdir()
    cases = [
        ([tmp_path / "broken.mp4"], "OpenCV cannot decode this video"),
        ([tmp_path / "j2k.dcm"], "transfer syntax JPEG 2000"),
        ([tmp_path / "empty"], "holds no images, videos or DICOM files"),
        ([tmp_path / "missing.png"], "missing.png not found"),
    ]
    for paths, message in cases:
        with pytest.raises(common.UserError, match=message):
            # fp32, the test process's own policy: the flag's auto would set bf16 here for the tests after
            predict.main(
                [*map(str, paths), "--results", str(results), "--output", str(tmp_path / "out"), "--precision", "fp32"]
            )
    with pytest.raises(common.UserError, match="run `python train.py` first"):
        predict.main([str(tmp_path / "broken.png"), "--results", str(tmp_path / "nothing")])
    result = run_script(ROOT / "predict.py", tmp_path / "broken.png", "--results", results, "--output", tmp_path / "o")
    assert result.returncode == 1 and "broken.png unreadable image" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_gates_a_mask_by_its_share_of_the_image_as_deploy_does():
    predictor = object.__new__(predict.Predictor)  # the post-processing alone: no model needed
    predictor.ood_threshold = deploy.OOD_THRESHOLD
    probs = np.zeros((42, 58, 1), np.float32)
    probs[10:20, 10:25] = 0.9  # 6.2% of the image, at any size
    image = np.zeros((420, 580), np.uint8)
    for fraction, shown in ((0.05, True), (0.08, False)):
        predictor.specs = [{**deploy.DEFAULT, "min_area_fraction": fraction}]
        masks, kept, _, full = predictor.masks(image, probs, np.array([0.9]), 0.0)
        assert kept.tolist() == [shown]
        drawn = deploy.labels(probs, [0.9], predictor.specs, image.shape, 0.0)
        np.testing.assert_array_equal(deploy.label_map((masks * kept)[None], full[None])[0], drawn)


class ScriptedPresence(predict.Predictor):
    """A predictor without a model: one blob in every frame, at the presence of a script, frame by frame."""

    def __init__(self, presence):
        self.names, self.specs, self.ood_threshold = ["nerve"], [deploy.DEFAULT], deploy.OOD_THRESHOLD
        self.presence = iter(presence)

    def probabilities(self, images):
        probs = np.zeros((len(images), 42, 58, 1), np.float32)
        probs[:, 10:20, 10:25] = 0.9
        present = np.array([[next(self.presence)] for _ in images])
        return probs, present, np.zeros(len(images), np.float32)


def test_smooth_shows_a_structure_only_after_as_many_frames_in_a_row_pass_its_gate(tmp_path):
    presence = [0.9, 0.2, 0.9, 0.9, 0.2, 0.9, 0.9, 0.9]
    frames = [np.zeros((42, 58), np.uint8)] * len(presence)
    shown = {}
    for smooth in (1, 2):
        rows = predict.predict_sequence(
            ScriptedPresence(presence), iter(frames), 20.0, len(frames), Path(f"s{smooth}"), tmp_path, smooth
        )
        shown[smooth] = [int(int(r["nerve_area"]) > 0) for r in rows]
    assert shown[1] == [1, 0, 1, 1, 0, 1, 1, 1]  # each frame's own gate
    assert shown[2] == [0, 0, 0, 1, 1, 1, 1, 1]  # on after two passing frames in a row, and one failing keeps it on
