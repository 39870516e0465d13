"""Prediction: the trained models of a run, averaged over the fold ensemble and the mirror view, chunk by chunk,
at the models' input size and back at each image's own size.

train.py (out-of-fold predictions), evaluate.py, submission.py and utils.inspect_set all predict through here.
"""

from pathlib import Path

from common import (
    ENSEMBLE_FILE,
    MODEL_FILE,
    RESULTS_DIR,
    SETTINGS_FILE,
    TEXT,
    UserError,
    list_of,
    read_settings,
    read_state,
)

import keras
import numpy as np

import augment
import model
import postprocess
from augment import full_size

CHUNK = 64  # images resized and predicted together: bounds memory at full size
VIEWS = {"none": (False,), "hflip": (False, True)}  # --tta: which mirror views are averaged


def model_dirs(results=RESULTS_DIR):
    """The folders whose models are averaged: every fold after `train.py --folds K`, else results/ itself."""
    results = Path(results)
    ensemble = results / ENSEMBLE_FILE
    if not ensemble.exists():
        return [results]
    remedy = "retrain with `python train.py`, or delete it to use the model in results/ itself"
    folders = [results / d for d in read_state(ensemble, {"models": list_of(TEXT)}, remedy)["models"]]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing or not folders:
        raise UserError(f"{ensemble} lists model folders that are not there ({', '.join(missing) or 'none'}): {remedy}")
    return folders


def load_model(folder):
    """The best model train.py saved in folder."""
    path = Path(folder) / MODEL_FILE
    if not path.exists():
        raise UserError(f"{path} not found: run `python train.py` first")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # a truncated or foreign file fails in many ways inside the loader
        raise UserError(f"cannot load {path} ({type(e).__name__}: {e}); retrain with `python train.py`") from None


def in_current_precision(net, settings):
    """The model itself, or the same weights in a network built under the global dtype policy
    (a saved model keeps the precision it was trained in)."""
    if net.dtype_policy.name == keras.mixed_precision.dtype_policy().name:
        return net
    rebuilt = model.build_model(
        (*settings["size"], 1),
        settings["base_filters"],
        settings["depth"],
        settings["dropout"],
        settings["mean"],
        settings["std"],
    )
    rebuilt.set_weights(net.get_weights())
    return rebuilt


def load_models(results=RESULTS_DIR):
    """(models, input size, the first model's settings) of every model to average, checked against their
    settings."""
    nets, sizes, first = [], set(), None
    for folder in model_dirs(results):
        net, settings = load_model(folder), read_settings(folder)
        if tuple(net.input_shape[1:3]) != tuple(settings["size"]):
            raise UserError(
                f"{folder / MODEL_FILE} takes {net.input_shape[1]}x{net.input_shape[2]} images but its "
                f"{SETTINGS_FILE} says {settings['size'][0]}x{settings['size'][1]}: retrain"
            )
        nets.append(in_current_precision(net, settings))
        sizes.add(tuple(settings["size"]))
        first = first or settings
    if len(sizes) > 1:
        raise UserError(f"the models in {results}/ were trained at different sizes {sorted(sizes)}: retrain")
    return nets, sizes.pop(), first


def data_parallel_devices():
    """How many devices a keras.distribution layout splits each batch over: 1 without one."""
    layout = keras.distribution.distribution() if keras.backend.backend() == "jax" else None
    return int(np.prod(layout.device_mesh.shape)) if layout else 1


def network_outputs(net, x, batch_size=32):
    """net.predict on an array, padded so that every batch splits evenly over the devices of a
    keras.distribution layout (jax shards must be equal); the padding is cut from the outputs."""
    pad = -len(x) % data_parallel_devices()
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    out = net.predict(x, batch_size=batch_size, verbose=0)
    return {name: value[: len(value) - pad] for name, value in out.items()}


def predicted_masks(net, x, spec, batch_size=32):
    """One model's post-processed masks of a batch already at its input size (no mirror view)."""
    out = network_outputs(net, x, batch_size)
    return postprocess.apply(out["mask"][..., 0], out["present"], spec)


def predict_views(nets, images, tta="hflip", batch_size=32):
    """Each model's and each view's (mask probabilities (n, h, w), presence (n,)) of images at the models'
    size, the mirror view's mirrored back: a list, one pair per model and view."""
    x = np.asarray(images)[..., None].astype(np.float32)
    views = []
    for net in nets:
        for flip in VIEWS[tta]:
            out = network_outputs(net, x[:, :, ::-1] if flip else x, batch_size)
            probs = out["mask"][..., 0]
            views.append((probs[:, :, ::-1] if flip else probs, out["present"].reshape(-1)))
    return views


def mean_of_views(views):
    """The average (probabilities, presence) of predict_views' pairs."""
    # in float32 whatever the views' dtype: out-of-fold maps are stored as float16
    return tuple(np.mean([view[i] for view in views], axis=0, dtype=np.float32) for i in (0, 1))


def predict(nets, images, tta="hflip", batch_size=32):
    """Mean (mask probabilities (n, h, w), presence (n,)) over the models and views, at the models' size."""
    return mean_of_views(predict_views(nets, images, tta, batch_size))


def predict_chunks(nets, size, images, tta="hflip", batch_size=32, at_full_size=False):
    """Yield (probabilities (n, h, w), presence (n,)) of full-size uint8 images, CHUNK at a time: at the models'
    size, or with at_full_size resized back to the images' own."""
    for start in range(0, len(images), CHUNK):
        chunk = images[start : start + CHUNK]
        probs, present = predict(nets, augment.resize_images(chunk, size), tta, batch_size)
        if at_full_size:
            probs = np.stack([full_size(p, np.shape(image)) for p, image in zip(probs, chunk)])
        yield probs, present
