"""Convert a labelled dataset (Kaggle, nnU-Net raw 2-D or folder pairs: see layouts.py) to NumPy arrays (run once).

    python data.py                                   # input/train, input/test -> input/*.npy
    python data.py --input DIR --classes nerve,vessel --output input/mine   # your own scans
    python data.py --synthetic                       # first write a synthetic dataset there (no data needed)
    python data.py --check                           # report every problem in the input folders, write nothing

Images may be PNG, JPEG, TIFF or BMP, 8- or 16-bit, gray or RGB(A) (converted to gray), of any size. They are
stored at one size, the dataset's median (all of Kaggle's are 420x580, stored as they are), with each image's
own size beside them so that predictions go back to it. Masks become label maps: 0 background, k the k-th
structure. Arrays: train_images, train_masks, train_ids, train_subjects (the groups validation holds out
together), train_sizes, test_images, test_ids, test_sizes; arrays.json says what they were built from.
load_arrays() reads them back, checked.
"""

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (
    INPUT_DIR,
    MANIFEST,
    TEXT,
    UserError,
    arg_parser,
    atomic_path,
    integer,
    list_of,
    listing,
    number,
    output_folder,
    parse_size,
    read_state,
    run_cli,
    write_state,
)

import cv2
import numpy as np
import tifffile
from PIL import Image
from tqdm import tqdm

import layouts
import synthetic

# The arrays data.py writes into the input folder, by name.
ARRAYS = (
    "train_images",
    "train_masks",
    "train_ids",
    "train_subjects",
    "train_sizes",
    "test_images",
    "test_ids",
    "test_sizes",
)
WORKERS = min(8, os.cpu_count() or 1)  # decoding threads: OpenCV's decoders release the GIL
MAX_UNNAMED = 20  # structures a dataset may label without naming them: more is a mask that is no label map


def _decode(path):
    """A file's pixels as stored; ValueError says why a file is unreadable."""
    # OpenCV decodes with the GIL released, so threads scale (tifffile's LZW path does not); tifffile
    # reads TIFFs OpenCV cannot, and says why a damaged one is unreadable
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is not None:
        return image
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        raise ValueError("unreadable image")
    try:
        return tifffile.imread(path)
    except Exception as e:  # tifffile and its codecs raise many types for damaged files
        raise ValueError(f"unreadable TIFF ({type(e).__name__}: {e})") from None


def _one_channel(image):
    """The first channel of an image whose colour channels are identical, else None."""
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[-1] in (3, 4) and not np.any(image[..., 1:3] != image[..., :1]):
        return image[..., 0]
    return None


def read_image(path):
    """A uint8 grayscale image at its own size: colour converted to gray, 16 bits scaled to 8 by the
    highest bit in use (12-bit data stored in 16 bits fills the range)."""
    image = _decode(path)
    gray = _one_channel(image)
    if gray is None:
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"has shape {image.shape}; expected a gray or RGB(A) image")
        gray = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_BGR2GRAY)
    if gray.dtype == np.uint16:
        bits = max(8, int(gray.max()).bit_length())
        gray = np.round(gray * (255 / (2**bits - 1))).astype(np.uint8)
    if gray.dtype != np.uint8:
        raise ValueError(f"is {gray.dtype}; expected 8- or 16-bit pixels")
    return gray


def read_labels(path, kind):
    """A uint8 label map (0 background, k structure k) from a mask file of the given kind (layouts.BINARY,
    LABELS or ANY: 0/1 or 0/255, integer labels, or VOC/LabelMe palette colours)."""
    raw = _decode(path)
    gray = _one_channel(raw)
    if gray is None:
        if kind != layouts.ANY or raw.ndim != 3:
            raise ValueError(f"is a colour image; expected a {kind} mask")
        return _palette_labels(raw)
    binary = not np.any((gray != 0) & (gray != 255))  # cheaper than np.unique on every mask
    if kind == layouts.BINARY and not binary:
        raise ValueError("is not a 0/255 mask")
    if kind != layouts.LABELS and binary:
        return (gray == 255).view(np.uint8)
    if gray.dtype.kind not in "ui" or gray.max() > 255:
        raise ValueError(f"has values up to {gray.max()}; labels are whole numbers 0 to 255")
    return gray.astype(np.uint8)


def _palette_labels(bgr):
    """Labels of a colour mask in the VOC/LabelMe palette; ValueError names a colour in no class."""
    rgb = bgr[..., 2::-1].astype(np.int32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    found, inverse = np.unique(codes, return_inverse=True)
    colours = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in found.tolist()]
    unknown = [c for c in colours if c not in layouts.PALETTE]
    if unknown:
        raise ValueError(f"has colours {', '.join(map(str, unknown[:3]))} that are in no class of the VOC palette")
    return np.array([layouts.PALETTE[c] for c in colours], np.uint8)[inverse].reshape(codes.shape)


