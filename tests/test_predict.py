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
from nerve.predictor import Predictor, structure_row

FRAMES = 12


def _cine(n=FRAMES):
    """n drifting frames of one synthetic subject, the nerve in view in the middle third."""
    return synthetic.cine(0, 1, n, (n // 3, 2 * n // 3))[0]


def write_video(path, frames, fps=20):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, frames[0].shape[::-1])
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()


def write_dicom(path, frames, syntax=None, regions=(), timing=None):
    """An ultrasound DICOM file of 8-bit gray frames (multi-frame when there are several), with tissue regions
    (x, y, w, h, mm per pixel) and timing attributes (FrameTime 50 ms where not given)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        UltrasoundImageStorage,
        UltrasoundMultiFrameImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if len(frames) > 1 else UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "Test^Patient", "P1", "S1", 1, 1
    ds.PatientBirthDate = ds.PatientSex = ds.StudyDate = ds.StudyTime = ds.ReferringPhysicianName = ""
    ds.AccessionNumber, ds.Manufacturer = "", "test"
    pixels = np.stack(frames)
    n, ds.Rows, ds.Columns = pixels.shape
    if n > 1:
        ds.NumberOfFrames = n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for key, value in (timing or {"FrameTime": 50}).items():  # 50 ms: 20 frames a second
        setattr(ds, key, value)
    if regions:
        ds.SequenceOfUltrasoundRegions = [_region(*region) for region in regions]
    if syntax:  # a compressed syntax: frames encapsulated (here raw bytes that no decoder accepts)
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([frame.tobytes() for frame in pixels])
    else:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _region(x, y, w, h, mm):
    from pydicom.dataset import Dataset

    region = Dataset()
    region.RegionLocationMinX0, region.RegionLocationMinY0 = x, y
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = x + w - 1, y + h - 1
    region.RegionDataType, region.RegionSpatialFormat = 1, 1  # tissue, 2-D
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = mm / 10
    return region


def test_a_scanners_screen_is_predicted_region_by_region_in_mm_and_a_bad_file_sinks_no_batch(trained, tmp_path):
    frame = _cine()[FRAMES // 2]  # the nerve in view
    screen = np.full((frame.shape[0] + 40, 2 * frame.shape[1] + 30), 40, np.uint8)  # two views side by side
    screen[20 : 20 + frame.shape[0], 10 : 10 + frame.shape[1]] = frame
    screen[20 : 20 + frame.shape[0], 20 + frame.shape[1] : 20 + 2 * frame.shape[1]] = frame
    h, w = frame.shape
    write_dicom(tmp_path / "two.dcm", [screen], regions=[(10, 20, w, h, 0.2), (20 + w, 20, w, h, 0.2)])
    write_dicom(tmp_path / "cine.dcm", [frame] * 3, timing={"FrameTimeVector": [0, 40, 60]})
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"damaged")
    out = tmp_path / "out"
    args = [tmp_path / "two.dcm", tmp_path / "cine.dcm", tmp_path / "broken.dcm", "--results", trained[0]]
    result = run_main("predict", *args, "--output", out, "--precision", "fp32", "--ood-threshold", 1e9)
    assert result.returncode == 1 and "2 of 3 inputs written; 1 failed: broken.dcm" in result.stderr
    assert sum("broken.dcm" in line for line in result.stderr.splitlines()) == 2  # its line, and the summary
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["region"] for r in rows] == [f"{w}x{h} at ({x}, 20), 0.2x0.2 mm per pixel" for x in (10, 20 + w)]
    mask = cv2.imread(str(out / "two_mask.png"), cv2.IMREAD_UNCHANGED)
    outside = np.ones(mask.shape, bool)
    outside[20 : 20 + h, 10 : 10 + w] = outside[20 : 20 + h, 20 + w : 20 + 2 * w] = False
    assert not mask[outside].any()  # nothing predicted outside the regions
    for row, x in zip(rows, (10, 20 + w)):  # each view's own mask, in mm from the region's spacing
        area = np.count_nonzero(mask[20 : 20 + h, x : x + w])
        assert int(row["nerve_area"]) == area and float(row["nerve_area_mm2"]) == pytest.approx(area * 0.04, abs=1e-3)
        if area:
            assert float(row["nerve_depth_mm"]) == pytest.approx((float(row["nerve_cy"]) - 20) * 0.2, abs=0.02)
    assert sum(int(r["nerve_area"]) for r in rows) > 0  # not vacuous: the nerve is drawn in a view
    times = [float(r["time_s"]) for r in csv.DictReader(open(out / "cine_frames.csv"))]
    assert times == [0.0, 0.04, 0.1] and "from FrameTimeVector" in result.stdout
    # the SEG beside the masks: one segment per structure, the PNG's pixels, referencing its source instance
    import highdicom
    import pydicom

    seg = highdicom.seg.segread(out / "two_seg.dcm")
    source = pydicom.dcmread(tmp_path / "two.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["nerve"]
    assert (
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    )
    np.testing.assert_array_equal(seg.pixel_array > 0, mask > 0)
    # a cine loop without a frame of reference (highdicom refuses it): a SEG frame per source frame, in order
    cine = highdicom.seg.segread(out / "cine_seg.dcm")
    source = pydicom.dcmread(tmp_path / "cine.dcm")
    assert "FrameOfReferenceUID" not in source and cine.NumberOfFrames == 3
    labels = cine.get_pixels_by_source_frame(source.SOPInstanceUID, [1, 2, 3], combine_segments=True)
    areas = [int(r["nerve_area"]) for r in csv.DictReader(open(out / "cine_frames.csv"))]
    assert [np.count_nonzero(frame == 1) for frame in labels] == areas and sum(areas) > 0
    assert (
        not {"PatientName", "PatientID"} & set(rows[0]) and "PatientName" not in (out / "predictions.json").read_text()
    )


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
    assert "loop.dcm: 4 frames" in unknown.stdout and ", 4 not scans this model knows" in unknown.stdout
    row = list(csv.DictReader(open(out / "predictions.csv")))[0]
    assert row["unknown_scan"] == "True" and row["nerve_area"] == "0"
    assert not cv2.imread(str(out / "scan_mask.png"), cv2.IMREAD_UNCHANGED).any()
    assert all(r["unknown_scan"] == "True" for r in csv.DictReader(open(out / "loop_frames.csv")))


def test_every_real_ultrasound_dicom_file_decodes_with_the_default_install():
    folder = ROOT.parent / "shared" / "data" / "dicom"
    files = sorted(folder.glob("*.dcm"))
    if len(files) < 7:
        pytest.skip(f"the real DICOM files are not at {folder} (the ../shared folder beside the repo)")
    for path in files:  # uncompressed, RLE, JPEG 2000, JPEG Lossless, JPEG-LS; gray, RGB, YBR, palette
        ds, frames = sources.read_dicom(path)
        assert frames.dtype == np.uint8 and frames.shape[1:] == (ds.Rows, ds.Columns) and frames.std() > 0, path.name
    aloka = sources.dicom_scan(folder / "gdcm-US-ALOKA-16.dcm").regions  # two B-mode views side by side
    assert [(r.x, r.y, r.w, r.h) for r in aloka] == [(32, 24, 304, 392), (336, 24, 304, 392)]
    assert aloka[0].spacing == pytest.approx((0.3827, 0.3827), abs=1e-4)  # cm in the file, mm here


def test_palette_colour_dicom_becomes_gray_through_its_colour_table():
    folder = ROOT.parent / "shared" / "data" / "dicom"
    if not (folder / "OBXXXX1A_rle_2frame.dcm").exists():
        pytest.skip(f"the real DICOM files are not at {folder} (the ../shared folder beside the repo)")
    import pydicom

    _, frames = sources.read_dicom(folder / "OBXXXX1A_rle_2frame.dcm")  # 8-bit palette, RLE, two frames
    indices = pydicom.dcmread(folder / "OBXXXX1A_rle_2frame.dcm").pixel_array
    assert frames.shape == (2, 600, 800) and frames.dtype == np.uint8
    assert not np.array_equal(frames, indices)  # the table's colours, not its indices
    _, ybr = sources.read_dicom(folder / "US1_J2KR.dcm")  # JPEG 2000 in YBR_RCT: pydicom gives RGB already
    _, rgb = sources.read_dicom(folder / "US1_UNCR.dcm")  # the same image uncompressed, in RGB
    np.testing.assert_array_equal(ybr, rgb)


@pytest.mark.slow
def test_bad_inputs_are_one_line_each(trained, tmp_path):
    from pydicom.uid import JPEG2000

    results = trained[0]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    write_dicom(tmp_path / "j2k.dcm", _cine(2), syntax=JPEG2000)  # raw bytes labelled as JPEG 2000
    (tmp_path / "empty").mkdir()
    for path, message in (
        (tmp_path / "broken.mp4", "OpenCV cannot decode this video"),
        (tmp_path / "j2k.dcm", "transfer syntax JPEG 2000"),
    ):
        result = run_main("predict", path, "--results", results, "--output", tmp_path / "out", "--precision", "fp32")
        lines = result.stderr.strip().splitlines()
        assert (
            result.returncode == 1
            and message in lines[-2]
            and lines[-1].endswith(f"0 of 1 inputs written; 1 failed: {path.name}")
        )
    for paths, message in (
        ([tmp_path / "empty"], "holds no images, videos or DICOM files"),
        ([tmp_path / "missing.png"], "missing.png not found"),
    ):
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
    predictor = object.__new__(Predictor)  # the post-processing alone: no model needed
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


class ScriptedPresence(Predictor):
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
        scan = sources.Scan(iter(frames), len(frames), fps=20.0)
        rows = predict.predict_sequence(ScriptedPresence(presence), scan, Path(f"s{smooth}"), tmp_path, smooth)
        shown[smooth] = [int(int(r["nerve_area"]) > 0) for r in rows]
    assert shown[1] == [1, 0, 1, 1, 0, 1, 1, 1]  # each frame's own gate
    assert shown[2] == [0, 0, 0, 1, 1, 1, 1, 1]  # on after two passing frames in a row, and one failing keeps it on


def test_a_masks_area_centroid_and_box_in_pixels_and_mm():
    mask = np.zeros((50, 70, 1), np.uint8)
    mask[10:20, 30:34, 0] = 1
    mask[19, 40, 0] = 1
    row = structure_row(["nerve"], [0.8], mask, 0.5, False, sources.Region(5, 7, 70, 50, (0.1, 0.2)))
    ys, xs = np.nonzero(mask[..., 0])
    assert (
        row["nerve_area"] == 41
        and row["nerve_cx"] == round(xs.mean() + 5, 1)
        and row["nerve_cy"] == round(ys.mean() + 7, 1)
    )
    assert (row["nerve_x"], row["nerve_y"], row["nerve_w"], row["nerve_h"]) == (35, 17, 11, 10)
    assert row["nerve_area_mm2"] == pytest.approx(41 * 0.02) and row["nerve_top_mm"] == pytest.approx(1.0)
    assert row["nerve_w_mm"] == pytest.approx(2.2) and row["nerve_depth_mm"] == pytest.approx(ys.mean() * 0.1, abs=0.01)
    empty = structure_row(["nerve"], [0.1], np.zeros_like(mask), 0.5, False, sources.Region(0, 0, 70, 50))
    assert empty["nerve_area"] == 0 and empty["nerve_cx"] == empty["nerve_w"] == "" and "nerve_area_mm2" not in empty
