"""A training run's settings: one frozen record with every default, checked when it is made.

train.py builds it once from its flags and the plan (the training size and length, the structures, the backend
and precision), stores it in run.json and each model's settings.json, and passes it down; nothing changes it
afterwards. --resume rebuilds the stored one (from_record) and names, in one line, the flags given that differ.
"""

import dataclasses
import json
import typing
from pathlib import Path
from typing import Literal

from nerve.common import INPUT_DIR, LOGS_DIR, RESULTS_DIR, UserError, plain

import pydantic

from nerve.augment import CROPS

MOVABLE = {"arrays", "logs", "workers"}  # may differ from the stored run on --resume


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # the data and the split
    arrays: Path = INPUT_DIR  # what data.py wrote
    folds: int = 1
    val_fraction: float = 0.1
    split: Literal["subject", "image"] = "subject"
    seed: int = 42
    conflicts: Literal["keep", "drop", "relabel"] = "keep"
    # the network
    size: tuple[int, int] | None = None  # unset: planned from the data
    base_filters: int = 32
    depth: int = 4
    dropout: float = 0.3
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # the losses
    mask_loss: Literal["image", "batch", "lovasz"] = "image"
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    presence_weight: float = 0.1
    baseline: bool = False
    # the optimisation
    epochs: int | None = None  # unset: planned from the data
    batch_size: int = 4
    lr: float = 1e-3
    schedule: Literal["cosine", "plateau"] = "cosine"
    distribute: Literal["none", "mirrored", "multiworker"] = "none"
    # the augmentation
    flips: tuple[str, ...] = ("horizontal",)
    elastic: float = 0.0
    scale: float = 0.0
    gamma: float = 0.0
    crops: float = CROPS
    workers: int = 2
    # what is kept of the held-out predictions and how they become masks
    tta: Literal["hflip", "none"] = "hflip"
    postprocess: Literal["tuned", "fixed"] = "tuned"
    # where it goes
    results: Path = RESULTS_DIR
    logs: Path = LOGS_DIR
    run: str | None = None  # the TensorBoard run name; unset: the date and time
    # facts of the plan and the environment, set before the run starts
    structures: tuple[str, ...] = ()
    backend: str = ""
    dtype_policy: str = ""

    def __post_init__(self):
        size = self.size or ()
        checks = [
            (self.epochs is None or self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (0 < self.val_fraction < 1, "--val-fraction must be between 0 and 1"),
            (self.folds >= 1, "--folds must be at least 1"),
            (self.base_filters >= 1 and self.depth >= 1, "--base-filters and --depth must be at least 1"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (min(self.dice_weight, self.bce_weight, self.presence_weight) >= 0, "loss weights must not be negative"),
            (
                not (self.bce_weight and self.mask_loss == "lovasz"),
                "--bce-weight adds to a Dice loss: use it with --mask-loss batch or image",
            ),
            (set(self.flips) <= {"horizontal", "vertical"}, "--flips takes horizontal, vertical or none"),
            (self.elastic >= 0 and self.workers >= 0, "--elastic and --workers must not be negative"),
            (0 <= self.scale < 1 and self.gamma >= 0, "--scale must be in [0, 1) and --gamma not negative"),
            (0 <= self.crops <= 1, "--crops must be in [0, 1]"),
            (
                all(s % 2**self.depth == 0 for s in size),
                f"--size {'x'.join(map(str, size))}: both sides must be divisible by 2**depth = {2**self.depth}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def record(self):
        """The settings as JSON values, for run.json and settings.json."""
        return {key: plain(value) for key, value in dataclasses.asdict(self).items()}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def choices(name):
    """The values a setting of a fixed set takes, for its flag's choices."""
    return typing.get_args(typing.get_type_hints(RunConfig)[name])


def from_record(record, source, remedy):
    """The RunConfig a record stored in `source` describes: each value of the kind its setting takes (a whole
    number is a real one, a list a tuple, text a path), keys that are no setting ignored; else one UserError
    naming the settings and `remedy`."""
    try:
        return _ADAPTER.validate_json(json.dumps(record), strict=True)
    except pydantic.ValidationError as e:
        wrong = sorted({str(error["loc"][0]) for error in e.errors()})
        raise UserError(f"{source} holds values of the wrong kind for {', '.join(wrong)}: {remedy}") from None


_ADAPTER = pydantic.TypeAdapter(RunConfig)
