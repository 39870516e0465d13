import numpy as np
import pytest

from nerve import augment


def _pair(h=96, w=128):
    """An asymmetric image whose mask marks exactly its bright pixels."""
    image = np.zeros((h, w), np.uint8)
    image[20:50, 30:45] = 200
    image[60:70, 90:120] = 200
    return image, (image > 0).astype(np.uint8)


@pytest.mark.parametrize("flips", [(), ("horizontal",), ("vertical",), ("horizontal", "vertical")])
@pytest.mark.parametrize("elastic", [0.0, 6.0])
def test_image_and_mask_stay_aligned_and_binary(flips, elastic):
    image, mask = _pair()
    for seed in range(10):
        out_image, out_mask = augment.augment_pair(image, mask, np.random.default_rng(seed), flips, elastic)
        assert set(np.unique(out_mask)) <= {0, 1}
        # away from the reflected border, interior pixels of the mask are bright in the image and
        # pixels far from it are dark
        body = np.zeros(mask.shape, bool)
        body[2:-2, 2:-2] = True
        inner = body & (augment.cv2.erode(out_mask, np.ones((5, 5))) > 0)
        outer = body & (augment.cv2.dilate(out_mask, np.ones((5, 5))) == 0)
        assert inner.any() and (out_image[inner] > 150).all()
        assert (out_image[outer] < 50).all()


def test_transforms_really_move_the_image():
    image, mask = _pair()
    moved = [augment.augment_pair(image, mask, np.random.default_rng(s))[1] for s in range(5)]
    assert all(not np.array_equal(m, mask) for m in moved)
    assert len({m.tobytes() for m in moved}) == 5


def test_horizontal_flip_only_when_asked():
    image, mask = _pair()
    rng = np.random.default_rng(0)
    no_flip = [augment.random_affine(rng, (96, 128), flips=(), rotation=0, shift=0) for _ in range(20)]
    assert all(np.allclose(m, [[1, 0, 0], [0, 1, 0]]) for m in no_flip)
    flips = [augment.random_affine(rng, (96, 128), flips=("horizontal",), rotation=0, shift=0)[0, 0] for _ in range(20)]
    assert set(np.round(flips)) == {-1.0, 1.0}


def test_same_seed_same_batches_and_epochs_differ():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (20, 32, 48), np.uint8)
    masks = (images > 128).astype(np.uint8)
    a = augment.AugmentedBatches(images, masks, batch_size=8, seed=3)
    b = augment.AugmentedBatches(images, masks, batch_size=8, seed=3)
    assert len(a) == 3 and len(a[2][0]) == 4
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i][0], b[i][0])
        np.testing.assert_array_equal(a[i][1]["mask"], b[i][1]["mask"])
    first = a[0][0]
    a.on_epoch_end()
    assert not np.array_equal(a[0][0], first)


def test_batches_have_model_shapes_and_presence_targets():
    images = np.zeros((4, 32, 48), np.uint8)
    masks = np.zeros((4, 32, 48), np.uint8)
    masks[1, 10:20, 10:20] = 1
    x, y = augment.AugmentedBatches(images, masks, batch_size=4, augment=False, shuffle=False)[0]
    assert x.shape == (4, 32, 48, 1) and x.dtype == np.float32
    assert y["mask"].shape == (4, 32, 48, 1)
    assert y["present"].ravel().tolist() == [0, 1, 0, 0]


def test_resize_keeps_masks_binary():
    image, mask = _pair(420, 580)
    small = augment.resize_masks(mask[None], (96, 128))
    assert small.shape == (1, 96, 128) and set(np.unique(small)) == {0, 1}
    assert augment.resize_images(image[None], (96, 128)).dtype == np.uint8


def test_batches_can_be_cut_to_split_evenly_over_devices():
    images, masks = np.zeros((11, 32, 48), np.uint8), np.zeros((11, 32, 48), np.uint8)
    batches = augment.AugmentedBatches(images, masks, batch_size=4, seed=0, multiple=2, workers=0)
    assert [len(batches[i][0]) for i in range(len(batches))] == [4, 4, 2]


def test_zoom_scales_the_mask_both_ways():
    image, mask = _pair()
    rng = np.random.default_rng(0)
    ratios, zooms = [], []
    for _ in range(20):
        m = augment.random_affine(rng, mask.shape, flips=(), rotation=0, shift=0, scale=0.3)
        zoom = m[0, 0]
        zooms.append(zoom)
        assert 0.7 <= zoom <= 1.3 and np.isclose(m[1, 1], zoom) and np.isclose(m[0, 1], 0)
        moved = augment.cv2.warpAffine(mask, m, mask.shape[::-1], flags=augment.cv2.INTER_NEAREST)
        ratios.append(moved.sum() / mask.sum() / zoom**2)
    np.testing.assert_allclose(ratios, 1, atol=0.15)
    assert min(zooms) < 0.9 and max(zooms) > 1.1


def test_gamma_changes_contrast_not_geometry():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (96, 128), np.uint8)
    mask = (image > 128).astype(np.uint8)
    plain = augment.augment_pair(image, mask, np.random.default_rng(5))
    curved = augment.augment_pair(image, mask, np.random.default_rng(5), gamma=0.5)
    np.testing.assert_array_equal(plain[1], curved[1])  # the same transform: gamma is drawn after it
    assert not np.array_equal(plain[0], curved[0])
    order = np.argsort(plain[0].ravel(), kind="stable")
    assert (np.diff(curved[0].ravel()[order].astype(int)) >= 0).all()  # a monotone curve keeps the order


