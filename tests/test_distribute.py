import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import train
from conftest import ROOT, run_script, training_log
from nerve import common, distribute

TWO_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import train
from nerve import common
common.run_cli(lambda: train.main(sys.argv[1:]))
"""
# fp32: where the CPU has native bf16, "auto" picks it, and bf16 rounding differs between device counts
SMALL_RUN = ["--size", "32x48", "--base-filters", 4, "--depth", 2, "--dropout", 0, "--epochs", 1, "--precision", "fp32"]


# per-image Dice: under a tf.distribute strategy batch Dice scores each replica's share of the batch
TF_PARALLEL_RUN = [*map(str, SMALL_RUN), "--batch-size", "16", "--val-fraction", "0.3", "--mask-loss", "image"]


@pytest.fixture(scope="module")
def one_device_log(tiny_input, tmp_path_factory):
    """Training log rows of TF_PARALLEL_RUN on one device."""
    out = tmp_path_factory.mktemp("one-device")
    one = run_script(
        ROOT / "train.py", *TF_PARALLEL_RUN, "--input", tiny_input, "--results", out / "results", "--logs", out / "logs"
    )
    assert one.returncode == 0, one.stderr[-3000:]
    return training_log(out / "results")


@pytest.mark.slow
def test_mirrored_strategy_on_two_cpus_matches_one_device(tiny_input, tmp_path, one_device_log):
    two = subprocess.run(
        [
            sys.executable,
            "-c",
            TWO_CPUS,
            *TF_PARALLEL_RUN,
            "--input",
            str(tiny_input),
            "--distribute",
            "mirrored",
            "--results",
            str(tmp_path / "two"),
            "--logs",
            str(tmp_path / "logs"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
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


@pytest.mark.slow
def test_two_workers_on_localhost_match_one_device_and_only_the_chief_writes(tiny_input, tmp_path, one_device_log):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers, outputs = [], [tmp_path / f"worker{index}.out" for index in range(2)]
    for index, output in enumerate(outputs):
        (tmp_path / f"tmp{index}").mkdir()
        env = {
            **os.environ,
            "TMPDIR": str(tmp_path / f"tmp{index}"),
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        }
        with open(output, "w") as out:
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "train.py",
                        *TF_PARALLEL_RUN,
                        "--input",
                        str(tiny_input),
                        "--distribute",
                        "multiworker",
                        "--results",
                        str(tmp_path / "results"),
                        "--logs",
                        str(tmp_path / "logs"),
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
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
    assert json.loads((tmp_path / "results" / common.RUN_FILE).read_text())["complete"]
    assert (tmp_path / "results" / "net.keras").exists() and (tmp_path / "results" / "oof.npz").exists()
    assert list((tmp_path / "tmp1").iterdir()) == []
    assert len(list((tmp_path / "logs").iterdir())) == 1


def test_multiworker_without_tf_config_says_what_to_set(tiny_input, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(common.UserError, match="needs TF_CONFIG"):
        train.main(["--distribute", "multiworker", "--input", str(tiny_input)])


def test_a_failing_worker_names_the_chiefs_results_not_its_scratch_folder(tmp_path):
    config = train.parse_args(["--results", str(tmp_path / "results")])[0]
    with pytest.raises(common.UserError) as failure:
        with distribute.worker_outputs(config, chief=False, resume=False) as mine:
            scratch = mine.results
            raise common.UserError(f"interrupted: continue with `python train.py --results {scratch} --resume`")
    assert str(tmp_path / "results") in str(failure.value) and str(scratch) not in str(failure.value)
    assert not scratch.parent.exists()


@pytest.mark.slow
def test_jax_data_parallel_on_two_cpus_matches_one_device(tiny_input, tmp_path):
    flags = [*SMALL_RUN, "--input", tiny_input, "--batch-size", 8, "--val-fraction", 0.3]
    env = {"KERAS_BACKEND": "jax", "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2"}
    runs = {}
    for mode in ("none", "mirrored"):
        runs[mode] = run_script(
            ROOT / "train.py",
            *flags,
            "--distribute",
            mode,
            "--results",
            tmp_path / mode,
            "--logs",
            tmp_path / "logs",
            env=env,
        )
        assert runs[mode].returncode == 0, runs[mode].stderr[-3000:]
    assert "data parallel over 2 devices: global batch 8, 4 per device" in runs["mirrored"].stdout
    # jax computes batch-norm statistics over the sharded global batch: the same steps as one device
    np.testing.assert_allclose(training_log(tmp_path / "mirrored")[1], training_log(tmp_path / "none")[1], rtol=1e-5)
    assert (tmp_path / "mirrored" / "net.keras").exists() and (tmp_path / "mirrored" / "oof.npz").exists()
