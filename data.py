"""Convert the Kaggle TIFFs in input/train and input/test to NumPy arrays in input/ (run once).

    python data.py                 # input/train, input/test -> input/*.npy
    python data.py --synthetic     # first write a synthetic dataset there (no Kaggle data needed)
    python data.py --check         # report every problem in the input folders, write nothing

Arrays are kept at full resolution (420x580 uint8) so that train.py can pick any input size:
train_images, train_masks (0/1), train_ids ("subject_n"), train_subjects, test_images, test_ids.
load_arrays() reads them back, checked.
"""

import contextlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    INPUT_DIR,
    MANIFEST,
    UserError,
    arg_parser,
    atomic_path,
    integer,
    number,
    read_state,
    run_cli,
    write_state,
)

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

import synthetic

# The arrays data.py writes into the input folder, by name.
ARRAYS = ("train_images", "train_masks", "train_ids", "train_subjects", "test_images", "test_ids")

TRAIN_NAME = re.compile(r"(\d+)_(\d+)(_mask)?\.tif")
TEST_NAME = re.compile(r"(\d+)\.tif")
MAX_LISTED = 20  # problems listed in one error message
WORKERS = min(8, os.cpu_count() or 1)  # decoding threads: OpenCV's TIFF decoder releases the GIL


def _listing(problems):
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


def _tif_files(folder):
    if not folder.is_dir():
        raise UserError(f"{folder}/ does not exist: put the Kaggle data there, or run `python data.py --synthetic`")
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".tif", ".tiff"))


def scan_train(folder):
    """Sorted [(subject, n)] of the image/mask pairs in folder, and a list of problems."""
    images, masks, problems = set(), set(), []
    for name in _tif_files(folder):
        m = TRAIN_NAME.fullmatch(name)
        if not m:
            problems.append(f"{folder / name}: name is not {{subject}}_{{n}}.tif or {{subject}}_{{n}}_mask.tif")
            continue
        (masks if m[3] else images).add((int(m[1]), int(m[2])))
    problems += [f"{folder}/{s}_{n}.tif has no mask {s}_{n}_mask.tif" for s, n in sorted(images - masks)]
    problems += [f"{folder}/{s}_{n}_mask.tif has no image {s}_{n}.tif" for s, n in sorted(masks - images)]
    return sorted(images & masks), problems


def scan_test(folder):
    """Sorted test ids in folder, and a list of problems."""
    ids, problems = [], []
    for name in _tif_files(folder):
        m = TEST_NAME.fullmatch(name)
        if m:
            ids.append(int(m[1]))
        else:
            problems.append(f"{folder / name}: name is not {{id}}.tif")
    return sorted(ids), problems


def read_image(path):
    """A 420x580 uint8 grayscale image; ValueError says what is wrong with the file."""
    # OpenCV decodes with the GIL released, so threads scale (tifffile's LZW path does not); tifffile
    # reads what OpenCV cannot, and says why a damaged file is unreadable
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        try:
            image = tifffile.imread(path)
        except Exception as e:  # tifffile and its codecs raise many types for damaged files
            raise ValueError(f"unreadable TIFF ({type(e).__name__}: {e})") from None
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        if np.any(image[..., 1:3] != image[..., :1]):
            raise ValueError(f"has {image.shape[-1]} different colour channels; expected grayscale")
        image = image[..., 0]  # grayscale stored as identical RGB channels
    if image.dtype != np.uint8:
        raise ValueError(f"is {image.dtype}; expected 8-bit grayscale")
    if image.shape != (IMAGE_HEIGHT, IMAGE_WIDTH):
        size = "x".join(map(str, image.shape[1::-1])) if image.ndim >= 2 else str(image.shape)
        raise ValueError(f"is {size} pixels; expected {IMAGE_WIDTH}x{IMAGE_HEIGHT}")
    return image


def read_mask(path):
    """A 0/1 mask read from a 0/255 TIFF."""
    mask = read_image(path)
    if np.any((mask != 0) & (mask != 255)):
        raise ValueError("is not a 0/255 mask")
    return (mask == 255).view(np.uint8)


