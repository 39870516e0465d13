import json

import cv2
import numpy as np
import tifffile

from nerve import synthetic


def _frames(seed, subject=1, n=6):
    return [frame[:3] for frame in synthetic._subject_frames(seed, subject, n)]


def test_deterministic_for_a_seed():
    for (_, a, am), (_, b, bm) in zip(_frames(0), _frames(0)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(am, bm)
    assert not np.array_equal(_frames(0)[0][1], _frames(1)[0][1])


def test_frames_look_like_ultrasound_and_masks_outline_the_nerve():
    frames = _frames(3, 2, 40)
    with_nerve = [(im, m) for _, im, m in frames if m.any()]
    assert 0.2 < len(with_nerve) / len(frames) < 0.6
    for image, mask in with_nerve:
        assert image.shape == mask.shape == (420, 580) and image.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}
        assert 2000 < np.count_nonzero(mask) < 12000  # an oval a few percent of the frame
        inside, outside = image[mask > 0], image[mask == 0]
        assert inside.std() > 20 and outside.std() > 20  # speckle and texture, not flat fills


def test_frames_of_one_subject_drift_but_share_anatomy():
    a, b = (f[1].astype(float) for f in _frames(0, n=2))
    other = _frames(0, subject=2, n=1)[0][1].astype(float)
    same = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert same > np.corrcoef(a.ravel(), other.ravel())[0, 1] + 0.1


def test_write_dataset_makes_the_kaggle_layout(tmp_path):
    n_train, n_test = synthetic.write_dataset(tmp_path, subjects=2, frames=3, test_subjects=1, seed=5)
    assert (n_train, n_test) == (6, 3)
    names = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert names == sorted(
        [f"{s}_{n}.tif" for s in (1, 2) for n in (1, 2, 3)] + [f"{s}_{n}_mask.tif" for s in (1, 2) for n in (1, 2, 3)]
    )
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == ["1.tif", "2.tif", "3.tif"]
    with tifffile.TiffFile(tmp_path / "train" / "1_1.tif") as tif:
        page = tif.pages[0]
        assert page.compression == 5 and page.shape == (420, 580) and page.dtype == np.uint8  # 5: LZW


def test_the_nnunet_layout_at_another_size_labels_nerve_and_vessels(tmp_path):
    synthetic.write_dataset(
        tmp_path, subjects=1, frames=4, test_subjects=1, layout="nnunet", size=(210, 290), vessels=True
    )
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "nerve": 1, "vessel": 2} and meta["file_ending"] == ".png"
    assert sorted(p.name for p in (tmp_path / "imagesTr").iterdir())[0] == "s1_1_0000.png"
    labels = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((tmp_path / "labelsTr").iterdir())]
    assert all(m.shape == (210, 290) and set(np.unique(m)) <= {0, 1, 2} for m in labels)
    assert any((m == 2).any() for m in labels) and any((m == 1).any() for m in labels)
    assert len(list((tmp_path / "imagesTs").iterdir())) == 4
