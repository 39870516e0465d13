"""The ground every stage stands on: folders, file names, the run record, one-line errors, atomic writes and
the flags several scripts share. It imports no other module of the project."""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

IMAGE_HEIGHT, IMAGE_WIDTH = 420, 580  # the Kaggle frames
INPUT_DIR, RESULTS_DIR, LOGS_DIR = Path("input"), Path("results"), Path("logs")

# Every file the pipeline writes, in one table: no other module spells a name.
MANIFEST = "arrays.json"  # input/: what data.py built the arrays from
RUN_FILE = "run.json"  # results/: the run's settings and whether it finished, for --resume
ENSEMBLE_FILE = "ensemble.json"  # results/: the model folders whose predictions are averaged
OOF_FILE = "oof.npz"  # results/: out-of-fold predictions at the training size
POSTPROCESS_FILE = "postprocess.json"  # results/: how probabilities become masks, tuned out of fold
EVALUATION_FILE = "evaluation.json"  # results/: evaluate.py's figures
WORST_CASES_FILE = "worst_cases.png"  # results/: evaluate.py's worst-scored images
SUBMISSION_FILE = "submission.csv"  # results/: the Kaggle CSV
SETTINGS_FILE = "settings.json"  # each model folder: the run record plus what this model learned
MODEL_FILE = "net.keras"  # each model folder: the best epoch's model
LEGACY_MODEL_FILE = "net.hdf5"  # beside it, for users of the legacy format
LAST_FILE = "last.keras"  # each model folder: the latest epoch with its optimizer state, for --resume
STATE_FILE = "train_state.json"  # beside it: epoch counter, best score, schedule and random-stream state
TRAINING_LOG_FILE = "training_log.csv"  # each model folder: one row of losses and scores per epoch
CURVES_FILE = "curves.png"  # each model folder: training_log.csv drawn
VAL_OVERLAYS_FILE = "val_overlays.png"  # each model folder: fixed validation images with the best model's masks


class UserError(Exception):
    """A problem the user can fix: printed as one message, without a traceback."""


def run_cli(main):
    """Run a script's main(), turning UserError and Ctrl-C into a one-line message."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


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
        kept = f"the earlier {path.name} is unchanged" if path.exists() else "nothing was written"
        raise UserError(f"could not write {path} ({e.strerror or e}); {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path):
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run `python train.py` first")
    return json.loads(path.read_text())


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


def run_record(args, leave_out=(), **facts):
    """The settings of a run as JSON: every flag but those left out, plus facts of the environment it ran in
    (backend, precision). run.json stores it; each model's settings.json is it plus what that model learned."""
    return {**{k: plain(v) for k, v in vars(args).items() if k not in leave_out}, **facts}


def upgrade_settings(settings):
    """A run record written by an older release, with the meaning of the keys it did not write spelled out."""
    settings = {"schedule": "plateau", **settings}  # before --schedule: a constant rate, lowered on plateaus
    if "postprocess" not in settings:  # before --baseline became a preset of the flags it implies
        settings.update(tta="hflip", postprocess="tuned")
        if settings.get("baseline"):
            settings.update(tta="none", postprocess="fixed", mask_loss="batch", bce_weight=0.0, presence_weight=0.0)
    return settings


def read_settings(folder):
    """A model folder's settings.json (upgraded where an older release wrote it)."""
    return upgrade_settings(read_json(Path(folder) / SETTINGS_FILE))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and gives each flag's default (an unset one's help says
    what happens instead; a switch's is off)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def arg_parser(doc):
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


# Flags several scripts take, defined once: name -> (argparse keywords).
SHARED_FLAGS = {
    "input": dict(type=Path, default=INPUT_DIR, help="the arrays data.py wrote"),
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
}


def add_flags(parser, *names, **changes):
    """Add the named shared flags to parser; `changes` maps a flag's dest to argparse keywords replacing its
    own (a script's default and help for it)."""
    for name in names:
        parser.add_argument(f"--{name}", **{**SHARED_FLAGS[name], **changes.get(name.replace("-", "_"), {})})


def given_flags(parser, argv):
    """The dests of the flags given on the command line, whatever their values: a flag given with its
    default value counts as given."""
    unset = object()
    # argparse fills in a default only where the namespace lacks the attribute
    namespace = argparse.Namespace(**{dest: unset for dest in vars(parser.parse_args([]))})
    parser.parse_args(argv, namespace)
    return {dest for dest, value in vars(namespace).items() if value is not unset}
