import signal

import numpy as np
import pytest

import train
from conftest import tiny_flags
from nerve import augment, postprocess
from nerve.monitor import StopOnInterrupt, Validation


def test_one_prediction_gives_the_validation_figures_of_keras_own_pass():
    rng = np.random.default_rng(0)
    # batches of equal size: where the last is short, Keras' traced pass averages each output's loss over the
    # batches unweighted, and Validation over the images
    images = rng.integers(0, 256, (12, 32, 48), dtype=np.uint8)
    masks = np.zeros((12, 32, 48), np.uint8)
    masks[::2, 8:20, 10:30] = 1  # half of them hold the structure
    net = train.compile_model(train.parse_args(tiny_flags())[0], mean=90.0, std=40.0, steps_per_epoch=1)
    batches = augment.AugmentedBatches(images, masks, batch_size=4, augment=False, shuffle=False, workers=0)
    expected = net.evaluate(batches, verbose=0, return_dict=True)
    validation = Validation(batches, postprocess.DEFAULT, ["nerve"])
    validation.set_model(net)
    logs = {}
    validation.on_epoch_end(0, logs)
    assert {f"val_{name}" for name in expected} | {"val_leaderboard"} == set(logs)
    for name, value in expected.items():
        # float32 sums taken in another order (one pass over the images against Keras' per-batch means) differ
        # by about 1e-5 relative on some CPUs
        assert logs[f"val_{name}"] == pytest.approx(value, rel=1e-4), name
    assert 0 <= logs["val_leaderboard"] <= 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_a_kill_stops_at_the_end_of_a_training_batch(signum):
    stop = StopOnInterrupt()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop.on_train_begin()
    try:
        stop.on_train_batch_end(0)  # no signal yet: training goes on
        signal.raise_signal(signum)  # handled by a flag: nothing is raised here
        assert signal.getsignal(signum) is before[signum], "a second one acts at once"
        with pytest.raises(KeyboardInterrupt):
            stop.on_train_batch_end(1)
    finally:
        stop.on_train_end()
    assert {s: signal.getsignal(s) for s in before} == before
