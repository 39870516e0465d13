import json
import shutil

import numpy as np
import pytest
import tifffile

from conftest import ROOT, run_script
from nerve import common, store


def test_original_kaggle_tiffs_convert_exactly(shared_nerve, tmp_path):
    for part in ("train", "test"):
        shutil.copytree(shared_nerve / "tiff" / part, tmp_path / part)
    store.convert(tmp_path, workers=2)
    a = store.load_arrays(tmp_path, store.ARRAYS)
    assert a["train_images"].shape == a["train_masks"].shape == (77, 420, 580)
    assert a["train_images"].dtype == a["train_masks"].dtype == np.uint8
    assert set(np.unique(a["train_masks"])) == {0, 1}
    assert np.count_nonzero(a["train_masks"].any(axis=(1, 2))) == 34
    assert a["test_images"].shape == (50, 420, 580) and a["test_ids"].tolist() == list(range(1, 51))
    assert sorted(set(a["train_subjects"].tolist())) == [1, 2, 5, 7, 8, 9, 10, 11, 13]
    # ids, subjects and pixels line up with the files they came from
    k = 10
    s, n = a["train_ids"][k].split("_")
    assert int(s) == a["train_subjects"][k]
    np.testing.assert_array_equal(a["train_images"][k], tifffile.imread(tmp_path / "train" / f"{s}_{n}.tif"))
    mask = tifffile.imread(tmp_path / "train" / f"{s}_{n}_mask.tif")
    np.testing.assert_array_equal(a["train_masks"][k], mask // 255)
    np.testing.assert_array_equal(a["test_images"][4], tifffile.imread(tmp_path / "test" / "5.tif"))


def test_synthetic_tree_converts(tiny_input):
    a = store.load_arrays(tiny_input, store.ARRAYS)
    assert a["train_images"].shape == (48, 420, 580) and a["test_images"].shape == (16, 420, 580)
    assert sorted(set(a["train_subjects"].tolist())) == [1, 2, 3]
    assert a["train_ids"][0] == "1_1" and sorted(a["test_ids"].tolist()) == list(range(1, 17))
    assert set(np.unique(a["train_masks"])) == {0, 1}


def test_rerun_is_a_no_op_until_forced(tiny_input):
    def written():
        return {p.name: p.stat().st_mtime_ns for p in tiny_input.iterdir() if p.is_file()}

    before = written()
    assert "up to date" in store.convert(tiny_input)
    assert written() == before  # nothing rewritten, nothing added
    assert "wrote" in store.convert(tiny_input, force=True)
    after = written()
    assert all(after[name] > before[name] for name in before if name.endswith(".npy"))


def _tree(tmp_path, train=((1, 1),), test=(1,)):
    """A valid little tree: blank images, one-pixel masks."""
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    mask = np.zeros((420, 580), np.uint8)
    mask[10, 10] = 255
    for s, n in train:
        tifffile.imwrite(tmp_path / "train" / f"{s}_{n}.tif", np.zeros((420, 580), np.uint8), compression="lzw")
        tifffile.imwrite(tmp_path / "train" / f"{s}_{n}_mask.tif", mask, compression="lzw")
    for i in test:
        tifffile.imwrite(tmp_path / "test" / f"{i}.tif", np.zeros((420, 580), np.uint8), compression="lzw")
    return tmp_path


def _error(tmp_path):
    with pytest.raises(common.UserError) as e:
        store.convert(tmp_path, workers=1)
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".tmp*")), "partial output left"
    return str(e.value)


def test_image_without_mask_and_mask_without_image(tmp_path):
    _tree(tmp_path, train=((1, 1), (1, 2), (2, 1)))
    (tmp_path / "train" / "1_2_mask.tif").unlink()
    (tmp_path / "train" / "2_1.tif").unlink()
    msg = _error(tmp_path)
    assert "1_2.tif has no mask 1_2_mask.tif" in msg and "2_1_mask.tif has no image 2_1.tif" in msg


def test_other_sizes_are_kept_as_they_are_in_a_canvas_that_holds_them_all(tmp_path):
    _tree(tmp_path, train=((1, 1), (1, 2), (2, 1)))
    tifffile.imwrite(tmp_path / "test" / "1.tif", np.full((400, 600), 9, np.uint8))
    summary = store.convert(tmp_path, workers=1)
    assert "each at its own size (2 sizes, in a 420x600 canvas)" in summary
    a = store.load_arrays(tmp_path, store.ARRAYS)
    assert a["test_images"].shape == (1, 420, 600) and a["test_sizes"].tolist() == [[400, 600]]
    test = store.frames(a, "test_images")[0]
    assert test.shape == (400, 600) and (test == 9).all() and not a["test_images"][0, 400:].any()
    assert a["train_sizes"].tolist() == [[420, 580]] * 3 and store.frames(a, "train_images")[0].shape == (420, 580)


