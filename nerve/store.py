"""The array store: a dataset's images and label maps as .npy arrays at one size, with each image's own size
beside them, arrays.json saying what they were built from; convert() writes them (every file checked first),
load_arrays() reads them back, checked."""

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nerve.common import (
    INPUT_DIR,
    MANIFEST,
    Count,
    Size,
    StateFile,
    UserError,
    atomic_path,
    listing,
    output_folder,
    read_state,
    write_state,
)

import numpy as np
from tqdm import tqdm

from nerve import layouts
from nerve.images import image_shape, read_image, read_labels

# The arrays data.py writes into the input folder, by name. train_subjects holds each image's validation group
# (a subject, a patient: what is held out together), under the name the Kaggle frames gave it; train_spacing its
# (row, column) mm per pixel, nan where not known (arrays of earlier releases lack it: see spacing()).
ARRAYS = (
    "train_images",
    "train_masks",
    "train_ids",
    "train_subjects",
    "train_sizes",
    "train_spacing",
    "test_images",
    "test_ids",
    "test_sizes",
)


WORKERS = min(8, os.cpu_count() or 1)  # decoding threads: OpenCV's decoders release the GIL


MAX_UNNAMED = 20  # structures a dataset may label without naming them: more is a mask that is no label map


def canvas_size(shapes):
    """The (height, width) of the arrays: every image fits in it at its own size, in the top left corner."""
    shapes = np.array([s for s in shapes if s] or [(1, 1)])
    return tuple(int(v) for v in shapes.max(axis=0))


def typical_size(shapes):
    """The images' typical (height, width), which planning.py plans the training size from: the most common one
    when over half share it (every Kaggle frame is 420x580), else the median height and width."""
    shapes = np.asarray(shapes)
    values, counts = np.unique(shapes, axis=0, return_counts=True)
    if counts.max() * 2 > len(shapes):
        return tuple(int(v) for v in values[counts.argmax()])
    return tuple(int(v) for v in np.median(shapes, axis=0).round())


class Frames:
    """The images (or label maps) of a stored array, each at its own size: indexing by a whole number gives one
    (a view of the top left of its canvas), by a slice or a list of indices a list of them."""

    def __init__(self, array, sizes):
        self.array, self.sizes = array, np.asarray(sizes)

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            h, w = self.sizes[i]
            return self.array[i, :h, :w]
        return [self[j] for j in np.arange(len(self))[i]]


def frames(arrays, name):
    """Frames of arrays[name] ("train_images", "test_images" or "train_masks"), sized by the set's sizes array."""
    return Frames(arrays[name], arrays[name.split("_")[0] + "_sizes"])


def decode_all(paths, reader, out, size, workers, desc):
    """Decode paths[i] (into the top left of out[i], which is `size`, or only check when out is None); return the
    problems found, each file's own (height, width) and its largest value (the highest label of a mask)."""
    shapes, top = np.zeros((len(paths), 2), np.int32), np.zeros(len(paths), np.int64)

    def one(i):
        try:
            array = reader(paths[i])
        except ValueError as e:
            return f"{paths[i]} {e}"
        shapes[i], top[i] = array.shape, array.max(initial=0)
        if array.shape[0] > size[0] or array.shape[1] > size[1]:  # its header gave no size, or a wrong one
            return f"{paths[i]} is {array.shape[1]}x{array.shape[0]} pixels, more than its header says"
        if out is not None:
            out[i, : array.shape[0], : array.shape[1]] = array
        return None

    with ThreadPoolExecutor(workers) as pool:
        results = list(
            tqdm(
                pool.map(one, range(len(paths))), total=len(paths), desc=desc, unit="img", leave=False, mininterval=0.5
            )
        )
    return [r for r in results if r], shapes, top


def _newest_mtime(folders):
    return max((e.stat().st_mtime for f in folders for e in os.scandir(f)), default=0.0)


class Manifest(StateFile):
    """What the readers of arrays.json rely on."""

    train: Count
    test: Count
    newest_input_mtime: float
    structures: list[str]
    size: Size


def rebuild(arrays_dir):
    """How to rebuild the arrays in arrays_dir."""
    return (
        f"rebuild the arrays with `python data.py --dataset {arrays_dir} --force` (with `--dataset DATASET --arrays "
        f"{arrays_dir}` where they were made from another folder)"
    )


def _release_2_manifest(manifest):
    """Before other layouts: a Kaggle folder of 420x580 frames with one structure, the nerve."""
    return {"structures": ["nerve"], "size": [420, 580], "source": {"layout": "Kaggle"}, **manifest}


def read_manifest(input_dir):
    """arrays.json: what data.py built the arrays from (counts, layout, structures, the size it stored)."""
    return read_state(
        Path(input_dir) / MANIFEST,
        Manifest,
        rebuild(input_dir),
        _release_2_manifest,
    )


