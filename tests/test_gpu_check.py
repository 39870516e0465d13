import pytest

from conftest import run_script


@pytest.mark.slow
def test_the_gpu_check_runs_its_steps_at_toy_sizes_on_a_cpu(shared_nerve, tmp_path):
    shared = shared_nerve.parent.parent
    check = run_script("-m", "bench.gpu_check", "--dry-run", "--budget", 400, "--shared", shared, "--out", tmp_path)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert check.stdout.startswith("budget: 400 s in all")
    figures = dict(line.split(": ", 1) for line in (tmp_path / "figures.txt").read_text().splitlines())
    assert {
        "train_images_per_s_32x48_fp32_b2",
        "train_images_per_s_32x48_fp32_b4",
        "matmul_gflops_bf16",
        "cv_dice_nonempty",
        "cv_leaderboard",
        "planned_epochs",
    } <= set(figures)
    assert all(value.endswith("(jax)]") for value in figures.values()), "every figure names its device"
    assert (tmp_path / "throughput.log").exists() and (tmp_path / "accuracy.log").exists()
