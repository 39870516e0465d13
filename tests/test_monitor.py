import signal

import pytest

from nerve.monitor import StopOnInterrupt


@pytest.mark.parametrize("where", ["on_train_batch_end", "on_test_batch_end"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_a_kill_stops_at_the_end_of_a_training_or_validation_batch(where, signum):
    stop = StopOnInterrupt()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop.on_train_begin()
    try:
        getattr(stop, where)(0)  # no signal yet: training goes on
        signal.raise_signal(signum)  # handled by a flag: nothing is raised here
        assert signal.getsignal(signum) is before[signum], "a second one acts at once"
        with pytest.raises(KeyboardInterrupt):
            getattr(stop, where)(1)
    finally:
        stop.on_train_end()
    assert {s: signal.getsignal(s) for s in before} == before
