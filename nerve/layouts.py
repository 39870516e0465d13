"""Which files make a dataset: the layouts data.py reads, their cases, the names of their structures and the
groups that validation holds out together.

- Kaggle: train/{subject}_{n}.tif with train/{subject}_{n}_mask.tif (0/255), test/{id}.tif.
- nnU-Net raw 2-D: imagesTr/{case}_0000{ending}, labelsTr/{case}{ending} (integer label maps),
  imagesTs/{case}_0000{ending}, dataset.json with "labels" and "file_ending".
- Folder pairs: images/ and masks/ with matching file names, optionally test/images/. Masks are binary (0/1
  or 0/255), integer label maps, or colour label images in the VOC/LabelMe palette; the structures' names
  come from --classes or a classes.json beside the folders.

The test part is optional everywhere. Without subject ids (Kaggle's names carry them) the groups come from a
CSV of case,group rows or a regular expression over the case names; failing both, each image is its own group.
"""

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from nerve.common import UserError, listing, parse_spacing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LAYOUTS = ("kaggle", "nnunet", "folders")
KAGGLE_TRAIN = re.compile(r"(\d+)_(\d+)(_mask)?\.tif")
KAGGLE_TEST = re.compile(r"(\d+)\.tif")
CLASSES_FILE = "classes.json"  # beside images/ and masks/: the structures' names
# Masks: how a file's values become labels (0 background, k the k-th structure)
BINARY, LABELS, ANY = "0/255", "label map", "any"


@dataclass
class Case:
    id: str
    image: Path
    mask: Path | None = None
    group: object = None
    spacing: tuple | None = None  # (row, column) mm per pixel, where known


@dataclass
class Dataset:
    layout: str  # the layout's name as users know it
    train: list  # Cases with masks
    test: list  # Cases without
    structures: list | None  # names of labels 1..K; None: named after the labels found
    masks: str  # BINARY, LABELS or ANY
    grouping: str = ""  # where the groups came from; "" when every image is its own group
    folders: list = field(default_factory=list)  # whose newest change dates the arrays

    def describe(self):
        names = self.structures
        named = (
            f"{len(names)} class{'es' * (len(names) > 1)} ({', '.join(names)})"
            if names
            else "classes named after their labels"
        )
        return f"{self.layout} layout, {named}, {len(self.train)} training cases, {len(self.test)} test images"


def voc_colour(index):
    """The VOC/LabelMe palette's colour (r, g, b) of a label: 1 (128,0,0), 2 (0,128,0), 3 (128,128,0), ..."""
    r = g = b = 0
    for bit in range(8):
        r |= ((index >> (3 * bit)) & 1) << (7 - bit)
        g |= ((index >> (3 * bit + 1)) & 1) << (7 - bit)
        b |= ((index >> (3 * bit + 2)) & 1) << (7 - bit)
    return r, g, b


PALETTE = {voc_colour(i): i for i in range(256)}


def _images_in(folder):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def detect(root):
    """The layout of root: 'nnunet', 'folders' or 'kaggle'."""
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "nnunet"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folders"
    if (root / "train").is_dir():
        return "kaggle"
    raise UserError(
        f"{root}/ holds no dataset this pipeline reads: expected train/ and test/ (Kaggle), imagesTr/ with "
        "dataset.json (nnU-Net), or images/ and masks/ (folder pairs); or run `python data.py --synthetic`"
    )


def class_names(text):
    """Structure names from --classes: 'nerve,vessel', or a JSON file of ["nerve", ...] or {"nerve": 1, ...}
    (a "background": 0 entry is allowed); None when not given."""
    if not text:
        return None
    path = Path(text)
    if path.suffix.lower() == ".json" or path.is_file():
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read class names from {path} ({e})") from None
        return _names_from(spec, str(path))
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise UserError(f"--classes {text!r}: give names separated by commas, e.g. nerve,vessel")
    return names


