import dataclasses
import json
from pathlib import Path

import pytest

from nerve import common, config
from nerve.config import RunConfig


def test_a_record_round_trips_through_json_with_its_kinds_restored():
    settings = RunConfig(size=(64, 80), flips=("horizontal", "vertical"), arrays=Path("a"), structures=("nerve",))
    stored = json.loads(json.dumps(settings.record()))
    assert stored["size"] == [64, 80] and stored["arrays"] == "a"
    assert config.from_record({**stored, "mean": 90.0}, "run.json", "retrain") == settings  # other keys ignored
    assert config.from_record({"lr": 1}, "run.json", "retrain").lr == 1.0  # a whole number is a real one


def test_values_of_the_wrong_kind_are_named_in_one_line():
    bad = {"epochs": "ten", "size": [64], "schedule": "linear", "baseline": 1}
    with pytest.raises(common.UserError) as e:
        config.from_record(bad, "results/run.json", "start over with --force")
    assert str(e.value) == (
        "results/run.json holds values of the wrong kind for baseline, epochs, schedule, size: start over with --force"
    )


def test_settings_are_checked_when_made_and_never_changed():
    with pytest.raises(common.UserError, match=r"^--size 95x130: both sides must be divisible by 2\*\*depth = 16"):
        RunConfig(size=(95, 130))
    settings = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.epochs = 3
    with pytest.raises(common.UserError, match="--crops must be in"):
        settings.replace(crops=2.0)  # a changed copy is checked too
    assert config.choices("schedule") == ("cosine", "plateau")


def test_a_record_of_the_release_before_keeps_its_arrays_folder():
    stored = common.upgrade_settings({"input": "input/scans", "epochs": 7})
    assert config.from_record(stored, "run.json", "retrain").arrays == Path("input/scans")
