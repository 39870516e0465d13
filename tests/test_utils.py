import numpy as np

import utils
from conftest import assert_picture
from nerve import figures


def test_the_helpers_users_call_are_here():
    mask = np.zeros((420, 580), np.uint8)
    mask[10:20, 30:40] = 1
    assert np.array_equal(utils.rle_decode(utils.rle_encode(mask)), mask)
    assert utils.mean_dice(mask[None], mask[None]) == 1.0
    assert set(utils.__all__) >= {"inspect_set", "examine_generator", "rle_encode", "rle_decode", "mean_dice"}


def test_inspect_set_and_examine_generator_write_pngs(trained, tiny_input):
    results, _, _ = trained
    shown = utils.inspect_set("val", n=4, results=results, input_dir=tiny_input)
    assert_picture(shown, tints=[figures.TRUE_POSITIVE, figures.FALSE_NEGATIVE])
    assert_picture(utils.examine_generator(n=4, input_dir=tiny_input, size=(32, 48), results=results))
