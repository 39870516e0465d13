"""What train.py keeps on disk: the best model, the run record, and the state --resume continues from.

Each model folder gets net.keras (and net.hdf5) whenever the validation leaderboard score improves, with
settings.json (the run record plus what this model learned: normalisation, validation ids, best epoch).
After every epoch, last.keras (weights and optimizer state) and then train_state.json (epoch, best score,
schedule counters, dropout's random-stream state) are written; the state file goes last, so it is the
commit point. results/run.json holds the run record and whether the run finished.
"""

import logging
from pathlib import Path

from nerve.common import (
    LAST_FILE,
    LEGACY_MODEL_FILE,
    MODEL_FILE,
    RUN_FILE,
    SETTINGS_FILE,
    STATE_FILE,
    Count,
    Fraction,
    StateFile,
    UserError,
    atomic_path,
    read_settings,
    read_state,
    upgrade_settings,
    write_state,
)

import keras
import numpy as np

from nerve import config


def save_model(net, path, optimizer=False):
    """Save atomically: the network alone, which plain Keras loads without the project's code (no custom losses
    in its compile settings), or with `optimizer` its compiled state too, for --resume. Synchronized batch norm
    only matters while a tf.distribute strategy trains; saved without it, the model loads under every backend."""
    synchronized = [layer for layer in net.layers if getattr(layer, "synchronized", False)]
    for layer in synchronized:
        layer.synchronized = False
    try:
        with atomic_path(path) as tmp:
            (net if optimizer else keras.Model(net.input, net.output, name=net.name)).save(tmp)
    finally:
        for layer in synchronized:
            layer.synchronized = True


def save_best(folder, net, settings):
    """A folder's model, as net.keras and the legacy net.hdf5, and then its settings.json."""
    logging.getLogger("absl").setLevel(logging.ERROR)  # net.hdf5 is legacy on purpose: users expect it
    for name in (MODEL_FILE, LEGACY_MODEL_FILE):
        save_model(net, Path(folder) / name)
    write_state(Path(folder) / SETTINGS_FILE, settings)


def update_model(folder, net, **facts):
    """Replace a folder's model by `net` (the same one with new heads) and add `facts` to its settings.json."""
    save_best(folder, net, {**read_settings(folder), **facts})


def write_run(results, record, complete):
    write_state(Path(results) / RUN_FILE, {"settings": record, "complete": complete})


def read_run(results):
    """(the stored run record, whether the run finished), or None where results/ holds no run."""
    path = Path(results) / RUN_FILE
    if not path.exists():
        return None
    remedy = f"start over with `python train.py --results {results} --force` (the run cannot be resumed)"
    run = read_state(path, Run, remedy, _release_1_run)
    return upgrade_settings(run["settings"]), run["complete"]


def _release_1_run(run):
    """Release 1 stored the run's flags as "args"."""
    return {"settings": run.pop("args"), **run} if "args" in run else run


def check_unfinished(results, force):
    """Refuse to start over an unfinished run unless asked to: its epochs would be lost."""
    run = read_run(results)
    if run and not run[1] and not force:
        raise UserError(
            f"{results}/ holds an unfinished run: continue it with `python train.py --resume`, "
            "or start over with --force"
        )


def resumed(given, results):
    """The stored settings of the unfinished run in `results`, with those that may change (config.MOVABLE) taken
    from `given` (the settings the command line gave); a UserError naming the flags given that differ."""
    run = read_run(results)
    if run is None:
        raise UserError(f"nothing to resume in {results}/ (no {RUN_FILE}): start with `python train.py`")
    record, complete = run
    if complete:
        raise UserError(f"the run in {results}/ is complete: nothing to resume")
    remedy = f"start over with `python train.py --results {results} --force`"
    stored = config.from_record(record, Path(results) / RUN_FILE, remedy)
    changed = sorted(k for k, v in given.items() if k not in config.MOVABLE | {"results"} and v != getattr(stored, k))
    if changed:
        raise UserError(
            "--resume continues with the stored settings; drop "
            f"{', '.join('--' + k.replace('_', '-') for k in changed)} (or start over with --force)"
        )
    return stored.replace(**{k: v for k, v in given.items() if k in config.MOVABLE}, results=Path(results))


