"""The ground every stage stands on: folders, file names, the run record, one-line errors, atomic writes,
the checked reading of every state file, and the flags several scripts share.

It imports no other module of the project, and outside the standard library only filelock and pydantic, so every script
imports it first (pyproject.toml's import order): the Keras backend is checked here before Keras is imported anywhere.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import filelock
import pydantic

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter, before anything loads it

IMAGE_HEIGHT, IMAGE_WIDTH = 420, 580  # the Kaggle frames
INPUT_DIR, RESULTS_DIR, LOGS_DIR = Path("input"), Path("results"), Path("logs")

# Every file the pipeline writes, in one table: no other module spells a name.
LOCK_FILE = ".lock"  # an output folder: held by the one process writing into it (exclusive)
LOCK_HOLDER_FILE = ".lock.holder"  # beside it: which process that is
MANIFEST = "arrays.json"  # input/: what data.py built the arrays from
RUN_FILE = "run.json"  # results/: the run's settings and whether it finished, for --resume
ENSEMBLE_FILE = "ensemble.json"  # results/: the model folders whose predictions are averaged
OOF_FILE = "oof.npz"  # results/: out-of-fold predictions at the training size
POSTPROCESS_FILE = "postprocess.json"  # results/: how probabilities become masks, tuned out of fold
EVALUATION_FILE = "evaluation.json"  # results/: evaluate.py's figures
CALIBRATION_FILE = "calibration.json"  # results/: each structure's presence temperature and calibration error
RELIABILITY_FILE = "reliability.png"  # results/: the presence's reliability diagram, before and after
WORST_CASES_FILE = "worst_cases.png"  # results/: evaluate.py's worst-scored images
CASES_FILE = "cases.csv"  # results/: every evaluated image and structure, scored
REPORT_FILE = "report.html"  # results/: the evaluation as one page, pictures embedded
MODEL_CARD_FILE = "MODEL_CARD.md"  # results/ and each export: what the model is, from what, how good
SUBMISSION_FILE = "submission.csv"  # results/: the Kaggle CSV
SETTINGS_FILE = "settings.json"  # each model folder: the run record plus what this model learned
MODEL_FILE = "net.keras"  # each model folder: the best epoch's model
LEGACY_MODEL_FILE = "net.hdf5"  # beside it, for users of the legacy format
LAST_FILE = "last.keras"  # each model folder: the latest epoch with its optimizer state, for --resume
STATE_FILE = "train_state.json"  # beside it: epoch counter, best score, schedule and random-stream state
TRAINING_LOG_FILE = "training_log.csv"  # each model folder: one row of losses and scores per epoch
CURVES_FILE = "curves.png"  # each model folder: training_log.csv drawn
VAL_OVERLAYS_FILE = "val_overlays.png"  # each model folder: fixed validation images with the best model's masks
DUPLICATES_FILE = "duplicates.csv"  # results/: duplicates.py's near-identical frame pairs
DUPLICATES_HIST_FILE = "duplicates_hist.png"  # results/: their distance histogram
DUPLICATES_PAIRS_FILE = "duplicates_pairs.png"  # results/: the closest conflicting pairs side by side
INSPECT_FILE = "inspect_{subset}.png"  # results/: utils.inspect_set's picture where no window can open
EXAMINE_FILE = "examine_generator.png"  # results/: utils.examine_generator's picture likewise
PREDICTIONS_DIR = "predictions"  # results/: predict.py's outputs, unless --output names another folder
MASK_FILE = "{name}_mask.png"  # there: an image's mask (0/255, or labels 1..K for several structures)
OVERLAY_FILE = "{name}_overlay.png"  # there: the image with each structure outlined and its presence
OVERLAY_VIDEO_FILE = "{name}_overlay.mp4"  # there: a video or cine loop drawn likewise, frame by frame
SEG_FILE = "{name}_seg.dcm"  # there: a DICOM input's masks as a DICOM Segmentation object
FRAMES_FILE = "{name}_frames.csv"  # there: per frame, each structure's presence, area, centroid, box
SUMMARY_FILE = "predictions.{ext}"  # there: per still image the same, as csv and json
LIVE_NAME = "live"  # there: predict.py --live's {name}_overlay.mp4 and {name}_frames.csv
LATENCY_FILE = "live_latency.json"  # there: its latency, frames/s and frames dropped
EXPORT_DIR = "export"  # results/: export.py's artefacts, a folder per format
DEPLOY_FILE = "deploy.json"  # beside them: input size, structures, tuned post-processing, views


FORMAT = 2  # of the state files below; a file without a "format" key was written by release 1
KERAS_BACKENDS = ("tensorflow", "jax", "torch")


MAX_LISTED = 20  # problems listed in one error message


class UserError(Exception):
    """A problem the user can fix: printed as one message, without a traceback."""


def listing(problems):
    """Problems as indented lines for an error message, at most MAX_LISTED of them."""
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


def run_cli(main):
    """Run a script's main(), turning UserError, an OSError on some path and Ctrl-C into a one-line message."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # one that no check foresaw: still one line, naming the path
        sys.exit(f"error: {e.filename or 'a file'}: {e.strerror or e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


def _check_keras_backend():
    """Stop with one line when KERAS_BACKEND names a backend Keras cannot import."""
    name = os.environ.get("KERAS_BACKEND")
    if not name or (name in KERAS_BACKENDS and importlib.util.find_spec(name)) or name in ("numpy", "openvino"):
        return
    installed = [b for b in KERAS_BACKENDS if importlib.util.find_spec(b)]
    problem = "is not installed here" if name in KERAS_BACKENDS else "is not a Keras backend"
    message = (
        f"KERAS_BACKEND={name} {problem}; installed: {', '.join(installed) or 'none'} "
        "(unset KERAS_BACKEND for tensorflow)"
    )
    if hasattr(sys, "ps1"):  # at a REPL: an ImportError, not an exit from the interpreter
        raise ImportError(message)
    sys.exit(f"error: {message}")


_check_keras_backend()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    A failed write (a full disk, no permission) becomes a UserError that says the old file is intact."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # same suffix: savers pick formats by it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        kept = f"the earlier {path.name} is unchanged" if path.is_file() else "nothing was written"
        raise UserError(f"could not write {path} ({e.strerror or e}); {kept}") from None
    finally:
        with contextlib.suppress(OSError):  # where the folder could not be made there is nothing to remove
            tmp.unlink(missing_ok=True)


def output_folder(path, flag):
    """Make the folder `path` (given by `flag`) or say in one line why it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file" if blocker else e.strerror or e
        raise UserError(f"cannot write into {path}/ ({reason}): choose another {flag}") from None
    return path


@contextlib.contextmanager
def exclusive(folder, flag="--results"):
    """Hold the folder for this process alone: a second run writing the same results is refused, not
    interleaved. The lock (filelock: flock on Linux and macOS, msvcrt on Windows) goes with the process, however
    it ends; who holds it is written beside it, since a locked file cannot be read on every system."""
    folder = output_folder(folder, flag)
    lock = filelock.FileLock(folder / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = folder / LOCK_HOLDER_FILE
        who = (holder.read_text().strip() if holder.exists() else "") or "another process"
        raise UserError(f"{folder}/ is in use by {who}: wait for it to finish, or use another {flag}") from None
    try:
        (folder / LOCK_HOLDER_FILE).write_text(
            f"pid {os.getpid()} ({' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])})"[:300]
        )
        yield
    finally:
        lock.release()


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_state(path, obj):
    """Write one of the state files the pipeline reads back, with its format version."""
    write_json(path, {"format": FORMAT, **obj})


class StateFile(pydantic.BaseModel):
    """The fields a reader of one state file relies on, each strictly of the kind its writer produces (a list
    for a tuple, no text for a number, no NaN); other keys are allowed and kept."""

    model_config = pydantic.ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


Fraction = Annotated[float, pydantic.Field(ge=0, le=1)]
NonNegative = Annotated[float, pydantic.Field(ge=0)]
Count = Annotated[int, pydantic.Field(ge=0)]
Positive = Annotated[int, pydantic.Field(ge=1)]
Size = tuple[Positive, Positive]  # (height, width)


def state_problems(error):
    """A pydantic ValidationError as one line: each field missing, or its value and what was expected."""
    said = []
    for e in error.errors()[:MAX_LISTED]:
        where = ".".join(map(str, e["loc"]))
        expected = e["msg"].replace("Input should be", "expected", 1)
        said.append(f"{where} is missing" if e["type"] == "missing" else f"{where} is {e['input']!r}: {expected}")
    return "; ".join(said)


def read_state(path, model, remedy, upgrade=None):
    """A state file the pipeline wrote, as a dict checked against what its writer produces: JSON, an object, a
    format this release knows, the fields of `model` (a StateFile) present and of their kind. Anything else is
    a UserError that names the file, what is wrong and `remedy`. `upgrade` spells out what older releases did
    not write."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: {remedy}")
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}; damaged or edited?): {remedy}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds {type(obj).__name__}, not the object the pipeline writes: {remedy}")
    version = obj.pop("format", 1)
    if version not in range(1, FORMAT + 1):
        raise UserError(f"{path} has format {version!r}; this release reads formats 1 to {FORMAT}: {remedy}")
    obj = upgrade(obj) if upgrade else obj
    try:
        model.model_validate_json(json.dumps(obj))
    except pydantic.ValidationError as e:
        raise UserError(f"{path} does not hold what the pipeline writes ({state_problems(e)}): {remedy}") from None
    return obj