def image_shape(path):
    """(height, width) from the file's header, without decoding the pixels; None where PIL cannot tell."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # a damaged or exotic file: decoding it later says what is wrong
        return None


def storage_size(shapes):
    """The size the arrays hold every image at: the most common one when over half share it (every Kaggle
    frame is 420x580), else the median height and width."""
    shapes = [s for s in shapes if s]
    if not shapes:
        return 1, 1
    values, counts = np.unique(np.array(shapes), axis=0, return_counts=True)
    if counts.max() * 2 > len(shapes):
        return tuple(int(v) for v in values[counts.argmax()])
    return tuple(int(v) for v in np.median(np.array(shapes), axis=0).round())


def to_size(array, size, labels):
    """An image (area-averaged or linear) or a label map (nearest label) at size (h, w)."""
    if array.shape == tuple(size):
        return array
    shrink = array.shape[0] * array.shape[1] > size[0] * size[1]
    interpolation = cv2.INTER_NEAREST if labels else cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(array, size[::-1], interpolation=interpolation)


def decode_all(paths, reader, out, size, workers, desc, labels=False):
    """Decode paths[i] (at size into out[i], or only check when out is None); return the problems found,
    each file's own (height, width) and its largest value (the highest label of a mask)."""
    shapes, top = np.zeros((len(paths), 2), np.int32), np.zeros(len(paths), np.int64)

    def one(i):
        try:
            array = reader(paths[i])
        except ValueError as e:
            return f"{paths[i]} {e}"
        shapes[i], top[i] = array.shape, array.max(initial=0)
        if out is not None:
            out[i] = to_size(array, size, labels)
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


MANIFEST_FIELDS = {
    "train": integer(0),
    "test": integer(0),
    "newest_input_mtime": number(),
    "structures": list_of(TEXT),
    "size": list_of(integer(1), 2),
}


def rebuild(arrays_dir):
    """How to rebuild the arrays in arrays_dir."""
    return (
        f"rebuild the arrays with `python data.py --input {arrays_dir} --force` (with `--input DATASET --output "
        f"{arrays_dir}` where they were made from another folder)"
    )


def _release_2_manifest(manifest):
    """Before other layouts: a Kaggle folder of 420x580 frames with one structure, the nerve."""
    return {"structures": ["nerve"], "size": [420, 580], "source": {"layout": "Kaggle"}, **manifest}


def read_manifest(input_dir):
    """arrays.json: what data.py built the arrays from (counts, layout, structures, the size it stored)."""
    return read_state(
        Path(input_dir) / MANIFEST,
        MANIFEST_FIELDS,
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
    return all(built.get(k) == v for k, v in manifest.items() if k not in ("structures", "size", "grouping"))


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
):
    """Validate the dataset in input_dir and write its arrays to output_dir (unset: input_dir itself); return
    a summary of what was found and done."""
    input_dir = Path(input_dir)
    output_dir = Path(output_dir or input_dir)
    dataset = layouts.find(input_dir, layout, classes, groups, group_pattern)
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
    manifest = {
        "train": len(dataset.train),
        "test": len(dataset.test),
        "newest_input_mtime": _newest_mtime(dataset.folders),
        "source": source,
    }
    if not check_only and not force and _is_current(output_dir, manifest):
        counts = f"{len(dataset.train)} train, {len(dataset.test)} test"
        return "\n".join([*found, f"arrays in {output_dir}/ are up to date ({counts}); use --force to rebuild"])

    train_paths = [c.image for c in dataset.train]
    mask_paths = [c.mask for c in dataset.train]
    test_paths = [c.image for c in dataset.test]
    size = storage_size(image_shape(p) for p in train_paths)
    jobs = [
        ("train_images", train_paths, read_image, False),
        ("train_masks", mask_paths, lambda p: read_labels(p, dataset.masks), True),
        ("test_images", test_paths, read_image, False),
    ]
    if not check_only:
        output_folder(output_dir, "--output")
    with contextlib.ExitStack() as stack:
        tmp = {} if check_only else {a: stack.enter_context(atomic_path(output_dir / f"{a}.npy")) for a in ARRAYS}
        problems, shapes, tops = [], {}, {}
        for name, paths, reader, labels in jobs:
            # decode straight into the memory-mapped output: no list-then-stack copy in memory
            out = None if check_only else np.lib.format.open_memmap(tmp[name], "w+", np.uint8, (len(paths), *size))
            desc = f"checking {name}" if check_only else name
            found_problems, shapes[name], tops[name] = decode_all(paths, reader, out, size, workers, desc, labels)
            problems += found_problems
            if out is not None:
                out.flush()
                del out
        problems += _label_problems(dataset, shapes, tops)
        if check_only:
            if problems:
                raise UserError(f"{len(problems)} problem(s) in {input_dir}/:{listing(problems)}")
            fine = f"{input_dir}/ is fine: {len(train_paths)} train pairs, {len(test_paths)} test images"
            return "\n".join([*found, fine])
        if problems:
            raise UserError(f"fix these input files (nothing was written):{listing(problems)}")
        names = dataset.structures or [f"class{k}" for k in range(1, max(1, int(tops["train_masks"].max())) + 1)]
        groups_found = [c.group for c in dataset.train]
        numeric = all(isinstance(g, int) for g in groups_found)
        small = {
            "train_ids": np.array([c.id for c in dataset.train]),
            "train_subjects": np.array(groups_found, np.int32 if numeric else str),
            "train_sizes": shapes["train_images"],
            "test_ids": np.array([int(c.id) for c in dataset.test], np.int32)
            if dataset.layout == "Kaggle"
            else np.array([c.id for c in dataset.test], str),
            "test_sizes": shapes["test_images"].reshape(-1, 2),
        }
        for name, array in small.items():
            np.save(tmp[name], array)
    write_state(
        output_dir / MANIFEST, {**manifest, "structures": names, "size": list(size), "grouping": dataset.grouping}
    )
    resized = int(np.count_nonzero((shapes["train_images"] != size).any(axis=1)))
    stored = f"stored at {size[0]}x{size[1]}" + (
        f" (the median size: {resized} of {len(train_paths)} train images resized; predictions go back to each "
        "image's own size)"
        if resized
        else ""
    )
    return "\n".join(
        [
            *found,
            f"wrote {len(train_paths)} train pairs and {len(test_paths)} test images to {output_dir}/*.npy, {stored}",
        ]
    )


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
    elif name.endswith("_sizes"):
        if array.ndim != 2 or array.shape[1:] != (2,):
            return f"{name}.npy has shape {array.shape}, expected (n, 2)"
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