def decode_all(paths, reader, out, workers, desc):
    """Decode paths[i] into out[i] (or only check when out is None); return the problems found."""

    def one(i):
        try:
            image = reader(paths[i])
        except ValueError as e:
            return f"{paths[i]} {e}"
        if out is not None:
            out[i] = image
        return None

    with ThreadPoolExecutor(workers) as pool:
        results = list(
            tqdm(
                pool.map(one, range(len(paths))), total=len(paths), desc=desc, unit="img", leave=False, mininterval=0.5
            )
        )
    return [r for r in results if r]


def _newest_mtime(folders):
    return max((e.stat().st_mtime for f in folders for e in os.scandir(f)), default=0.0)


MANIFEST_FIELDS = {"train": integer(0), "test": integer(0), "newest_input_mtime": number()}


def read_manifest(input_dir):
    """arrays.json: how many train and test images data.py converted, and from which state of the folders."""
    return read_state(
        input_dir / MANIFEST, MANIFEST_FIELDS, f"rebuild the arrays with `python data.py --input {input_dir} --force`"
    )


def _is_current(input_dir, n_train, n_test):
    if not all((input_dir / f"{a}.npy").exists() for a in ARRAYS):
        return False
    try:
        built = read_manifest(input_dir)
    except UserError:  # a missing or damaged manifest: the arrays are rebuilt, which is its remedy anyway
        return False
    newest = _newest_mtime([input_dir / "train", input_dir / "test"])
    return built == {"train": n_train, "test": n_test, "newest_input_mtime": newest}


def convert(input_dir=INPUT_DIR, force=False, check_only=False, workers=WORKERS):
    """Validate input_dir/train and input_dir/test and write the arrays; return a one-line summary."""
    input_dir = Path(input_dir)
    train_ids, train_problems = scan_train(input_dir / "train")
    test_ids, test_problems = scan_test(input_dir / "test")
    problems = train_problems + test_problems
    if not train_ids and not train_problems:
        problems.append(f"{input_dir}/train/ has no {{subject}}_{{n}}.tif images")
    if not test_ids and not test_problems:
        problems.append(f"{input_dir}/test/ has no {{id}}.tif images")
    if problems and not check_only:
        raise UserError(f"fix these input files (nothing was written):{_listing(problems)}")
    if not check_only and not force and _is_current(input_dir, len(train_ids), len(test_ids)):
        counts = f"{len(train_ids)} train, {len(test_ids)} test"
        return f"arrays in {input_dir}/ are up to date ({counts}); use --force to rebuild"

    train_dir, test_dir = input_dir / "train", input_dir / "test"
    jobs = [
        ("train_images", [train_dir / f"{s}_{n}.tif" for s, n in train_ids], read_image),
        ("train_masks", [train_dir / f"{s}_{n}_mask.tif" for s, n in train_ids], read_mask),
        ("test_images", [test_dir / f"{i}.tif" for i in test_ids], read_image),
    ]
    if check_only:
        for name, paths, reader in jobs:
            problems += decode_all(paths, reader, None, workers, f"checking {name}")
        if problems:
            raise UserError(f"{len(problems)} problem(s) in {input_dir}/:{_listing(problems)}")
        return f"{input_dir}/ is fine: {len(train_ids)} train pairs, {len(test_ids)} test images"

    small = {
        "train_ids": np.array([f"{s}_{n}" for s, n in train_ids]),
        "train_subjects": np.array([s for s, _ in train_ids], np.int32),
        "test_ids": np.array(test_ids, np.int32),
    }
    with contextlib.ExitStack() as stack:
        tmp = {a: stack.enter_context(atomic_path(input_dir / f"{a}.npy")) for a in ARRAYS}
        for name, paths, reader in jobs:
            # decode straight into the memory-mapped output: no list-then-stack copy in memory
            out = np.lib.format.open_memmap(
                tmp[name], mode="w+", dtype=np.uint8, shape=(len(paths), IMAGE_HEIGHT, IMAGE_WIDTH)
            )
            problems += decode_all(paths, reader, out, workers, name)
            out.flush()
            del out
        if problems:
            raise UserError(f"fix these input files (nothing was written):{_listing(problems)}")
        for name, array in small.items():
            np.save(tmp[name], array)
    write_state(
        input_dir / MANIFEST,
        {"train": len(train_ids), "test": len(test_ids), "newest_input_mtime": _newest_mtime([train_dir, test_dir])},
    )
    return f"wrote {len(train_ids)} train pairs and {len(test_ids)} test images to {input_dir}/*.npy"