def test_arrays_an_earlier_release_resized_to_one_size_are_refused(tmp_path):
    _tree(tmp_path, train=((1, 1), (1, 2)))
    tifffile.imwrite(tmp_path / "test" / "1.tif", np.full((400, 500), 9, np.uint8))
    store.convert(tmp_path, workers=1)
    manifest = json.loads((tmp_path / common.MANIFEST).read_text())
    manifest.pop("canvas")
    (tmp_path / common.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(common.UserError, match="test_sizes.npy: an earlier release resized these images to one size"):
        store.load_arrays(tmp_path, store.ARRAYS)
    assert store.load_arrays(tmp_path, ("train_images", "train_sizes"))  # of one size: as they always were


def test_16_bit_images_are_scaled_by_their_highest_bit_and_colour_becomes_gray(tmp_path):
    _tree(tmp_path)
    twelve_bit = np.zeros((420, 580), np.uint16)
    twelve_bit[0, :2] = (4095, 2048)
    tifffile.imwrite(tmp_path / "train" / "1_1.tif", twelve_bit)
    rgb = np.zeros((420, 580, 3), np.uint8)
    rgb[..., 1] = 100  # pure green: gray 59 (ITU-R 601 weights)
    tifffile.imwrite(tmp_path / "test" / "1.tif", rgb, photometric="rgb")
    store.convert(tmp_path, workers=1)
    a = store.load_arrays(tmp_path, ("train_images", "test_images"))
    assert a["train_images"][0, 0, :3].tolist() == [255, 128, 0]
    assert abs(int(a["test_images"][0, 0, 0]) - 59) <= 1


def test_corrupt_file(tmp_path):
    _tree(tmp_path)
    path = tmp_path / "train" / "1_1.tif"
    path.write_bytes(path.read_bytes()[:100])
    assert "1_1.tif unreadable TIFF" in _error(tmp_path)


def test_mask_that_is_not_0_255(tmp_path):
    _tree(tmp_path)
    tifffile.imwrite(tmp_path / "train" / "1_1_mask.tif", np.full((420, 580), 3, np.uint8))
    assert "1_1_mask.tif is not a 0/255 mask" in _error(tmp_path)


def test_bad_names_and_empty_folders(tmp_path):
    _tree(tmp_path, train=(), test=())
    assert "train/ has no {subject}_{n}.tif images" in _error(tmp_path)
    (tmp_path / "test" / "scan-7.tif").write_bytes(b"")
    assert "scan-7.tif: name is not {id}.tif" in _error(tmp_path)


def test_the_test_part_is_optional(tmp_path):
    _tree(tmp_path, test=())
    (tmp_path / "test").rmdir()
    assert "1 train pairs and 0 test images" in store.convert(tmp_path, workers=1)
    assert store.load_arrays(tmp_path, ("test_images",))["test_images"].shape == (0, 420, 580)


def test_missing_folder(tmp_path):
    assert "holds no dataset this pipeline reads" in _error(tmp_path)


def test_cli_reports_problems_in_one_message_without_traceback(tmp_path):
    _tree(tmp_path)
    (tmp_path / "test" / "1.tif").write_bytes(b"not a tiff")
    for flags in ((), ("--check",)):
        result = run_script(ROOT / "data.py", "--input", tmp_path, *flags)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr and "1.tif unreadable TIFF" in result.stderr
    assert not list(tmp_path.glob("*.npy"))


def test_synthetic_refuses_to_write_over_existing_data(tmp_path):
    _tree(tmp_path)
    result = run_script(ROOT / "data.py", "--synthetic", "--input", tmp_path)
    assert result.returncode == 1 and "not empty" in result.stderr


def write_arrays(folder, n=3, **replace):
    arrays = {
        "train_images": np.zeros((n, 420, 580), np.uint8),
        "train_masks": np.zeros((n, 420, 580), np.uint8),
        "train_ids": np.array([f"1_{i}" for i in range(n)]),
        "train_subjects": np.ones(n, np.int32),
    }
    for name, array in {**arrays, **replace}.items():
        np.save(folder / f"{name}.npy", array)
    return list(arrays)


@pytest.mark.parametrize(
    "replace, problem",
    [
        ({"train_images": np.zeros((3, 96, 128), np.uint8)}, r"train_masks.npy is \(3, 420, 580\) uint8, expected"),
        ({"train_masks": np.zeros((3, 420, 580), np.float32)}, "train_masks.npy is .* float32"),
        ({"train_ids": np.array(["1_1", "1_2"])}, "train_ids.npy holds 2 train images, expected 3"),
        ({"train_subjects": np.ones((3, 2))}, "train_subjects.npy has shape"),
    ],
)
def test_arrays_from_another_run_are_refused(tmp_path, replace, problem):
    names = write_arrays(tmp_path, **replace)
    with pytest.raises(common.UserError, match=f"(?s)data.py --dataset {tmp_path} --force.*{problem}"):
        store.load_arrays(tmp_path, names)


def test_arrays_must_match_the_manifest_and_be_readable(tmp_path):
    names = write_arrays(tmp_path)
    assert len(store.load_arrays(tmp_path, names)["train_images"]) == 3
    (tmp_path / common.MANIFEST).write_text('{"train": 5, "test": 2, "newest_input_mtime": 0.0}')
    with pytest.raises(common.UserError, match="train_images.npy holds 3 train images, expected 5"):
        store.load_arrays(tmp_path, names)
    (tmp_path / common.MANIFEST).unlink()
    whole = (tmp_path / "train_images.npy").read_bytes()
    (tmp_path / "train_images.npy").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(common.UserError, match="train_images.npy cannot be read"):
        store.load_arrays(tmp_path, names)


def test_each_images_spacing_is_stored_and_arrays_without_it_read_as_unknown(tiny_input, tmp_path):
    np.testing.assert_array_equal(store.spacing(tiny_input, 48), np.full((48, 2), np.nan))  # no --spacing given
    assert np.isnan(store.spacing(tmp_path, 3)).all() and store.spacing(tmp_path, 3).shape == (3, 2)  # none there
