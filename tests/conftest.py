"""Shared fixtures: the two real datasets in ../shared (skipped when absent) and a tiny synthetic tree."""

import contextlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nerve.common as common  # first: it sets TensorFlow's log level and checks KERAS_BACKEND

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent  # on sys.path through pyproject.toml's pytest settings
SHARED_NERVE = ROOT.parent / "shared" / "data" / "nerve"
SHARED_USGRA = ROOT.parent / "shared" / "data" / "usgra"
# jax compiles each new shape, a weight initialiser's too, and at toy sizes that is most of a run: the test
# processes under jax share one persistent compilation cache, and XLA's CPU compiler skips the optimisation
# passes that cost more than they save there
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "nerve-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# depth 2: half the graph to trace, which is most of a tiny run's time
TINY = ["--size", "32x48", "--base-filters", 4, "--depth", 2, "--batch-size", 8, "--val-fraction", 0.3]


def tiny_flags(*flags):
    """TINY and `flags` as train.py's argv, with the --epochs a model compiled without data needs (unset, it is
    planned from the data)."""
    return [*map(str, TINY), "--epochs", "1", *map(str, flags)]


@pytest.fixture(scope="session")
def shared_nerve():
    if not (SHARED_NERVE / "train_masks.csv").exists():
        pytest.skip(f"real competition data not found at {SHARED_NERVE} (the ../shared folder beside the repo)")
    return SHARED_NERVE


@pytest.fixture(scope="session")
def shared_usgra():
    if not (SHARED_USGRA / "masks").is_dir():
        pytest.skip(f"the usgra dataset is not at {SHARED_USGRA} (the ../shared folder beside the repo)")
    return SHARED_USGRA


def run_script(*args, cwd=ROOT, env=None):
    """Run one of the project's scripts as a user would; return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.fixture(autouse=True)
def keep_dtype_policy():
    """The Keras dtype policy a test or a script's main() sets (predict.py's "auto" is bf16 on some CPUs) is put
    back after it, so that the next test in the process computes as it expects."""
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


def run_main(script, *args):
    """Run a script's main() in this process, through run_cli as its command line does: a CompletedProcess like
    run_script's, without the seconds a new process spends importing TensorFlow. Each script still runs as a
    process in some test. The Keras dtype policy the script sets is put back, so that the test's own models after
    it compute in float32."""
    module, argv = importlib.import_module(script), [str(a) for a in args]
    policy = keras.config.dtype_policy()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            common.run_cli(lambda: module.main(argv))
    except SystemExit as e:  # as the interpreter does: a message goes to stderr and exits with 1
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        keras.config.set_dtype_policy(policy)
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_input(tmp_path_factory):
    """A small synthetic Kaggle-layout tree converted by data.py: 3 subjects x 16 frames, 16 test images."""
    root = tmp_path_factory.mktemp("input")
    result = run_script(
        ROOT / "data.py", "--synthetic", "--input", root, "--subjects", 3, "--frames", 16, "--test-subjects", 1
    )
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="session")
def trained(tiny_input, tmp_path_factory):
    """A 2-epoch tiny single-split run on tiny_input: (results, logs, its stdout)."""
    results = tmp_path_factory.mktemp("results")
    logs = tmp_path_factory.mktemp("logs")
    result = run_script(
        ROOT / "train.py",
        "--input",
        tiny_input,
        "--results",
        results,
        "--logs",
        logs,
        "--epochs",
        2,
        *TINY,
        "--run",
        "e2e",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return results, logs, result.stdout


def assert_picture(path, min_height=100, min_width=100, tints=(), pixels=50):
    """A PNG that reads back, is at least min_height x min_width pixels and is not blank; with `tints`, at least
    `pixels` of its pixels are a gray image tinted half-way to one of those colours (figures.overlay's blend: its
    red-blue and green-blue differences are half the colour's at any gray, which a legend patch's are not)."""
    import matplotlib.image
    import numpy as np

    picture = matplotlib.image.imread(path)
    assert picture.shape[0] >= min_height and picture.shape[1] >= min_width, f"{path}: {picture.shape}"
    assert picture[..., :3].std() > 0.05, f"{path} is blank"
    rgb = picture[..., :3].astype(np.float64) * 255
    differences = np.stack([rgb[..., 0] - rgb[..., 2], rgb[..., 1] - rgb[..., 2]], axis=-1)
    found = {colour: 0 for colour in tints}
    for colour in tints:
        half = np.array([colour[0] - colour[2], colour[1] - colour[2]]) / 2
        found[colour] = int(np.count_nonzero((np.abs(differences - half) <= 2).all(axis=-1)))
    assert not tints or max(found.values()) >= pixels, f"{path}: no tint of {tints} ({found} pixels)"


def training_log(results):
    """(header, rows) of a model folder's training log."""
    import csv

    import numpy as np

    rows = list(csv.reader(open(results / "training_log.csv")))
    return rows[0], np.array(rows[1:], float)


