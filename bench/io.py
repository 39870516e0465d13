"""data.py, run-length encoding and submission.py at Kaggle scale, against plain one-process code.

    python -m bench.io --quick     # a tenth of the scale
    python -m bench.io             # 5635 train pairs + 5508 test images (generated once, cached)

data_speedup: a plain loop reading the same files one by one into the same arrays, over data.py's
time (both as fresh processes, so imports count on both sides). data_mem_ratio: data.py's peak
resident memory over the bytes of the arrays it writes. rle_speedup: a per-pixel Python encoder over
rle.rle_encode, on the same masks. submission_ms_per_image: submission.py end to end with an
untrained default model (inference, resizing, encoding, writing, checking), per test image.
train_mem_ratio: the peak resident memory of one train.py epoch on the whole tree (default 96x128 input,
8 base filters to keep it short) over the bytes of the train arrays it reads; memory-mapped pages it
touches count as resident, so about 1 means the arrays plus a bounded queue.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nerve.common import arg_parser

import numpy as np

from nerve import common, rle, store, synthetic

ROOT = Path(__file__).resolve().parent.parent
KAGGLE_TRAIN, KAGGLE_TEST, FRAMES = 5635, 5508, 120

PLAIN_LOOP = """
import sys, numpy as np, tifffile
from pathlib import Path
root = Path(sys.argv[1])
names = sorted((p.name[:-9] for p in (root / "train").glob("*_mask.tif")), key=lambda n: tuple(map(int, n.split("_"))))
tests = sorted(int(p.stem) for p in (root / "test").glob("*.tif"))
images = np.empty((len(names), 420, 580), np.uint8)
masks = np.empty_like(images)
test = np.empty((len(tests), 420, 580), np.uint8)
for i, n in enumerate(names):
    images[i] = tifffile.imread(root / "train" / f"{n}.tif")
    masks[i] = tifffile.imread(root / "train" / f"{n}_mask.tif") // 255
for i, t in enumerate(tests):
    test[i] = tifffile.imread(root / "test" / f"{t}.tif")
out = root / "plain"
out.mkdir(exist_ok=True)
for name, a in (("train_images", images), ("train_masks", masks), ("test_images", test)):
    np.save(out / f"{name}.npy", a)
"""


def make_tree(root, n_train, n_test):
    """A synthetic Kaggle-layout tree with exactly n_train pairs and n_test test images (cached)."""
    done = root / "complete.json"
    if done.exists() and json.loads(done.read_text()) == [n_train, n_test]:
        return
    start = time.perf_counter()
    synthetic.write_dataset(
        root, subjects=-(-n_train // FRAMES), frames=FRAMES, test_subjects=-(-n_test // FRAMES), seed=1
    )
    last = -(-n_train // FRAMES)
    for n in range(FRAMES, FRAMES - (last * FRAMES - n_train), -1):  # trim the last subject to n_train
        (root / "train" / f"{last}_{n}.tif").unlink()
        (root / "train" / f"{last}_{n}_mask.tif").unlink()
    for p in (root / "test").glob("*.tif"):
        if int(p.stem) > n_test:
            p.unlink()
    done.write_text(json.dumps([n_train, n_test]))
    print(f"generated the tree in {time.perf_counter() - start:.0f} s")


def timed_process(args):
    """(seconds, peak resident MiB) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(f"benchmark stopped: {args} failed")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def rle_loop(mask):
    """The straightforward encoder: walk the pixels in column-major order."""
    h, w = mask.shape
    runs, start, length = [], 0, 0
    for x in range(w):
        for y in range(h):
            if mask[y, x]:
                if length == 0:
                    start = x * h + y + 1
                length += 1
            elif length:
                runs += [start, length]
                length = 0
    if length:
        runs += [start, length]
    return " ".join(map(str, runs))