def structures(input_dir):
    """The names of the structures the arrays in input_dir label, in label order."""
    return read_manifest(input_dir)["structures"]


def _is_current(output_dir, manifest):
    if not all((output_dir / f"{a}.npy").exists() for a in ARRAYS):
        return False
    try:
        built = read_manifest(output_dir)
    except UserError:  # a missing or damaged manifest: the arrays are rebuilt, which is its remedy anyway
        return False
    ignored = ("structures", "size", "grouping")
    return built.get("canvas", False) and all(built.get(k) == v for k, v in manifest.items() if k not in ignored)


def convert(
    input_dir=INPUT_DIR,
    force=False,
    check_only=False,
    workers=WORKERS,
    output_dir=None,
    layout="auto",
    classes=None,
    groups=None,
    group_pattern=None,
    spacing=None,
):
    """Validate the dataset in input_dir and write its arrays to output_dir (unset: input_dir itself); return
    a summary of what was found and done. `spacing`: (row, column) mm per pixel of every image."""
    input_dir = Path(input_dir)
    output_dir = Path(output_dir or input_dir)
    dataset = layouts.find(input_dir, layout, classes, groups, group_pattern, spacing)
    found = [dataset.describe()]
    if not dataset.grouping:
        found.append(
            "warning: no subject ids, so every image is its own group: near-duplicate frames of one subject will "
            "leak across validation folds and flatter the scores (give --groups CSV or --group-pattern REGEX)"
        )
    else:
        found.append(f"validation groups: {dataset.grouping}")
    source = {"input": str(input_dir.resolve()), "layout": dataset.layout, "classes": classes}
    source.update(groups=groups and str(Path(groups).resolve()), group_pattern=group_pattern)
    source.update(spacing=spacing and list(spacing))
    manifest = {
        "train": len(dataset.train),
        "test": len(dataset.test),
        "newest_input_mtime": _newest_mtime(dataset.folders),
        "source": source,
    }
    if not check_only and not force and _is_current(output_dir, manifest):
        counts = f"{len(dataset.train)} train, {len(dataset.test)} test"
        return "\n".join([*found, f"arrays in {output_dir}/ are up to date ({counts}); use --force to rebuild"])
    if check_only:
        _write_arrays(dataset, input_dir, None, workers)
        fine = f"{input_dir}/ is fine: {len(dataset.train)} train pairs, {len(dataset.test)} test images"
        return "\n".join([*found, fine])
    output_folder(output_dir, "--arrays")
    size, shapes, names = _write_arrays(dataset, input_dir, output_dir, workers)
    write_state(
        output_dir / MANIFEST,
        {**manifest, "structures": names, "size": list(size), "canvas": True, "grouping": dataset.grouping},
    )
    own = len(np.unique(shapes, axis=0))
    stored = f"stored at {size[0]}x{size[1]}"
    if own > 1:
        stored = f"stored each at its own size ({own} sizes, in a {size[0]}x{size[1]} canvas)"
    wrote = f"wrote {len(dataset.train)} train pairs and {len(dataset.test)} test images to {output_dir}/*.npy"
    return "\n".join([*found, f"{wrote}, {stored}"])


def _write_arrays(dataset, input_dir, output_dir, workers):
    """Decode every file of `dataset` (in input_dir) into the arrays in output_dir, atomically (or, where it is
    None, only check them); return (the canvas size, every image's own size, the structures' names). Every
    problem found is in one UserError, and then nothing is written."""
    train_paths = [c.image for c in dataset.train]
    test_paths = [c.image for c in dataset.test]
    size = canvas_size(image_shape(p) for p in train_paths + test_paths)
    jobs = [
        ("train_images", train_paths, read_image),
        ("train_masks", [c.mask for c in dataset.train], lambda p: read_labels(p, dataset.masks)),
        ("test_images", test_paths, read_image),
    ]
    with contextlib.ExitStack() as stack:
        tmp = {a: stack.enter_context(atomic_path(output_dir / f"{a}.npy")) for a in ARRAYS} if output_dir else {}
        problems, shapes, tops = [], {}, {}
        for name, paths, reader in jobs:
            # decode straight into the memory-mapped output: no list-then-stack copy in memory
            out = np.lib.format.open_memmap(tmp[name], "w+", np.uint8, (len(paths), *size)) if tmp else None
            desc = name if tmp else f"checking {name}"
            found_problems, shapes[name], tops[name] = decode_all(paths, reader, out, size, workers, desc)
            problems += found_problems
            if out is not None:
                out.flush()
                del out
        problems += _label_problems(dataset, shapes, tops)
        if problems and not tmp:
            raise UserError(f"{len(problems)} problem(s) in {input_dir}/:{listing(problems)}")
        if problems:
            raise UserError(f"fix these input files (nothing was written):{listing(problems)}")
        names = dataset.structures or [f"class{k}" for k in range(1, max(1, int(tops["train_masks"].max())) + 1)]
        groups_found = [c.group for c in dataset.train]
        numeric = all(isinstance(g, int) for g in groups_found)
        small = {
            "train_ids": np.array([c.id for c in dataset.train]),
            "train_subjects": np.array(groups_found, np.int32 if numeric else str),
            "train_sizes": shapes["train_images"],
            "train_spacing": np.array([c.spacing or (np.nan,) * 2 for c in dataset.train], np.float32).reshape(-1, 2),
            "test_ids": np.array([int(c.id) for c in dataset.test], np.int32)
            if dataset.layout == "Kaggle"
            else np.array([c.id for c in dataset.test], str),
            "test_sizes": shapes["test_images"].reshape(-1, 2),
        }
        for name, array in small.items() if tmp else ():
            np.save(tmp[name], array)
    return size, np.concatenate([small["train_sizes"], small["test_sizes"]]), names


