import dataclasses
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

import train
from conftest import tiny_flags
from nerve import checkpoint, common


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import keras

    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / common.LAST_FILE
    checkpoint.save_model(net, path, optimizer=True)
    before = path.read_bytes()

    def fill_the_disk(target, *args, **kwargs):
        Path(target).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(net, "save", fill_the_disk)
    with pytest.raises(common.UserError, match="No space left on device.*earlier last.keras is unchanged"):
        checkpoint.save_model(net, path, optimizer=True)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def _unfinished_run(results, *flags):
    config = train.parse_args(["--results", str(results), *flags])[0]
    checkpoint.write_run(results, config.record(), complete=False)
    return config


def test_resume_refuses_a_changed_flag_even_one_given_with_its_default_value(tmp_path):
    _unfinished_run(tmp_path, "--epochs", "10")
    with pytest.raises(common.UserError, match=r"^--resume continues with the stored settings; drop --epochs \(or"):
        train.parse_args(["--results", str(tmp_path), "--resume", "--epochs", "30"])  # 30 is the default
    assert train.parse_args(["--results", str(tmp_path), "--resume", "--epochs", "10"])[0].epochs == 10
    moved, resume, _ = train.parse_args(["--results", str(tmp_path), "--resume", "--input", "x", "--workers", "2"])
    assert moved.arrays == Path("x") and moved.epochs == 10 and resume
    with pytest.raises(dataclasses.FrozenInstanceError):
        moved.epochs = 11  # the settings are never changed in flight


def test_a_run_stored_before_the_schedule_flag_resumes_on_its_plateau_schedule(tmp_path):
    stored = train.parse_args(["--results", str(tmp_path), "--mask-loss", "batch"])[0].record()
    del stored["schedule"], stored["tta"], stored["postprocess"], stored["bce_weight"]
    common.write_json(tmp_path / common.RUN_FILE, {"args": stored, "complete": False})  # the older format
    resumed = train.parse_args(["--results", str(tmp_path), "--resume"])[0]
    assert resumed.schedule == "plateau" and resumed.presence_weight == stored["presence_weight"]
    assert (resumed.tta, resumed.postprocess) == ("hflip", "tuned")
    assert (resumed.mask_loss, resumed.bce_weight) == ("batch", 0.0)  # trained without the cross-entropy


def test_nothing_to_resume_and_an_unfinished_run_are_one_clear_message_each(tmp_path):
    with pytest.raises(common.UserError, match="nothing to resume"):
        train.parse_args(["--results", str(tmp_path), "--resume"])
    _unfinished_run(tmp_path)
    with pytest.raises(common.UserError, match="unfinished run: continue it with `python train.py --resume`"):
        checkpoint.check_unfinished(tmp_path, force=False)
    checkpoint.check_unfinished(tmp_path, force=True)
    assert json.loads((tmp_path / common.RUN_FILE).read_text())["complete"] is False


def test_the_saved_model_loads_in_plain_keras_without_the_projects_code(tmp_path):
    import numpy as np

    net = train.compile_model(train.parse_args(tiny_flags())[0], mean=90.0, std=40.0, steps_per_epoch=1)
    checkpoint.save_model(net, tmp_path / common.MODEL_FILE)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 48, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "mask.npy", net.predict(x, verbose=0)["mask"])
    fresh = (
        "import importlib.util, keras, numpy as np\n"
        "assert importlib.util.find_spec('model') is None, 'the project is importable here'\n"
        f"net = keras.saving.load_model({common.MODEL_FILE!r})\n"
        "out = net.predict(np.load('x.npy'), verbose=0)\n"
        "print(float(np.abs(out['mask'] - np.load('mask.npy')).max()))\n"
    )
    result = subprocess.run([sys.executable, "-c", fresh], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) < 1e-6
