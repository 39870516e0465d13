import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train
from conftest import ROOT, TINY, run_main, run_script, tiny_flags, training_log
from nerve import common, model, planning


@pytest.mark.parametrize(
    "flag, message",
    [
        (["--size", "95x130"], r"--size 95x130: both sides must be divisible by 2\*\*depth = 16"),  # README's example
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--size", "big"], "size 'big' is not HxW, e.g. 96x128"),
        (["--flips", "diagonal"], "--flips takes horizontal, vertical or none"),
        (["--bce-weight", "-0.5"], "loss weights must not be negative"),
        (["--mask-loss", "lovasz", "--bce-weight", "1"], "--bce-weight adds to a Dice loss"),
        (["--scale", "1"], r"--scale must be in \[0, 1\)"),
        (["--gamma", "-0.2"], r"--scale must be in \[0, 1\) and --gamma not negative"),
        (["--crops", "1.5"], r"--crops must be in \[0, 1\]"),
    ],
)
def test_bad_flags_are_one_clear_error(flag, message):
    with pytest.raises(common.UserError, match=f"^{message}"):
        train.parse_args(flag)


def test_help_gives_every_flags_default_without_spelling_it():
    text = train.flag_parser().format_help()
    for flag, default in (
        ("--batch-size", "4"),
        ("--tta", "hflip"),
        ("--mask-loss", "image"),
        ("--results", "results"),
        ("--precision", "auto"),
        ("--crops", "0.3"),
    ):
        entry = text.split(f"\n  {flag} ", 1)[1].split("\n  --", 1)[0]
        assert f"(default: {default})" in " ".join(entry.split()), flag
    assert "unset: planned from the dataset" in " ".join(text.split())
    epochs = text.split("\n  --epochs ", 1)[1].split("\n  --", 1)[0]
    assert f"unset: planned (nerve/planning.py), {planning.EPOCHS}" in " ".join(epochs.split())


def test_cosine_schedule_decays_to_zero_over_the_run_and_plateau_starts_constant():
    cosine = train.learning_rate(train.parse_args(["--lr", "0.002", "--epochs", "4"])[0], steps_per_epoch=10)
    rates = [float(cosine(step)) for step in (0, 20, 39, 40)]
    np.testing.assert_allclose(rates[:2], [0.002, 0.001], rtol=1e-5)
    assert 0 < rates[2] < 1e-5 and rates[3] == 0
    assert train.learning_rate(train.parse_args(["--schedule", "plateau"])[0], steps_per_epoch=10) == 1e-3


def test_mask_loss_flags_pick_the_loss():
    def mask_loss(*flags):
        net = train.compile_model(train.parse_args(tiny_flags(*flags))[0], mean=0.0, std=1.0, steps_per_epoch=1)
        return net.loss["mask"]

    default = mask_loss()
    assert isinstance(default, model.DiceBCELoss) and (default.per_image, default.bce_weight) == (True, 1.0)
    assert mask_loss("--mask-loss", "batch", "--bce-weight", "0") is model.batch_dice_loss
    assert mask_loss("--mask-loss", "image", "--bce-weight", "0") is model.dice_loss
    combined = mask_loss("--mask-loss", "batch", "--bce-weight", "0.3")
    assert isinstance(combined, model.DiceBCELoss) and (combined.per_image, combined.bce_weight) == (False, 0.3)
    assert mask_loss("--mask-loss", "lovasz") is model.lovasz_hinge_loss  # without the Dice losses' BCE


def test_baseline_is_a_preset_of_flags_so_the_stored_settings_are_the_ones_used():
    config = train.parse_args(["--baseline", "--mask-loss", "image"])[0]
    assert (config.mask_loss, config.presence_weight, config.bce_weight, config.tta, config.postprocess) == (
        "image",
        0.0,
        0.0,
        "none",
        "fixed",
    )
    net = train.compile_model(train.parse_args(tiny_flags("--baseline"))[0], 0.0, 1.0, steps_per_epoch=1)
    assert net.loss["mask"] is model.batch_dice_loss and net.get_compile_config()["loss_weights"]["present"] == 0.0


def start_training(tiny_input, results, logs, epochs, run):
    """A training subprocess, returned once its first epoch is saved for --resume."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--input",
            str(tiny_input),
            "--results",
            str(results),
            "--logs",
            str(logs),
            "--epochs",
            str(epochs),
            "--run",
            run,
            *map(str, TINY),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (results / common.STATE_FILE).exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    return proc


def poison(path):
    """Overwrite a resume checkpoint's first kernel with NaN, as a diverged optimizer step would."""
    net = train.compile_model(train.parse_args(tiny_flags())[0], mean=0.0, std=1.0, steps_per_epoch=1)
    net.optimizer.build(net.trainable_variables)
    net.load_weights(path)
    kernel = net.trainable_weights[0]
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    net.save(path)


