import csv
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import model
import train
import utils
from conftest import ROOT, run_script


@pytest.mark.parametrize("flag", [["--size", "95x130"], ["--epochs", "0"], ["--val-fraction", "1.5"],
                                  ["--lr", "-1"], ["--size", "big"], ["--flips", "diagonal"],
                                  ["--bce-weight", "-0.5"], ["--mask-loss", "lovasz", "--bce-weight", "1"]])
def test_bad_flags_are_one_clear_error(flag):
    with pytest.raises(utils.UserError):
        train.parse_args(flag)


def test_help_gives_every_valued_flags_default():
    valued = [a for a in train.arg_parser()._actions if a.option_strings and a.nargs != 0]
    assert len(valued) > 20
    assert [a.dest for a in valued if "(default: " not in a.help] == []


def test_subject_split_is_grouped_stratified_and_seeded():
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(1, 21), 50)
    present = rng.random(len(subjects)) < 0.4
    val = train.split_by_subject(subjects, present, 0.1, seed=7)
    assert set(subjects[val]).isdisjoint(subjects[~val])          # no subject on both sides
    assert val.sum() == 100                                       # 2 of 20 equal subjects
    assert abs(present[val].mean() - present.mean()) < 0.05
    np.testing.assert_array_equal(val, train.split_by_subject(subjects, present, 0.1, seed=7))
    assert not np.array_equal(val, train.split_by_subject(subjects, present, 0.1, seed=8))


def test_single_subject_needs_the_image_split():
    with pytest.raises(utils.UserError, match="--split image"):
        train.split_by_subject(np.ones(10), np.zeros(10, bool), 0.1, 0)


def test_image_split_is_stratified():
    present = np.arange(100) < 40
    val = train.split_by_image(present, 0.1, seed=0)
    assert val.sum() == 10 and present[val].sum() == 4


def test_cosine_schedule_decays_to_zero_over_the_run_and_plateau_starts_constant():
    cosine = train.learning_rate(train.parse_args(["--lr", "0.002", "--epochs", "4"]), steps_per_epoch=10)
    rates = [float(cosine(step)) for step in (0, 20, 39, 40)]
    np.testing.assert_allclose(rates[:2], [0.002, 0.001], rtol=1e-5)
    assert 0 < rates[2] < 1e-5 and rates[3] == 0
    assert train.learning_rate(train.parse_args(["--schedule", "plateau"]), steps_per_epoch=10) == 1e-3


def test_mask_loss_flags_pick_the_loss_and_the_baseline_keeps_batch_dice():
    def mask_loss(*flags):
        net = train.compile_model(train.parse_args([*map(str, TINY), *flags]), mean=0.0, std=1.0, steps_per_epoch=1)
        return net.loss["mask"]

    assert mask_loss() is model.batch_dice_loss
    assert mask_loss("--mask-loss", "image") is model.dice_loss
    combined = mask_loss("--mask-loss", "image", "--bce-weight", "0.3")
    assert isinstance(combined, model.DiceBCELoss) and (combined.per_image, combined.bce_weight) == (True, 0.3)
    assert mask_loss("--baseline", "--bce-weight", "0.3") is model.batch_dice_loss
    assert mask_loss("--mask-loss", "lovasz") is model.lovasz_hinge_loss


def test_a_run_stored_before_the_schedule_flag_resumes_on_its_plateau_schedule(tmp_path):
    stored = train.as_json(train.parse_args(["--results", str(tmp_path)]))
    del stored["schedule"]
    utils.write_json(tmp_path / train.RUN_FILE, {"args": stored, "complete": False})
    resumed = train.resumed_args(train.parse_args(["--results", str(tmp_path), "--resume"]))
    assert resumed.schedule == "plateau" and resumed.presence_weight == stored["presence_weight"]


# depth 2: half the graph to trace, which is most of a tiny run's time
TINY = ["--size", "32x48", "--base-filters", 4, "--depth", 2, "--batch-size", 8, "--val-fraction", 0.3]


def start_training(tiny_input, results, logs, epochs, run):
    """A training subprocess, returned once its first epoch is saved for --resume."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--input", str(tiny_input), "--results",
                             str(results), "--logs", str(logs), "--epochs", str(epochs), "--run", run,
                             *map(str, TINY)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (results / train.STATE_FILE).exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    return proc


def training_log(results):
    rows = list(csv.reader(open(results / "training_log.csv")))
    return rows[0], np.array(rows[1:], float)


def poison(path):
    """Overwrite a resume checkpoint's first kernel with NaN, as a diverged optimizer step would."""
    net = train.compile_model(train.parse_args(list(map(str, TINY))), mean=0.0, std=1.0, steps_per_epoch=1)
    net.optimizer.build(net.trainable_variables)
    net.load_weights(path)
    kernel = net.trainable_weights[0]
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    net.save(path)


