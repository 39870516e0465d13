import signal

import pytest

from monitor import StopOnCtrlC


@pytest.mark.parametrize("where", ["on_train_batch_end", "on_test_batch_end"])
def test_ctrl_c_stops_at_the_end_of_a_training_or_validation_batch(where):
    stop = StopOnCtrlC()
    before = signal.getsignal(signal.SIGINT)
    stop.on_train_begin()
    try:
        getattr(stop, where)(0)  # no press yet: training goes on
        signal.raise_signal(signal.SIGINT)  # handled by a flag: nothing is raised here
        assert signal.getsignal(signal.SIGINT) is before, "a second press acts at once"
        with pytest.raises(KeyboardInterrupt):
            getattr(stop, where)(1)
    finally:
        stop.on_train_end()
    assert signal.getsignal(signal.SIGINT) is before