CPUINFO = "/proc/cpuinfo"


def cpu_flags():
    """The CPU's feature flags as Linux names them (x86's "flags", Arm's "Features"), or None where it cannot be
    told."""
    try:
        with open(CPUINFO) as f:
            return {word for line in f if line.lower().startswith(("flags", "features")) for word in line.split()}
    except OSError:
        return None


def parse_spacing(text, where="--spacing"):
    """'0.1' -> (0.1, 0.1), '0.1x0.12' -> (0.1, 0.12): mm per pixel down the rows and across the columns; '' ->
    None (not known)."""
    if not text.strip():
        return None
    try:
        values = tuple(float(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"{where}: spacing {text!r} is not mm per pixel, e.g. 0.1 or 0.1x0.12 (rows x columns)")
    return values * 2 if len(values) == 1 else values


def parse_size(text):
    """'96x128' -> (96, 128); both sides must be positive."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"size {text!r} is not HxW, e.g. 96x128") from None
    if h <= 0 or w <= 0:
        raise UserError(f"size {text!r} must be positive")
    return h, w


def plain(value):
    """A flag's value as JSON stores it: paths as strings, tuples as lists."""
    return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value


def upgrade_settings(settings):
    """A run record written by an older release, with the meaning of the keys it did not write spelled out."""
    settings = {"schedule": "plateau", **settings}  # before --schedule: a constant rate, lowered on plateaus
    settings = {"structures": ["nerve"], **settings}  # before other datasets: the Kaggle nerve alone
    settings = {"bce_weight": 0.0, **settings}  # before --bce-weight: Dice alone (now 1 by default)
    settings = {"crops": 0.0, **settings}  # before --crops: whole frames only
    if "input" in settings:  # before --arrays, train.py's --input
        settings = {"arrays": settings["input"], **{k: v for k, v in settings.items() if k != "input"}}
    if "postprocess" not in settings:  # before --baseline became a preset of the flags it implies
        settings.update(tta="hflip", postprocess="tuned")
        if settings.get("baseline"):
            settings.update(tta="none", postprocess="fixed", mask_loss="batch", bce_weight=0.0, presence_weight=0.0)
    return settings


class ModelSettings(StateFile):
    """What every reader of a model's settings.json relies on."""

    size: Size
    base_filters: Positive
    depth: Positive
    dropout: Fraction
    mean: float
    std: NonNegative
    val_ids: list[str]
    tta: Literal["hflip", "none"]
    postprocess: Literal["tuned", "fixed"]
    presence_weight: NonNegative
    structures: list[str]


def read_settings(folder):
    """A model folder's settings.json, checked, and upgraded where an older release wrote it."""
    return read_state(Path(folder) / SETTINGS_FILE, ModelSettings, "retrain with `python train.py`", upgrade_settings)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and gives each flag's default (an unset one's help says
    what happens instead; a switch's is off)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def arg_parser(doc):
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def comma_choice(choices):
    """An argparse type: a comma-separated list of at least one of `choices`."""

    def parse(text):
        names = [n for n in text.split(",") if n]
        if not names or not set(names) <= set(choices):
            raise argparse.ArgumentTypeError(f"a comma-separated choice of {', '.join(choices)}, not {text!r}")
        return names

    return parse


# Flags several scripts take, defined once: name -> (argparse keywords).
SHARED_FLAGS = {
    "arrays": dict(type=Path, default=INPUT_DIR, help="the arrays data.py wrote", old="--input"),
    "results": dict(type=Path, default=RESULTS_DIR, help="what train.py wrote, and where outputs go"),
    "logs": dict(type=Path, default=LOGS_DIR, help="TensorBoard logs"),
    "precision": dict(
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: mixed fp16 on a GPU, bf16 on CPUs with native bf16, else fp32",
    ),
    "tta": dict(
        choices=("hflip", "none"),
        default=None,
        help="test-time views: hflip averages each image with its mirror image; unset: the run's own choice",
    ),
    "batch-size": dict(type=int, default=32, help="images per prediction step"),
    "groups": dict(
        default=None,
        help="a CSV of case,group rows: cases of one group (a subject, a patient) are held out together and "
        "resampled together for intervals; a header case,group,spacing adds each case's mm per pixel",
    ),
    "group-pattern": dict(
        default=None, help=r"a regular expression over the case names whose first group is the group, e.g. '^(\w+?)_'"
    ),
    "spacing": dict(
        type=parse_spacing,
        default=None,
        help="mm per pixel of every image, 0.1 or 0.1x0.12 (rows x columns), for distances and areas in mm",
    ),
}


def add_flags(parser, *names, **changes):
    """Add the named shared flags to parser; `changes` maps a flag's dest to argparse keywords replacing its
    own (a script's default and help for it; `old`: an earlier release's spelling, see Renamed)."""
    for name in names:
        keywords = {**SHARED_FLAGS[name], **changes.get(name.replace("-", "_"), {})}
        old = keywords.pop("old", None)
        if old:
            parser.add_argument(f"--{name}", old, action=Renamed, **keywords)
        else:
            parser.add_argument(f"--{name}", **keywords)


class Renamed(argparse.Action):
    """A flag whose second option string is an earlier release's spelling of it: that still works, for this
    release, with a one-line note."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.option_strings[0]:
            print(
                f"note: {option_string} is now {self.option_strings[0]}; {option_string} works for this release",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)
