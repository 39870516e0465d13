"""The layouts data.py reads: nnU-Net raw 2-D, folder pairs with binary, label-map or palette masks, of any
size and colour; grouping; and one clear message for every bad input, with nothing written."""

import json

import cv2
import numpy as np
import pytest

from conftest import ROOT, run_script
from nerve import common, layouts, store, synthetic


def _pairs(root, masks, shapes=((60, 80),), colour_images=True):
    """images/ and masks/ under root: one case per mask given, image i of shapes[i % len(shapes)]."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, mask in enumerate(masks):
        h, w = mask.shape[:2]
        image = rng.integers(0, 256, (h, w, 3) if colour_images else (h, w), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"case{i}.png"), image)
        cv2.imwrite(str(root / "masks" / f"case{i}.png"), mask)
    return root


def _palette_mask(shape, *labels):
    """An RGB (stored BGR) mask with label k as a band of rows in the VOC palette's colour."""
    mask = np.zeros((*shape, 3), np.uint8)
    for k in labels:
        mask[10 * k : 10 * k + 5] = layouts.voc_colour(k)[::-1]
    return mask


def _error(root, **options):
    with pytest.raises(common.UserError) as e:
        store.convert(root, workers=1, **options)
    assert not list(root.glob("*.npy")) and not list(root.glob(".tmp*")), "partial output left"
    return str(e.value)


def test_the_voc_palette():
    assert [layouts.voc_colour(k) for k in range(4)] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]


def test_nnunet_layout_at_another_size_with_two_structures(tmp_path):
    synthetic.write_dataset(tmp_path, 2, 5, 1, seed=3, layout="nnunet", size=(210, 290), vessels=True)
    summary = store.convert(tmp_path, workers=1, group_pattern=r"^(s\d+)_")
    assert "nnU-Net layout, 2 classes (nerve, vessel), 10 training cases, 5 test images" in summary
    assert "groups from the pattern" in summary and "stored at 210x290" in summary
    a = store.load_arrays(tmp_path, store.ARRAYS)
    assert a["train_images"].shape == (10, 210, 290) and set(np.unique(a["train_masks"])) == {0, 1, 2}
    assert sorted(set(a["train_subjects"].tolist())) == ["s1", "s2"] and a["test_ids"][0].startswith("t")
    assert store.structures(tmp_path) == ["nerve", "vessel"]


def test_nnunet_labels_in_release_1_form_and_region_labels(tmp_path):
    assert layouts._names_from({"0": "background", "1": "nerve", "2": "artery"}, "x") == ["nerve", "artery"]
    with pytest.raises(common.UserError, match="region-based labels are not supported"):
        layouts._names_from({"background": 0, "nerve": [1, 2]}, "x")
    with pytest.raises(common.UserError, match="without gaps"):
        layouts._names_from({"background": 0, "nerve": 2}, "x")


