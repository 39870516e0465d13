"""Shared fixtures: the real competition data in ../shared (skipped when absent) and a tiny synthetic tree."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_NERVE = ROOT.parent / "shared" / "data" / "nerve"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def shared_nerve():
    if not (SHARED_NERVE / "train_masks.csv").exists():
        pytest.skip(f"real competition data not found at {SHARED_NERVE} (the ../shared folder beside the repo)")
    return SHARED_NERVE


def run_script(*args, cwd=ROOT, env=None):
    """Run one of the project's scripts as a user would; return the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="session")
def tiny_input(tmp_path_factory):
    """A small synthetic Kaggle-layout tree converted by data.py: 3 subjects x 16 frames, 16 test images."""
    root = tmp_path_factory.mktemp("input")
    result = run_script(ROOT / "data.py", "--synthetic", "--input", root, "--subjects", 3, "--frames", 16,
                        "--test-subjects", 1)
    assert result.returncode == 0, result.stderr
    return root


def assert_picture(path, min_height=100, min_width=100):
    """A PNG that reads back, is at least min_height x min_width pixels and is not blank."""
    import matplotlib.image

    picture = matplotlib.image.imread(path)
    assert picture.shape[0] >= min_height and picture.shape[1] >= min_width, f"{path}: {picture.shape}"
    assert picture[..., :3].std() > 0.05, f"{path} is blank"