class BestModel(keras.callbacks.Callback):
    """Saves the model and its settings whenever val_leaderboard (monitor.Validation's) improves."""

    def __init__(self, folder, settings, best=-np.inf):
        super().__init__()
        self.folder, self.settings, self.best = Path(folder), settings, best

    def on_epoch_end(self, epoch, logs=None):
        score = logs["val_leaderboard"]
        if score > self.best:
            self.best = score
            save_best(self.folder, self.model, {**self.settings, "best_epoch": epoch + 1, "val_leaderboard": score})
            print(f"\nepoch {epoch + 1}: val_leaderboard {score:.4f}, best so far: saved to {self.folder}/")


class Plateau(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose patience counters can be saved and restored for --resume."""

    COUNTERS = ("wait", "best", "cooldown_counter")

    def __init__(self, counters=None, **kwargs):
        super().__init__(**kwargs)
        self.restored = counters or {}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)  # resets the counters
        for name, value in self.restored.items():
            setattr(self, name, value)

    def counters(self):
        return {name: float(getattr(self, name)) for name in self.COUNTERS}


class ResumePoint(keras.callbacks.Callback):
    """Saves the latest model with its optimizer state, then train_state.json, after each epoch.

    Listed last, so the state file is written only when everything else for the epoch is on disk."""

    def __init__(self, folder, run, best, plateau):
        super().__init__()
        self.folder, self.run, self.best, self.plateau = Path(folder), run, best, plateau

    def on_epoch_end(self, epoch, logs=None):
        save_model(self.model, self.folder / LAST_FILE, optimizer=True)
        write_state(
            self.folder / STATE_FILE,
            {
                "run": self.run,
                "epoch": epoch + 1,
                "best": self.best.best,
                "plateau": self.plateau and self.plateau.counters(),
                "random": [keras.ops.convert_to_numpy(v).tolist() for v in random_states(self.model)],
            },
        )


def random_states(net):
    """Dropout's random-stream counters: not among the weights a checkpoint holds."""
    return [v for v in net.variables if v.path.endswith("seed_generator_state")]


class TrainState(StateFile):
    """What --resume reads of train_state.json."""

    run: str
    epoch: Count
    best: Fraction
    random: list[list[float]]
    plateau: dict | None


class Run(StateFile):
    """What --resume reads of run.json (the settings themselves are checked by config.from_record)."""

    settings: dict
    complete: bool


def resume_state(folder, run, results):
    """The saved state of `folder` if it belongs to this run, else None (the model starts afresh)."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    remedy = (
        f"delete it and {LAST_FILE} beside it to train that model afresh on --resume, or start over with "
        f"`python train.py --results {results} --force`"
    )
    state = read_state(path, TrainState, remedy)
    return state if state["run"] == run else None


def restore(net, folder, state):
    """Load the latest epoch's weights, optimizer state and random streams into a compiled net."""
    net.optimizer.build(net.trainable_variables)  # so that load_weights restores the optimizer state too
    net.load_weights(Path(folder) / LAST_FILE)
    for variable, value in zip(random_states(net), state["random"]):
        variable.assign(np.array(value, variable.dtype))


def keep_epochs(log_path, epochs):
    """Drop rows for epochs >= `epochs` from a CSV training log (an epoch cut short by a kill)."""
    if log_path.exists():
        lines = log_path.read_text().splitlines(keepends=True)
        with atomic_path(log_path) as tmp:
            tmp.write_text("".join(lines[:1] + [r for r in lines[1:] if int(r.split(",", 1)[0]) < epochs]))


def finish(results, record, dirs):
    """Mark the run complete and delete the resume checkpoints it no longer needs."""
    write_run(results, record, complete=True)
    for name in dirs:
        (Path(results) / name / LAST_FILE).unlink(missing_ok=True)
