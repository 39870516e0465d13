import os
import time

import pytest

from bench.gpu_check import plan, step
from conftest import run_script


@pytest.mark.slow
def test_the_gpu_check_runs_its_steps_at_toy_sizes_on_a_cpu(shared_usgra, tmp_path):
    # usgra only: the Kaggle images take the same steps (bench.accuracy's other dataset), and a second dataset
    # would double the suite's longest test
    shared = shared_usgra.parent.parent
    check = run_script(
        "-m",
        "bench.gpu_check",
        "--dry-run",
        "--datasets",
        "usgra",
        "--budget",
        900,
        "--shared",
        shared,
        "--out",
        tmp_path,
    )
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert check.stdout.startswith("budget: 900 s in all")
    figures = dict(line.split(": ", 1) for line in (tmp_path / "figures.txt").read_text().splitlines())
    assert {
        "train_images_per_s_32x48_fp32_b2",
        "train_images_per_s_32x48_fp32_b4",
        "matmul_gflops_bf16",
        "usgra_dice_nerve",
        "usgra_dice_vessel",
        "usgra_train_minutes",
        "planned_epochs_usgra",
    } <= set(figures)
    assert figures["epochs_run_usgra"].startswith("1 "), "a dry run trains one epoch"
    assert all(value.endswith("(jax)]") for value in figures.values()), "every figure names its device"
    assert {"throughput.log", "accuracy_usgra.log"} <= {p.name for p in tmp_path.iterdir()}


def test_the_plan_shares_the_time_by_planned_work_and_cuts_epochs_only_where_they_cannot_fit():
    sets = {"kaggle": (2026, 5, "96x128"), "usgra": (204, 5, "144x160")}
    rates = ("train_images_per_s_96x128_fp16_b4", "train_images_per_s_144x160_fp16_b4")
    fast = plan(dict.fromkeys(rates, "1e6"), 1000, sets, on_gpu=True)
    assert {name: p[:2] for name, p in fast.items()} == {"kaggle": (30, 30), "usgra": (123, 123)}
    slow = plan(dict.fromkeys(rates, "100"), 1000, sets, on_gpu=True)
    assert all(0 < epochs < planned for epochs, planned, *_ in slow.values())
    assert sum(p[3] for p in slow.values()) == pytest.approx(1000)
    assert slow["kaggle"][3] > slow["usgra"][3], "the larger planned work gets the larger share"
    assert plan({}, 1000, sets, on_gpu=True)["usgra"][0] == 0, "without a measured rate nothing is trained"


def test_a_step_that_hangs_without_output_is_stopped_at_its_budget(tmp_path, capsys):
    started = time.time()
    figures = step("hang", ["timeit", "-n", "1", "import time; time.sleep(120)"], dict(os.environ), tmp_path, 1)
    assert time.time() - started < 60, "the budget stops a silent step, not its next output line"
    assert figures == {}
    assert "hang: stopped at its 1 s budget" in capsys.readouterr().out
    assert (tmp_path / "hang.log").exists()