def _names_from(spec, where):
    """Names of labels 1..K from a list of names or a mapping of name -> label (nnU-Net's "labels")."""
    if isinstance(spec, list) and all(isinstance(n, str) for n in spec):
        names = [n for n in spec if n.lower() != "background"]
        return names or _bad_names(where)
    if not isinstance(spec, dict):
        return _bad_names(where)
    if all(isinstance(k, str) and k.isdigit() for k in spec):  # nnU-Net v1: {"0": "background", "1": "nerve"}
        spec = {name: int(label) for label, name in spec.items()}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in spec.values()):
        raise UserError(f"{where}: labels must be whole numbers (region-based labels are not supported)")
    by_label = {v: k for k, v in spec.items() if v != 0}
    if sorted(by_label) != list(range(1, len(by_label) + 1)) or not by_label:
        raise UserError(
            f"{where}: labels must run 1, 2, ... without gaps (background 0); found {sorted(spec.values())}"
        )
    return [by_label[k] for k in range(1, len(by_label) + 1)]


def _bad_names(where):
    raise UserError(f'{where}: expected a list of names or {{"name": label, ...}}')


def _kaggle(root, problems):
    train_dir, test_dir = root / "train", root / "test"
    pairs, loose = {}, []
    for path in _images_in(train_dir):
        m = KAGGLE_TRAIN.fullmatch(path.name)
        if not m:
            loose.append(f"{path}: name is not {{subject}}_{{n}}.tif or {{subject}}_{{n}}_mask.tif")
            continue
        pairs.setdefault((int(m[1]), int(m[2])), {})["mask" if m[3] else "image"] = path
    problems += loose
    for (s, n), files in sorted(pairs.items()):
        if "mask" not in files:
            problems.append(f"{train_dir}/{s}_{n}.tif has no mask {s}_{n}_mask.tif")
        elif "image" not in files:
            problems.append(f"{train_dir}/{s}_{n}_mask.tif has no image {s}_{n}.tif")
    train = [Case(f"{s}_{n}", f["image"], f["mask"], s) for (s, n), f in sorted(pairs.items()) if len(f) == 2]
    if not pairs and not loose:
        problems.append(f"{train_dir}/ has no {{subject}}_{{n}}.tif images")
    test = []
    if test_dir.is_dir():
        for path in _images_in(test_dir):
            m = KAGGLE_TEST.fullmatch(path.name)
            if m:
                test.append(Case(m[1], path))
            else:
                problems.append(f"{path}: name is not {{id}}.tif")
    test.sort(key=lambda c: int(c.id))
    dataset = Dataset("Kaggle", train, test, ["nerve"], BINARY, "subject ids in the file names")
    dataset.folders = [d for d in (train_dir, test_dir) if d.is_dir()]
    return dataset


def _nnunet(root, problems, classes):
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path} cannot be read ({e})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise UserError(f'{meta_path} has no "labels": expected {{"labels": {{"background": 0, "nerve": 1}}, ...}}')
    channels = meta.get("channel_names", meta.get("modality", {"0": "image"}))
    if isinstance(channels, dict) and len(channels) > 1:
        raise UserError(f"{meta_path}: {len(channels)} input channels; this pipeline reads one image per case")
    ending = meta.get("file_ending", ".png")
    structures = classes or _names_from(meta["labels"], f"{meta_path} labels")

    def cases(folder, with_masks):
        found = []
        if not folder.is_dir():
            return found
        for path in sorted(folder.iterdir()):
            if not path.name.endswith(ending):
                continue
            stem = path.name[: -len(ending)]
            if not stem.endswith("_0000"):
                problems.append(f"{path}: name is not {{case}}_0000{ending}")
                continue
            case = Case(stem[:-5], path)
            if with_masks:
                case.mask = root / "labelsTr" / f"{case.id}{ending}"
                if not case.mask.is_file():
                    problems.append(f"{path} has no label map {case.mask}")
                    continue
            found.append(case)
        return found

    train = cases(root / "imagesTr", True)
    if not train and not problems:
        problems.append(f"{root}/imagesTr/ has no {{case}}_0000{ending} images")
    folders = [root / d for d in ("imagesTr", "labelsTr", "imagesTs") if (root / d).is_dir()]
    return Dataset("nnU-Net", train, cases(root / "imagesTs", False), structures, LABELS, "", folders)