def _label_problems(dataset, shapes, tops):
    """Masks whose size differs from their image's, or whose labels go beyond the named structures."""
    problems = []
    for case, image, mask, top in zip(
        dataset.train, shapes["train_images"], shapes["train_masks"], tops["train_masks"]
    ):
        if mask.any() and image.any() and tuple(mask) != tuple(image):
            problems.append(f"{case.mask} is {mask[1]}x{mask[0]} pixels but its image is {image[1]}x{image[0]}")
        if not dataset.structures and top > MAX_UNNAMED:
            problems.append(
                f"{case.mask} has label {top}: name the classes with --classes if there are that many, "
                "else the mask is not a label map (an anti-aliased edge?)"
            )
        if dataset.structures and top > len(dataset.structures):
            names = ", ".join(dataset.structures)
            problems.append(
                f"{case.mask} has label {top}, beyond the {len(dataset.structures)} classes named ({names})"
            )
    return problems


def _array_problem(name, array, size):
    """What is wrong with one array data.py wrote, or None."""
    if name.endswith(("_images", "_masks")):
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1:] != tuple(size):
            return f"{name}.npy is {array.shape} {array.dtype}, expected (n, {size[0]}, {size[1]}) uint8"
    elif name.endswith(("_sizes", "_spacing")):
        if array.ndim != 2 or array.shape[1:] != (2,):
            return f"{name}.npy has shape {array.shape}, expected (n, 2)"
    elif array.ndim != 1:
        return f"{name}.npy has shape {array.shape}, expected one value per image"
    return None


def spacing(input_dir, n):
    """Each training image's (row, column) mm per pixel, nan where not known (also for every image of arrays an
    earlier release wrote, which lack the array)."""
    path = Path(input_dir) / "train_spacing.npy"
    return np.load(path).astype(np.float64) if path.exists() else np.full((n, 2), np.nan)


def load_arrays(input_dir, names):
    """Load the named arrays data.py wrote, memory-mapped, after checking that they belong together:
    shapes and dtypes as data.py writes them, one length per set, the counts in its manifest."""
    input_dir = Path(input_dir)
    missing = [n for n in names if not (input_dir / f"{n}.npy").exists()]
    if missing:
        raise UserError(f"{', '.join(missing)} not found in {input_dir}/: run `python data.py` first")
    manifest = read_manifest(input_dir) if (input_dir / MANIFEST).exists() else {}
    arrays, problems = {}, []
    for name in names:
        try:
            arrays[name] = np.load(input_dir / f"{name}.npy", mmap_mode="r")
        except (ValueError, OSError) as e:  # truncated or not an .npy file at all
            problems.append(f"{name}.npy cannot be read ({e})")
            continue
        if name.endswith(("_images", "_masks")):  # without a manifest, the first of these sets the size
            manifest.setdefault("size", arrays[name].shape[1:3])
        problem = _array_problem(name, arrays[name], manifest.get("size"))
        if problem:
            problems.append(problem)
        elif name.endswith("_sizes") and not manifest.get("canvas") and (arrays[name] != manifest["size"]).any():
            problems.append(f"{name}.npy: an earlier release resized these images to one size")
    for prefix in ("train", "test"):
        lengths = {n: len(a) for n, a in arrays.items() if n.startswith(prefix + "_")}
        expected = manifest.get(prefix, next(iter(lengths.values()), None))
        problems += [
            f"{n}.npy holds {k} {prefix} images, expected {expected}" for n, k in lengths.items() if k != expected
        ]
    if problems:
        raise UserError(
            f"the arrays in {input_dir}/ do not match what data.py writes (an older or interrupted run?); "
            f"{rebuild(input_dir)}:\n  " + "\n  ".join(problems)
        )
    return arrays