def test_batches_take_zoom_and_gamma():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (8, 32, 48), np.uint8)
    masks = (images > 128).astype(np.uint8)
    plain = augment.AugmentedBatches(images, masks, batch_size=8, seed=3, workers=0)[0]
    varied = augment.AugmentedBatches(images, masks, batch_size=8, seed=3, workers=0, scale=0.3, gamma=0.5)[0]
    assert not np.array_equal(plain[0], varied[0]) and not np.array_equal(plain[1]["mask"], varied[1]["mask"])
    assert set(np.unique(varied[1]["mask"])) <= {0.0, 1.0}


def _frame_with_a_structure(h=210, w=290, box=(60, 85, 40, 75), bars=30):
    """A speckled frame between black bars (a scanner's letterbox) with one structure in `box` (y0, y1, x0, x1)."""
    image = np.random.default_rng(0).integers(40, 200, (h, w), np.uint8)
    image[:bars], image[h - bars :] = 0, 0
    labels = np.zeros((h, w), np.uint8)
    labels[box[0] : box[1], box[2] : box[3]] = 1
    return image, labels


def test_the_tissue_box_leaves_out_black_bars():
    image, _ = _frame_with_a_structure(bars=30)
    assert augment.tissue_box(image) == (30, 180, 0, 290)
    assert augment.tissue_box(np.zeros((20, 30), np.uint8)) == (0, 20, 0, 30)  # all black: the whole frame


def test_crops_leave_the_structure_out_or_keep_it_whole_inside_the_tissue():
    image, labels = _frame_with_a_structure()
    box = augment.tissue_box(image)
    rng = np.random.default_rng(1)
    kinds = []
    for _ in range(300):
        crop, keep = augment.crop_box(rng, labels, box)
        if crop is None:
            continue
        y0, x0, h, w = crop
        assert box[0] <= y0 and y0 + h <= box[1] and box[2] <= x0 and x0 + w <= box[3]  # no bar, no padding
        np.testing.assert_allclose(h / w, 210 / 290, atol=0.02)  # the frame's aspect: resizing stretches nothing
        inside = labels[y0 : y0 + h, x0 : x0 + w].sum()
        assert inside == (labels.sum() if keep else 0)
        kinds.append(keep)
    assert 0.35 < np.mean(kinds) < 0.65 and len(kinds) > 100


def test_whether_a_crop_shows_the_structure_cannot_be_told_from_its_scale():
    # a structure near one side: crops without it fit at small scales only, so a rule that drew each kind where it
    # fits would make small crops mostly empty; drawing both or neither keeps the kind a fair coin at every scale
    image, labels = _frame_with_a_structure(box=(90, 130, 20, 70), bars=0)
    rng = np.random.default_rng(2)
    scales, kinds = [], []
    for _ in range(3000):
        crop, keep = augment.crop_box(rng, labels, augment.tissue_box(image))
        if crop is not None:
            scales.append(crop[2] / labels.shape[0])
            kinds.append(keep)
    from nerve.metrics import roc_auc

    assert abs(roc_auc(scales, kinds) - 0.5) < 0.05
    assert min(scales) < 0.5 and max(scales) > 0.6


def test_a_frame_without_the_structure_or_without_room_gets_no_crop():
    image, labels = _frame_with_a_structure()
    rng = np.random.default_rng(0)
    assert augment.crop_box(rng, np.zeros_like(labels), augment.tissue_box(image)) == (None, None)
    everywhere = np.ones_like(labels)  # no crop can leave it out
    assert augment.crop_box(rng, everywhere, (0, 210, 0, 290)) == (None, None)


def test_a_crop_view_goes_through_the_resizing_of_a_whole_frame():
    image, labels = _frame_with_a_structure()
    view, mask = augment.crop_view(image, labels, (0, 0, 210, 290), (32, 48))
    np.testing.assert_array_equal(view, augment.resize_images(image[None], (32, 48))[0])
    np.testing.assert_array_equal(mask, augment.resize_masks(labels[None], (32, 48))[0])


def test_batches_with_crop_views_teach_absence_and_leave_the_other_samples_as_they_were():
    image, labels = _frame_with_a_structure()
    full_images, full_labels = np.stack([image] * 16), np.stack([labels] * 16)
    images, masks = augment.resize_images(full_images, (32, 48)), augment.resize_masks(full_labels, (32, 48))
    originals = (full_images, full_labels, np.arange(16))
    plain = augment.AugmentedBatches(images, masks, 16, seed=3, workers=0)[0]
    cropped = augment.AugmentedBatches(images, masks, 16, seed=3, workers=0, crops=0.5, originals=originals)[0]
    changed = (plain[0] != cropped[0]).any(axis=(1, 2, 3))
    assert 0 < changed.sum() < 16
    np.testing.assert_array_equal(plain[0][~changed], cropped[0][~changed])  # the same augmentation draws
    assert plain[1]["present"].all() and not cropped[1]["present"].all()  # absent views among the crops
    every = augment.AugmentedBatches(images, masks, 16, seed=3, workers=0, crops=1.0, originals=originals)[0]
    assert 0.2 < every[1]["present"].mean() < 0.8