def main(argv=None):
    # fmt: off
    ap = arg_parser(__doc__)
    ap.add_argument("--input", type=Path, default=INPUT_DIR, help="the dataset's folder (see layouts.py)")
    ap.add_argument("--output", type=Path, default=None, help="where the arrays go; unset: --input itself")
    ap.add_argument("--layout", choices=("auto", *layouts.LAYOUTS), default="auto",
                    help="auto: found from the folders (with --synthetic: kaggle)")
    ap.add_argument("--classes", default=None,
                    help="the structures' names in label order (nerve,vessel) or a JSON file of them; "
                         "unset: the layout's own (Kaggle: nerve; nnU-Net: dataset.json), else class1, class2, ...")
    ap.add_argument("--groups", default=None, help="a CSV of case,group rows: cases of one group (a subject, "
                    "a patient) are held out together")
    ap.add_argument("--group-pattern", default=None,
                    help=r"a regular expression over the case names whose first group is the group, e.g. '^(\w+?)_'")
    ap.add_argument("--force", action="store_true", help="rebuild the arrays even if they are up to date")
    ap.add_argument("--check", action="store_true", help="report every problem in the input folders; write nothing")
    ap.add_argument("--workers", type=int, default=WORKERS, help="decoding threads")
    syn = ap.add_argument_group("synthetic data")
    syn.add_argument("--synthetic", action="store_true", help="first write a synthetic dataset (--layout kaggle "
                     "or nnunet)")
    syn.add_argument("--subjects", type=int, default=8, help="synthetic train subjects")
    syn.add_argument("--frames", type=int, default=120, help="frames per synthetic subject")
    syn.add_argument("--test-subjects", type=int, default=2, help="synthetic subjects for test")
    syn.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    syn.add_argument("--vessels", action="store_true", help="label the vessels too (nnU-Net layout)")
    syn.add_argument("--size", default=None, help="synthetic frame size HxW (nnU-Net layout); unset: 420x580")
    # fmt: on
    args = ap.parse_args(argv)
    if args.workers < 1:
        raise UserError("--workers must be at least 1")

    layout = args.layout
    if args.synthetic:
        layout = "kaggle" if layout == "auto" else layout
        if layout == "folders":
            raise UserError("--synthetic writes the kaggle or nnunet layout")
        if (args.vessels or args.size) and layout != "nnunet":
            raise UserError("--vessels and --size write the nnU-Net layout: add --layout nnunet")
        if min(args.subjects, args.frames, args.test_subjects) < 1:
            raise UserError("--subjects, --frames and --test-subjects must be at least 1")
        existing = [d for d in map(args.input.joinpath, synthetic.FOLDERS[layout]) if d.is_dir() and any(d.iterdir())]
        if existing:
            raise UserError(
                f"{existing[0]}/ is not empty; --synthetic only writes into empty folders "
                "(use --input DIR for another folder)"
            )
        total = (args.subjects + args.test_subjects) * args.frames
        with tqdm(total=total, desc="synthetic", unit="img", leave=False) as bar:
            n_train, n_test = synthetic.write_dataset(
                args.input,
                args.subjects,
                args.frames,
                args.test_subjects,
                args.seed,
                progress=bar.update,
                layout=layout,
                size=parse_size(args.size) if args.size else None,
                vessels=args.vessels,
            )
        print(f"wrote a synthetic dataset to {args.input}/: {n_train} train pairs, {n_test} test images")
    print(
        convert(
            args.input,
            force=args.force,
            check_only=args.check,
            workers=args.workers,
            output_dir=args.output,
            layout=layout,
            classes=args.classes,
            groups=args.groups,
            group_pattern=args.group_pattern,
        )
    )


if __name__ == "__main__":
    run_cli(main)