def test_mixed_size_rgb_pngs_with_0_255_masks(tmp_path):
    masks = []
    for shape in ((60, 80), (60, 80), (90, 70)):
        mask = np.zeros(shape, np.uint8)
        mask[20:40, 20:40] = 255
        masks.append(mask)
    _pairs(tmp_path, masks)
    summary = store.convert(tmp_path, workers=1)
    assert "folder pairs layout" in summary and "every image is its own group" in summary
    assert "each at its own size (2 sizes, in a 90x80 canvas)" in summary
    a = store.load_arrays(tmp_path, store.ARRAYS)
    assert a["train_sizes"].tolist() == [[60, 80], [60, 80], [90, 70]]
    labels = store.frames(a, "train_masks")
    assert [m.shape for m in labels] == [(60, 80), (60, 80), (90, 70)]  # each at its own size, not resized
    assert all(m[20:40, 20:40].all() and m.sum() == 400 for m in labels)
    assert set(np.unique(a["train_masks"])) == {0, 1} and store.structures(tmp_path) == ["class1"]
    gray = cv2.cvtColor(cv2.imread(str(tmp_path / "images" / "case0.png")), cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(store.frames(a, "train_images")[0], gray)
    assert len(set(a["train_subjects"].tolist())) == 3  # each image its own group


def test_palette_masks_with_names_from_a_flag_or_classes_json(tmp_path):
    _pairs(tmp_path, [_palette_mask((60, 80), 1, 2), _palette_mask((60, 80), 1)])
    store.convert(tmp_path, workers=1, classes="nerve,vessel", output_dir=tmp_path / "arrays")
    masks = store.load_arrays(tmp_path / "arrays", ("train_masks",))["train_masks"]
    assert (masks[0, 10:15] == 1).all() and (masks[0, 20:25] == 2).all() and not (masks[1] == 2).any()
    assert store.structures(tmp_path / "arrays") == ["nerve", "vessel"]
    (tmp_path / "classes.json").write_text(json.dumps({"background": 0, "nerve": 1, "vessel": 2}))
    store.convert(tmp_path, workers=1, force=True)
    assert store.structures(tmp_path) == ["nerve", "vessel"]


def test_label_maps_and_groups_from_a_csv(tmp_path):
    labels = np.zeros((60, 80), np.uint8)
    labels[5:9] = 1
    labels[30:40] = 2
    _pairs(tmp_path, [labels, labels, labels], colour_images=False)
    (tmp_path / "groups.csv").write_text("case,group\ncase0,a\ncase1,a\ncase2,b\n")
    summary = store.convert(tmp_path, workers=1, groups=tmp_path / "groups.csv", output_dir=tmp_path / "ok")
    assert "groups from" in summary
    a = store.load_arrays(tmp_path / "ok", ("train_masks", "train_subjects"))
    assert a["train_subjects"].tolist() == ["a", "a", "b"] and set(np.unique(a["train_masks"])) == {0, 1, 2}
    assert store.structures(tmp_path / "ok") == ["class1", "class2"]
    labels[0, :3] = (100, 128, 200)  # a mask that is no label map: far more labels than structures
    cv2.imwrite(str(tmp_path / "masks" / "case2.png"), labels)
    assert "case2.png has label 200: name the classes" in _error(tmp_path, force=True)
    (tmp_path / "groups.csv").write_text("case0,a\n")
    assert "has no group for 2 case(s)" in _error(tmp_path, force=True, groups=tmp_path / "groups.csv")
    assert "matches no part of" in _error(tmp_path, force=True, group_pattern="^x")


def test_bad_folder_inputs_each_named_in_one_message(tmp_path):
    unknown = _palette_mask((60, 80), 1)
    unknown[50:] = (7, 7, 200)  # a colour in no class
    _pairs(tmp_path, [_palette_mask((60, 80), 1, 3), unknown, _palette_mask((60, 80), 1), _palette_mask((30, 40), 1)])
    cv2.imwrite(str(tmp_path / "images" / "case3.png"), np.zeros((60, 80), np.uint8))  # mask of another size
    (tmp_path / "images" / "case2.png").write_bytes(b"not a png")
    msg = _error(tmp_path, classes="nerve,vessel")
    assert "case0.png has label 3, beyond the 2 classes named (nerve, vessel)" in msg
    assert "case1.png has colours (200, 7, 7) that are in no class of the VOC palette" in msg
    assert "case2.png unreadable image" in msg
    assert "case3.png is 40x30 pixels but its image is 80x60" in msg
    (tmp_path / "images" / "lonely.png").write_bytes(b"")
    assert "lonely.png has no mask" in _error(tmp_path)


def test_the_cli_names_the_layout_it_found(tmp_path):
    _pairs(tmp_path, [_palette_mask((60, 80), 1)])
    result = run_script(ROOT / "data.py", "--input", tmp_path, "--classes", "nerve", "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "folder pairs layout, 1 class (nerve), 1 training cases, 0 test images" in result.stdout


def test_the_usgra_set_reads_as_it_is(shared_usgra, tmp_path):
    summary = store.convert(shared_usgra, output_dir=tmp_path, classes="nerve,vessel", group_pattern=r"^(\d{3})")
    assert "folder pairs layout, 2 classes (nerve, vessel), 204 training cases" in summary
    a = store.load_arrays(tmp_path, ("train_masks", "train_sizes", "train_subjects"))
    assert a["train_masks"].shape == (204, 632, 761) and set(np.unique(a["train_masks"])) == {0, 1, 2}
    assert {tuple(s) for s in a["train_sizes"].tolist()} == {(512, 534), (512, 512), (632, 761)}
    assert (a["train_masks"] == 1).any(axis=(1, 2)).all()  # every image shows a nerve
    assert len(set(a["train_subjects"].tolist())) == 25


def test_spacing_comes_from_one_value_or_the_groups_csv_and_is_checked(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in ("a", "b"):
        cv2.imwrite(str(root / "images" / f"{name}.png"), np.zeros((8, 8), np.uint8))
        cv2.imwrite(str(root / "masks" / f"{name}.png"), np.zeros((8, 8), np.uint8))
    assert {c.spacing for c in layouts.find(root, spacing=(0.1, 0.2)).train} == {(0.1, 0.2)}
    assert {c.spacing for c in layouts.find(root).train} == {None}
    groups = tmp_path / "groups.csv"
    groups.write_text("case,group,spacing\na,s1,0.1\nb,s2,0.1x0.2\n")
    found = {c.id: (c.group, c.spacing) for c in layouts.find(root, groups_csv=groups).train}
    assert found == {"a": ("s1", (0.1, 0.1)), "b": ("s2", (0.1, 0.2))}
    with pytest.raises(common.UserError, match="has a spacing column and --spacing is given too"):
        layouts.find(root, groups_csv=groups, spacing=(0.1, 0.1))
    groups.write_text("case,group,spacing\na,s1,0,1\nb,s2,0.1\n")
    with pytest.raises(common.UserError, match=r"case a: spacing '0' is not mm per pixel"):
        layouts.find(root, groups_csv=groups)
