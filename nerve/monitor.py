"""What a training run shows while it runs: the learning rate and a guard against a diverging loss in the logs,
TensorBoard scalars and validation overlays, a progress bar (or a line per epoch), and the pictures each
model folder gets at the end."""

import signal
import sys
from pathlib import Path

from nerve.common import CURVES_FILE, TRAINING_LOG_FILE, VAL_OVERLAYS_FILE, UserError

import keras
import numpy as np

from nerve import deploy
from nerve.figures import cases_png, overlay, training_curves
from nerve.inference import network_outputs
from nerve.metrics import presence, structure_dice

TENSORBOARD_IMAGES = 8  # validation images shown in TensorBoard each epoch
REPORT_IMAGES = 12  # validation images in val_overlays.png


def fit_verbosity():
    """Keras' progress bar inside each epoch on a terminal; one line per epoch in a log file or CI."""
    return 1 if sys.stdout.isatty() else 2


class LearningRateLog(keras.callbacks.Callback):
    """Adds the learning rate reached to each epoch's logs: a schedule does not log itself."""

    def on_epoch_end(self, epoch, logs=None):
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss, before any checkpoint can take the bad weights."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not np.isfinite(loss):
            raise UserError(
                f"the training loss became {loss} at epoch {self.epoch + 1}, batch {batch + 1}: "
                "training stopped, the checkpoints of the last good epoch are kept (try a lower --lr)"
            )


class StopOnInterrupt(keras.callbacks.Callback):
    """Turns Ctrl-C (SIGINT) or a kill (SIGTERM, what a scheduler or `kill` sends) into a KeyboardInterrupt at the
    end of the training or validation batch it came in. Python raises it wherever the main thread is when its
    handler runs, and inside a finalizer or a function TensorFlow calls back it can be printed and lost; a
    handler that only sets a flag loses nothing. A second signal of the same kind acts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def on_train_begin(self, logs=None):
        self.pressed = False
        self.previous = {s: signal.signal(s, self.press) for s in self.SIGNALS}

    def press(self, signum, frame):
        self.pressed = True
        signal.signal(signum, self.previous[signum])

    def on_train_batch_end(self, batch, logs=None):
        if self.pressed:
            raise KeyboardInterrupt

    def on_train_end(self, logs=None):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Validation(keras.callbacks.Callback):
    """Fit's validation, the validation batches predicted once an epoch: the val_ losses and metrics Keras' own
    pass would log, and val_leaderboard (the mean over structures of each one's leaderboard score, the Dice of
    the masks `spec` makes; with several structures each one's too, as val_leaderboard_{name}). The outputs
    and masks stay as attributes for the callbacks after it."""

    def __init__(self, batches, spec, structures):
        super().__init__()
        self.batches, self.structures = batches, structures  # augment.AugmentedBatches, in order, as they are
        self.x = batches.images[..., None].astype(np.float32)
        self.specs = [spec] * len(structures)

    def on_epoch_end(self, epoch, logs=None):
        self.outputs = network_outputs(self.model, self.x, self.batches.batch_size)
        self.masks = deploy.apply_each(self.outputs["mask"], self.outputs["present"], self.specs)
        per_structure = structure_dice(self.batches.masks, self.masks).mean(axis=0)
        logs.update({f"val_{name}": float(value) for name, value in self.losses().items()})
        logs["val_leaderboard"] = float(per_structure.mean())
        if len(self.structures) > 1:
            logs.update({f"val_leaderboard_{n}": float(v) for n, v in zip(self.structures, per_structure)})

    def losses(self):
        """The compiled losses and metrics from the outputs, each a mean over the images, with the model's own
        metric objects (reset first, as evaluate() does)."""
        net, size = self.model, self.batches.batch_size
        net.reset_metrics()
        loss = keras.metrics.Mean()
        for i in range(len(self.batches)):
            _, truth = self.batches[i]
            rows = slice(i * size, i * size + len(truth["mask"]))
            predicted = {name: self.outputs[name][rows] for name in truth}
            loss.update_state(net.compute_loss(y=truth, y_pred=predicted, training=False), len(truth["mask"]))
            net.compute_metrics(None, truth, predicted)
        return {**net.get_metrics_result(), "loss": loss.result()}


class ValidationImages(keras.callbacks.Callback):
    """Each epoch, a fixed set of `validation`'s images in TensorBoard drawn by figures.overlay (one structure:
    true-positive, false-positive and false-negative pixels tinted yellow, red, blue; several: one colour each)."""

    def __init__(self, validation, log_dir):
        super().__init__()
        import tensorflow as tf

        self.summary = tf.summary
        self.writer = tf.summary.create_file_writer(str(Path(log_dir) / "images"))
        self.validation = validation
        self.pick = example_indices(presence(validation.batches.masks), TENSORBOARD_IMAGES)

    def on_epoch_end(self, epoch, logs=None):
        v, pick = self.validation, self.pick
        predicted = deploy.label_map(v.masks[pick], v.outputs["mask"][pick])
        cases = zip(v.batches.images[pick], v.batches.masks[pick], predicted)
        tiles = np.stack([overlay(*case, len(v.structures)) for case in cases])
        with self.writer.as_default():
            self.summary.image("validation_overlays", tiles, step=epoch, max_outputs=len(tiles))
        self.writer.flush()


def example_indices(present, n):
    """n fixed positions spread over a set, half of them images with a nerve where the set allows."""
    pos, neg = np.flatnonzero(present), np.flatnonzero(~present)
    n_neg = min(len(neg), n // 2)
    n_pos = min(len(pos), n - n_neg)
    n_neg = min(len(neg), n - n_pos)
    spread = [idx[np.linspace(0, len(idx) - 1, k).round().astype(int)] for idx, k in ((pos, n_pos), (neg, n_neg)) if k]
    return np.sort(np.concatenate(spread)) if spread else np.zeros(0, int)


def tensorboard_callbacks(log_dir, validation):
    """Keras' TensorBoard callback and `validation`'s images; both write through TensorFlow, which other
    backends may lack."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        print("tensorflow is not installed: no TensorBoard logs this run (the CSV log is still written)")
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(log_dir), histogram_freq=1), ValidationImages(validation, log_dir)]


def model_pictures(folder, frames, index, has_structure, probs, present, spec, names):
    """curves.png from the training log, and val_overlays.png: a fixed set of the validation images `index` of
    frames = (images, label maps, ids), each at its own size, with the best model's masks (probs and present: its
    predictions of all of them, at the training size; has_structure: which of them show one; names: the
    structures)."""
    folder = Path(folder)
    training_curves(folder / TRAINING_LOG_FILE, folder / CURVES_FILE)
    images, labels, ids = frames
    pick = example_indices(has_structure, REPORT_IMAGES)
    truth = [labels[i] for i in index[pick]]
    masks = [deploy.labels(probs[i], present[i], [spec] * len(names), mask.shape) for i, mask in zip(pick, truth)]
    return cases_png(
        [images[i] for i in index[pick]], truth, masks, ids[index[pick]], folder / VAL_OVERLAYS_FILE, names
    )