def _folders(root, problems, classes):
    images, masks = root / "images", root / "masks"
    by_stem = {p.stem: p for p in _images_in(masks)}
    train = []
    for path in _images_in(images):
        if path.stem in by_stem:
            train.append(Case(path.stem, path, by_stem.pop(path.stem)))
        else:
            problems.append(f"{path} has no mask {masks}/{path.stem}.*")
    problems += [f"{p} has no image {images}/{stem}.*" for stem, p in sorted(by_stem.items())]
    if not train and not problems:
        problems.append(f"{images}/ has no images ({', '.join(IMAGE_SUFFIXES)})")
    test_dir = root / "test" / "images"
    test = [Case(p.stem, p) for p in _images_in(test_dir)] if test_dir.is_dir() else []
    if classes is None and (root / CLASSES_FILE).is_file():
        classes = class_names(str(root / CLASSES_FILE))
    folders = [images, masks, *([test_dir] if test_dir.is_dir() else [])]
    return Dataset("folder pairs", train, test, classes, ANY, "", folders)


def _assign_groups(dataset, groups_csv, pattern, spacing):
    """Set each training case's group from a CSV or a pattern over its id (these win over the layout's own), and
    its pixel spacing from the CSV's spacing column or one value for all."""
    if groups_csv:
        table = _read_groups(Path(groups_csv))
        missing = [c.id for c in dataset.train if c.id not in table]
        if missing:
            raise UserError(f"{groups_csv} has no group for {len(missing)} case(s):{listing(missing)}")
        given = any(table[c.id][1] for c in dataset.train)
        if given and spacing:
            raise UserError(f"{groups_csv} has a spacing column and --spacing is given too: give one of them")
        for case in dataset.train:
            case.group, case.spacing = table[case.id][0], table[case.id][1] or spacing
        dataset.grouping = f"groups from {groups_csv}"
        return
    elif pattern:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise UserError(f"--group-pattern {pattern!r} is not a regular expression ({e})") from None
        unmatched = []
        for case in dataset.train:
            m = regex.search(case.id)
            if m:
                case.group = m[1] if regex.groups else m[0]
            else:
                unmatched.append(case.id)
        if unmatched:
            raise UserError(f"--group-pattern {pattern!r} matches no part of:{listing(unmatched)}")
        dataset.grouping = f"groups from the pattern {pattern!r}"
    elif not dataset.grouping:
        for case in dataset.train:
            case.group = case.id
    for case in dataset.train:
        case.spacing = spacing


def _read_groups(path):
    """case -> (group, spacing or None) from a CSV of case,group rows; a header row case,group is skipped, and
    with a header case,group,spacing the third column is each case's mm per pixel (see parse_spacing)."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    with_spacing = header[:3] == ["case", "group", "spacing"]
    if header[:2] == ["case", "group"]:
        rows = rows[1:]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2 + with_spacing]
    if bad or not rows:
        raise UserError(
            f"{path}: expected rows of case,group (a header row case,group is allowed, or case,group,spacing "
            f"to give each case's mm per pixel); bad rows {bad}"
        )
    spacing = [parse_spacing(r[2], f"{path}, case {r[0].strip()}") if with_spacing else None for r in rows]
    return {r[0].strip(): (r[1].strip(), s) for r, s in zip(rows, spacing)}


def find(root, layout="auto", classes=None, groups_csv=None, group_pattern=None, spacing=None):
    """The dataset under root, or a UserError listing every problem found in its files' names and pairing."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}/ does not exist: put a dataset there, or run `python data.py --synthetic`")
    layout = detect(root) if layout == "auto" else layout
    if layout == "kaggle" and not (root / "train").is_dir():
        raise UserError(f"{root}/train/ does not exist: put the Kaggle data there, or run `python data.py --synthetic`")
    problems = []
    names = class_names(classes)
    if layout == "kaggle":
        dataset = _kaggle(root, problems)
        dataset.structures = names or dataset.structures
    elif layout == "nnunet":
        dataset = _nnunet(root, problems, names)
    else:
        dataset = _folders(root, problems, names)
    if problems:
        raise UserError(f"fix these input files (nothing was written):{listing(problems)}")
    _assign_groups(dataset, groups_csv, group_pattern, spacing)
    return dataset