def stats_case(empty=2):
    """(probabilities at 42x58, full-size truth, presence) of two nerve images found well and `empty` empty
    images with small false detections (about 400 pixels at full size) and low presence."""
    import numpy as np

    probs = np.zeros((2 + empty, 42, 58), np.float32)
    truth = np.zeros((2 + empty, 420, 580), np.uint8)
    truth[:2, 100:200, 100:250] = 1
    probs[:2, 10:20, 10:25] = 0.9
    probs[2:, 30:32, 40:42] = 0.8
    return probs, truth, np.array([0.9, 0.8] + [0.3, 0.2] * (empty // 2) + [0.3] * (empty % 2))


# A hand-worked two-fold case: the specs tuned on one fold alone differ from those tuned on the other.
TWO_FOLD_FALSE_PRESENCE = (0.6, 0.3)  # presence of the false detections on the empty images of fold 0, fold 1
# Tuned on the other fold: a presence threshold just above its false detections' presence. The nerve's 0.9 is
# upsampled bilinearly, so its edge crosses 0.45 where the true edge is: 0.4 and 0.5 draw it equally well, and the
# first of equals is kept.
TWO_FOLD_SPECS = (
    {"presence_threshold": 0.35, "pixel_threshold": 0.4, "min_area_fraction": 0.0, "keep_largest": False},
    {"presence_threshold": 0.65, "pixel_threshold": 0.4, "min_area_fraction": 0.0, "keep_largest": False},
)


def two_fold_case():
    """(probabilities at 42x58, full-size truth, presence, fold) of two folds, each of two nerve images found well
    (presence 0.9) and enough empty images to tune a gate on, whose false detections are as large as a nerve
    (no minimum area tells them apart), at a presence that differs between the folds."""
    import numpy as np

    from nerve.postprocess import MIN_EMPTY_TO_GATE

    n = 2 + MIN_EMPTY_TO_GATE
    probs = np.zeros((2 * n, 42, 58), np.float32)
    truth = np.zeros((2 * n, 420, 580), np.uint8)
    present = np.zeros(2 * n)
    for k, false_presence in enumerate(TWO_FOLD_FALSE_PRESENCE):
        fold = slice(k * n, (k + 1) * n)
        truth[fold][:2, 100:200, 100:250] = 1
        probs[fold][:, 10:20, 10:25] = 0.9
        present[fold] = [0.9, 0.9] + [false_presence] * MIN_EMPTY_TO_GATE
    return probs, truth, present, np.repeat([0, 1], n)


def brute_force_boundary(truth, mask, spacing, tolerance):
    """HD95, ASSD and NSD by another route: border pixels found by shifting, every pairwise distance computed."""
    from scipy.spatial.distance import cdist

    def border(m):
        padded = np.pad(m, 1)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(m & ~inner) * np.asarray(spacing)

    pairwise = cdist(border(truth), border(mask))
    distances = np.r_[pairwise.min(axis=1), pairwise.min(axis=0)]
    return np.percentile(distances, 95), distances.mean(), np.mean(distances <= tolerance)