def submission_time(root, results, n_test):
    """Seconds per test image for submission.py with an untrained default model."""
    from nerve import model

    net = model.build_model((96, 128, 1), mean=100.0, std=50.0)
    results.mkdir(parents=True, exist_ok=True)
    net.save(results / common.MODEL_FILE)
    common.write_state(
        results / common.SETTINGS_FILE,
        {
            "size": [96, 128],
            "base_filters": 32,
            "depth": 4,
            "dropout": 0.3,
            "mean": 100.0,
            "std": 50.0,
            "val_ids": [],
            "presence_weight": 0.1,
        },
    )
    seconds, _ = timed_process([ROOT / "submission.py", "--arrays", root, "--results", results])
    return seconds / n_test


def train_memory(root, work):
    """Peak resident MiB of a one-epoch train.py run over the whole tree."""
    _, peak = timed_process(
        [
            ROOT / "train.py",
            "--arrays",
            root,
            "--results",
            work / "train",
            "--logs",
            work / "logs",
            "--run",
            "memory",
            "--epochs",
            1,
            "--base-filters",
            8,
            "--force",
        ]
    )
    return peak


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="a tenth of the Kaggle scale")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nerve-io"), help="cache folder")
    args = ap.parse_args()
    scale = 10 if args.quick else 1
    n_train, n_test = KAGGLE_TRAIN // scale, KAGGLE_TEST // scale
    root = args.work / ("quick" if args.quick else "full")
    make_tree(root, n_train, n_test)

    data_s, data_mib = timed_process([ROOT / "data.py", "--dataset", root, "--force"])
    plain_s, plain_mib = timed_process(["-c", PLAIN_LOOP, root])
    array_mib = sum((root / f"{a}.npy").stat().st_size for a in store.ARRAYS) / 2**20
    print(
        f"data.py: {data_s:.1f} s, peak {data_mib:.0f} MiB; plain loop: {plain_s:.1f} s, peak {plain_mib:.0f} MiB; "
        f"arrays {array_mib:.0f} MiB"
    )
    for a in ("train_images", "train_masks", "test_images"):
        if not np.array_equal(
            np.load(root / f"{a}.npy", mmap_mode="r"), np.load(root / "plain" / f"{a}.npy", mmap_mode="r")
        ):
            sys.exit(f"data.py and the plain loop disagree on {a}")

    masks = np.load(root / "train_masks.npy", mmap_mode="r")[:n_test]
    start = time.perf_counter()
    encoded = [rle.rle_encode(m) for m in masks]
    fast = (time.perf_counter() - start) / len(masks)
    sample = range(0, len(masks), max(1, len(masks) // 10))
    start = time.perf_counter()
    for i in sample:
        if rle_loop(masks[i]) != encoded[i]:
            sys.exit("the per-pixel encoder disagrees with rle.rle_encode")
    slow = (time.perf_counter() - start) / len(sample)
    print(
        f"rle_encode: {fast * 1e3:.2f} ms per mask ({len(masks)} masks); per-pixel loop: {slow * 1e3:.0f} ms per mask"
    )

    per_image = submission_time(root, args.work / "results", n_test)
    train_mib = train_memory(root, args.work)
    train_arrays_mib = sum((root / f"{a}.npy").stat().st_size for a in ("train_images", "train_masks")) / 2**20
    print(f"train.py, one epoch: peak {train_mib:.0f} MiB; train arrays {train_arrays_mib:.0f} MiB")
    print(f"data_speedup: {plain_s / data_s:.2f}")
    print(f"data_mem_ratio: {data_mib / array_mib:.2f}")
    print(f"data_seconds: {data_s:.1f}")
    print(f"rle_speedup: {slow / fast:.0f}")
    print(f"submission_ms_per_image: {per_image * 1e3:.1f}")
    print(f"train_peak_mib: {train_mib:.0f}")
    print(f"train_mem_ratio: {train_mib / train_arrays_mib:.2f}")


if __name__ == "__main__":
    main()