def test_killed_run_resumes_exactly_where_it_stopped(tiny_input, tmp_path):
    logs = tmp_path / "logs"
    straight = run_script(ROOT / "train.py", "--input", tiny_input, "--results", tmp_path / "straight", "--logs",
                          logs, "--epochs", 2, "--run", "straight", *TINY)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = start_training(tiny_input, killed, logs, epochs=2, run="killed")
    proc.kill()
    proc.communicate()
    assert json.loads((killed / train.STATE_FILE).read_text())["epoch"] == 1
    best_after_one = (killed / "net.keras").read_bytes()
    shutil.copytree(killed, tmp_path / "diverging")

    fresh = run_script(ROOT / "train.py", "--input", tiny_input, "--results", killed)
    assert fresh.returncode == 1 and "--resume" in fresh.stderr and "Traceback" not in fresh.stderr
    changed = run_script(ROOT / "train.py", "--results", killed, "--resume", "--lr", 0.1)
    assert changed.returncode == 1 and "drop --lr" in changed.stderr

    resumed = run_script(ROOT / "train.py", "--results", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 1" in resumed.stdout
    # same seed, same split, same batches, same dropout stream, same optimizer state: the same numbers
    header, rows = training_log(killed)
    assert header == training_log(tmp_path / "straight")[0] and rows[:, 0].tolist() == [0, 1]
    np.testing.assert_allclose(rows, training_log(tmp_path / "straight")[1], rtol=1e-5)
    assert sorted(p.name for p in logs.iterdir()) == ["killed", "straight"], "the TensorBoard run carries on"
    assert not (killed / train.LAST_FILE).exists() and json.loads((killed / train.RUN_FILE).read_text())["complete"]
    again = run_script(ROOT / "train.py", "--results", killed, "--resume")
    assert again.returncode == 1 and "nothing to resume" in again.stderr

    # a non-finite loss stops at once, names where, and leaves the last good checkpoints alone
    diverging = tmp_path / "diverging"
    poison(diverging / train.LAST_FILE)
    nan = run_script(ROOT / "train.py", "--results", diverging, "--resume")
    assert nan.returncode == 1 and "Traceback" not in nan.stderr
    assert "loss became nan at epoch 2, batch 1" in nan.stderr and "--resume" in nan.stderr
    assert (diverging / "net.keras").read_bytes() == best_after_one
    assert json.loads((diverging / train.STATE_FILE).read_text())["epoch"] == 1


def test_ctrl_c_stops_cleanly_with_the_completed_epochs_saved(tiny_input, tmp_path):
    results = tmp_path / "results"
    proc = start_training(tiny_input, results, tmp_path / "logs", epochs=20, run="interrupted")
    # a SIGINT that lands inside TensorFlow's runtime can be lost: press again, as a user would
    for _ in range(5):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in stderr
    assert "interrupted" in stderr and "--resume" in stderr
    assert (results / "net.keras").exists() and (results / train.LAST_FILE).exists()
    assert not list(results.glob(".tmp-*")), "no half-written file is left behind"


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import keras

    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / train.LAST_FILE
    train.save_model(net, path)
    before = path.read_bytes()

    def fill_the_disk(target, *args, **kwargs):
        Path(target).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(net, "save", fill_the_disk)
    with pytest.raises(utils.UserError, match="No space left on device.*earlier last.keras is unchanged"):
        train.save_model(net, path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


TWO_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import train, utils
utils.run_cli(lambda: train.main(sys.argv[1:]))
"""
SMALL_RUN = ["--size", "32x48", "--base-filters", 4, "--depth", 2, "--dropout", 0, "--epochs", 1]


# per-image Dice: under a tf.distribute strategy batch Dice scores each replica's share of the batch
TF_PARALLEL_RUN = [*map(str, SMALL_RUN), "--batch-size", "16", "--val-fraction", "0.3", "--mask-loss", "image"]


@pytest.fixture(scope="module")
def one_device_log(tiny_input, tmp_path_factory):
    """Training log rows of TF_PARALLEL_RUN on one device."""
    out = tmp_path_factory.mktemp("one-device")
    one = run_script(ROOT / "train.py", *TF_PARALLEL_RUN, "--input", tiny_input, "--results", out / "results",
                     "--logs", out / "logs")
    assert one.returncode == 0, one.stderr[-3000:]
    return training_log(out / "results")


def test_mirrored_strategy_on_two_cpus_matches_one_device(tiny_input, tmp_path, one_device_log):
    two = subprocess.run([sys.executable, "-c", TWO_CPUS, *TF_PARALLEL_RUN, "--input", str(tiny_input),
                          "--distribute", "mirrored", "--results", str(tmp_path / "two"), "--logs", str(tmp_path / "logs")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data parallel over 2 devices: global batch 16, 8 per device" in two.stdout
    # synchronized batch norm and the global batch: the same steps as one device, up to float rounding
    np.testing.assert_allclose(training_log(tmp_path / "two")[1], one_device_log[1], rtol=1e-5)
    assert (tmp_path / "two" / "net.keras").exists()


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_on_localhost_match_one_device_and_only_the_chief_writes(tiny_input, tmp_path, one_device_log):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers, outputs = [], [tmp_path / f"worker{index}.out" for index in range(2)]
    for index, output in enumerate(outputs):
        (tmp_path / f"tmp{index}").mkdir()
        env = {**os.environ, "TMPDIR": str(tmp_path / f"tmp{index}"),
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        with open(output, "w") as out:
            workers.append(subprocess.Popen(
                [sys.executable, "train.py", *TF_PARALLEL_RUN, "--input", str(tiny_input), "--distribute",
                 "multiworker", "--results", str(tmp_path / "results"), "--logs", str(tmp_path / "logs")],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    # a worker that fails leaves the other waiting for it: stop both at the first failure
    deadline = time.time() + 600
    while any(w.poll() is None for w in workers) and time.time() < deadline:
        if any(w.poll() for w in workers):
            break
        time.sleep(0.5)
    for worker in workers:
        worker.kill()
        worker.wait()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output.read_text()[-3000:]
        assert "data parallel over 2 devices: global batch 16, 8 per device" in output.read_text()
    np.testing.assert_allclose(training_log(tmp_path / "results")[1], one_device_log[1], rtol=1e-5)
    # one set of results, from the chief; the other worker's scratch copy is gone
    assert json.loads((tmp_path / "results" / train.RUN_FILE).read_text())["complete"]
    assert (tmp_path / "results" / "net.keras").exists() and (tmp_path / "results" / "oof.npz").exists()
    assert list((tmp_path / "tmp1").iterdir()) == []
    assert len(list((tmp_path / "logs").iterdir())) == 1


def test_multiworker_without_tf_config_says_what_to_set(tiny_input, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(utils.UserError, match="needs TF_CONFIG"):
        train.main(["--distribute", "multiworker", "--input", str(tiny_input)])


def test_a_failing_worker_names_the_chiefs_results_not_its_scratch_folder(tmp_path):
    args = train.parse_args(["--results", str(tmp_path / "results")])
    with pytest.raises(utils.UserError) as failure:
        with train.worker_outputs(args, chief=False):
            scratch = args.results
            raise utils.UserError(f"interrupted: continue with `python train.py --results {args.results} --resume`")
    assert str(tmp_path / "results") in str(failure.value) and str(scratch) not in str(failure.value)
    assert not scratch.parent.exists()


def test_jax_data_parallel_on_two_cpus_matches_one_device(tiny_input, tmp_path):
    flags = [*SMALL_RUN, "--input", tiny_input, "--batch-size", 8, "--val-fraction", 0.3]
    env = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    runs = {}
    for mode in ("none", "mirrored"):
        runs[mode] = run_script(ROOT / "train.py", *flags, "--distribute", mode, "--results", tmp_path / mode,
                                "--logs", tmp_path / "logs", env=env)
        assert runs[mode].returncode == 0, runs[mode].stderr[-3000:]
    assert "data parallel over 2 devices: global batch 8, 4 per device" in runs["mirrored"].stdout
    # jax computes batch-norm statistics over the sharded global batch: the same steps as one device
    np.testing.assert_allclose(training_log(tmp_path / "mirrored")[1], training_log(tmp_path / "none")[1], rtol=1e-5)
    assert (tmp_path / "mirrored" / "net.keras").exists() and (tmp_path / "mirrored" / "oof.npz").exists()