def _array_problem(name, array):
    """What is wrong with one array data.py wrote, or None."""
    if name.endswith(("_images", "_masks")):
        expected = f"(n, {IMAGE_HEIGHT}, {IMAGE_WIDTH}) uint8"
        if array.dtype != np.uint8 or array.shape[1:] != (IMAGE_HEIGHT, IMAGE_WIDTH):
            return f"{name}.npy is {array.shape} {array.dtype}, expected {expected}"
    elif array.ndim != 1:
        return f"{name}.npy has shape {array.shape}, expected one value per image"
    return None


def load_arrays(input_dir, names):
    """Load the named arrays data.py wrote, memory-mapped, after checking that they belong together:
    shapes and dtypes as data.py writes them, one length per set, the counts in its manifest."""
    input_dir = Path(input_dir)
    missing = [n for n in names if not (input_dir / f"{n}.npy").exists()]
    if missing:
        raise UserError(f"{', '.join(missing)} not found in {input_dir}/: run `python data.py` first")
    arrays, problems = {}, []
    for name in names:
        try:
            arrays[name] = np.load(input_dir / f"{name}.npy", mmap_mode="r")
        except (ValueError, OSError) as e:  # truncated or not an .npy file at all
            problems.append(f"{name}.npy cannot be read ({e})")
            continue
        problem = _array_problem(name, arrays[name])
        if problem:
            problems.append(problem)
    counts = read_manifest(input_dir) if (input_dir / MANIFEST).exists() else {}
    for prefix in ("train", "test"):
        lengths = {n: len(a) for n, a in arrays.items() if n.startswith(prefix + "_")}
        expected = counts.get(prefix, next(iter(lengths.values()), None))
        problems += [
            f"{n}.npy holds {k} {prefix} images, expected {expected}" for n, k in lengths.items() if k != expected
        ]
    if problems:
        raise UserError(
            f"the arrays in {input_dir}/ do not match what data.py writes (an older or interrupted run?); "
            f"rebuild them with `python data.py --input {input_dir} --force`:\n  " + "\n  ".join(problems)
        )
    return arrays


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--input", type=Path, default=INPUT_DIR, help="folder with train/ and test/")
    ap.add_argument("--force", action="store_true", help="rebuild the arrays even if they are up to date")
    ap.add_argument("--check", action="store_true", help="report every problem in the input folders; write nothing")
    ap.add_argument("--workers", type=int, default=WORKERS, help="decoding threads")
    syn = ap.add_argument_group("synthetic data")
    syn.add_argument("--synthetic", action="store_true", help="first write a synthetic Kaggle-layout dataset")
    syn.add_argument("--subjects", type=int, default=8, help="synthetic train subjects")
    syn.add_argument("--frames", type=int, default=120, help="frames per synthetic subject")
    syn.add_argument("--test-subjects", type=int, default=2, help="synthetic subjects for test")
    syn.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    args = ap.parse_args()
    if args.workers < 1:
        raise UserError("--workers must be at least 1")

    if args.synthetic:
        if min(args.subjects, args.frames, args.test_subjects) < 1:
            raise UserError("--subjects, --frames and --test-subjects must be at least 1")
        existing = [d for d in (args.input / "train", args.input / "test") if d.is_dir() and any(d.iterdir())]
        if existing:
            raise UserError(
                f"{existing[0]}/ is not empty; --synthetic only writes into empty folders "
                "(use --input DIR for another folder)"
            )
        total = (args.subjects + args.test_subjects) * args.frames
        with tqdm(total=total, desc="synthetic", unit="img", leave=False) as bar:
            n_train, n_test = synthetic.write_dataset(
                args.input, args.subjects, args.frames, args.test_subjects, args.seed, progress=bar.update
            )
        print(f"wrote a synthetic dataset to {args.input}/: {n_train} train pairs, {n_test} test images")
    print(convert(args.input, force=args.force, check_only=args.check, workers=args.workers))


if __name__ == "__main__":
    run_cli(main)
