import numpy as np

from nerve import planning


def _masks(shape, side, n=20):
    """n label maps of `shape` with a square nerve (label 1) of `side` pixels."""
    masks = np.zeros((n, *shape), np.uint8)
    masks[:, 10 : 10 + side, 10 : 10 + side] = 1
    return masks


def test_kaggle_frames_keep_the_default_size():
    size, why = planning.training_size(_masks((420, 580), 80), (420, 580), ["nerve"], 4)
    assert size == (96, 128) and "nerve 18 pixels across" in why


def test_small_structures_raise_the_resolution_within_the_cap():
    size, why = planning.training_size(_masks((512, 512), 40), (512, 512), ["nerve"], 4)
    assert size[0] == size[1] and size[0] > 112 and size[0] * size[1] <= planning.MAX_PIXELS
    assert 40 * size[0] / 512 >= planning.MIN_ACROSS
    tiny, why = planning.training_size(_masks((512, 512), 4), (512, 512), ["nerve"], 4)
    assert tiny[0] * tiny[1] <= planning.MAX_PIXELS and "even at the largest planned size" in why


def test_the_aspect_ratio_and_the_depths_multiple_are_kept():
    size, _ = planning.training_size(np.zeros((2, 300, 900), np.uint8), (300, 900), ["nerve"], 3)
    assert size[0] % 8 == 0 and size[1] % 8 == 0 and abs(size[1] / size[0] - 3) < 0.4


def test_a_large_set_trains_the_default_epochs():
    epochs, why = planning.epochs(5000)
    assert epochs == planning.EPOCHS and why == f"{planning.EPOCHS} passes over 5000 images"


def test_a_small_set_trains_more_passes_to_show_the_minimum_images():
    epochs, why = planning.epochs(np.int64(163))  # as NumPy counts the training images
    assert type(epochs) is int and epochs * 163 >= planning.MIN_IMAGES > (epochs - 1) * 163
    assert f"{planning.EPOCHS} would show the network {planning.EPOCHS * 163:,} images" in why