@pytest.mark.slow
def test_killed_run_resumes_exactly_where_it_stopped(trained, tiny_input, tmp_path):
    straight = trained[0]  # the same flags, trained straight through
    logs = tmp_path / "logs"
    killed = tmp_path / "killed"
    proc = start_training(tiny_input, killed, logs, epochs=2, run="killed")
    proc.kill()
    proc.communicate()
    assert json.loads((killed / common.STATE_FILE).read_text())["epoch"] == 1
    best_after_one = (killed / "net.keras").read_bytes()
    shutil.copytree(killed, tmp_path / "diverging")

    fresh = run_main("train", "--input", tiny_input, "--results", killed)
    assert fresh.returncode == 1 and "--resume" in fresh.stderr and "Traceback" not in fresh.stderr
    changed = run_main("train", "--results", killed, "--resume", "--lr", 0.1)
    assert changed.returncode == 1 and "drop --lr" in changed.stderr

    resumed = run_script(ROOT / "train.py", "--results", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 1" in resumed.stdout
    # same seed, same split, same batches, same dropout stream, same optimizer state: the same numbers
    header, rows = training_log(killed)
    assert header == training_log(straight)[0] and rows[:, 0].tolist() == [0, 1]
    np.testing.assert_allclose(rows, training_log(straight)[1], rtol=1e-5)
    assert [p.name for p in logs.iterdir()] == ["killed"], "the TensorBoard run carries on"
    assert not (killed / common.LAST_FILE).exists() and json.loads((killed / common.RUN_FILE).read_text())["complete"]
    again = run_main("train", "--results", killed, "--resume")
    assert again.returncode == 1 and "nothing to resume" in again.stderr

    # a non-finite loss stops at once, names where, and leaves the last good checkpoints alone
    diverging = tmp_path / "diverging"
    poison(diverging / common.LAST_FILE)
    nan = run_main("train", "--results", diverging, "--resume")
    assert nan.returncode == 1 and "Traceback" not in nan.stderr
    assert "loss became nan at epoch 2, batch 1" in nan.stderr and "--resume" in nan.stderr
    assert (diverging / "net.keras").read_bytes() == best_after_one
    assert json.loads((diverging / common.STATE_FILE).read_text())["epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_a_kill_stops_cleanly_with_the_completed_epochs_saved(tiny_input, tmp_path, signum):
    results = tmp_path / "results"
    # more epochs than the wait below: a run that ends by itself would prove nothing
    proc = start_training(tiny_input, results, tmp_path / "logs", epochs=500, run="interrupted")
    proc.send_signal(signum)  # one is enough (monitor.StopOnInterrupt)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()  # a run that ignored the press must not outlive the test
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted" in stderr and "--resume" in stderr
    assert (results / "net.keras").exists() and (results / common.LAST_FILE).exists()
    assert not list(results.glob(".tmp-*")), "no half-written file is left behind"


@pytest.mark.slow
def test_two_structures_train_score_and_draw_each_on_its_own(tmp_path):
    """The nnU-Net layout with vessels labelled, at another size: per-structure scores in the log, the table,
    evaluation.json and postprocess.json; overlays drawn; the Kaggle CSV of either structure."""
    source, arrays, results = tmp_path / "raw", tmp_path / "arrays", tmp_path / "results"
    synthetic = ["--synthetic", "--layout", "nnunet", "--vessels", "--size", "210x290", "--test-subjects", 1]
    made = run_main("data", *synthetic, "--subjects", 3, "--frames", 8, "--input", source)
    assert made.returncode == 0, made.stderr
    converted = run_main("data", "--input", source, "--output", arrays, "--group-pattern", r"^(s\d+)_")
    assert converted.returncode == 0 and "2 classes (nerve, vessel)" in converted.stdout, converted.stderr
    flags = ["--input", arrays, "--results", results, "--logs", tmp_path / "logs", "--epochs", 1, "--folds", 2]
    trained = run_script(ROOT / "train.py", *flags, *TINY)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "vessel all folds" in trained.stdout
    header, _ = training_log(results / "fold0")
    assert {"val_leaderboard_nerve", "val_leaderboard_vessel"} <= set(header)
    assert set(json.loads((results / "postprocess.json").read_text())["structures"]) == {"nerve", "vessel"}
    settings = json.loads((results / "fold0" / "settings.json").read_text())
    assert settings["structures"] == ["nerve", "vessel"]

    ev = run_main("evaluate", "--data", arrays, "--results", results)
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((results / "evaluation.json").read_text())
    assert set(report["metrics"]) == {"nerve", "vessel"} and report["structures"] == ["nerve", "vessel"]
    for converted_there in source.glob("*.npy"):  # --synthetic converted it: evaluate the raw folder instead
        converted_there.unlink()
    labelled = run_main("evaluate", "--input", source, "--results", results, "--tta", "none")
    assert labelled.returncode == 0 and "nnU-Net layout" in labelled.stdout, labelled.stderr[-3000:]
    sub = run_main("submission", "--input", arrays, "--results", results, "--structure", "vessel")
    assert sub.returncode == 0 and "with a vessel" in sub.stdout, sub.stderr[-3000:]
    rows = (results / "submission.csv").read_text().splitlines()
    assert rows[0] == "img,pixels" and len(rows) == 9
