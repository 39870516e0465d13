"""Prediction: the trained models of a run, averaged over the fold ensemble and the mirror view, chunk by chunk,
at the models' input size and back at each image's own size; the same average as one Keras model for export,
and the runtimes that run an exported one.

train.py (out-of-fold predictions), evaluate.py, submission.py and utils.inspect_set all predict through here.
"""

from pathlib import Path

from nerve.common import (
    ENSEMBLE_FILE,
    MODEL_FILE,
    RESULTS_DIR,
    SETTINGS_FILE,
    StateFile,
    UserError,
    read_settings,
    read_state,
)

import keras
import numpy as np
from keras import ops

from nerve import augment, deploy
from nerve.deploy import full_size

CHUNK = 64  # images resized and predicted together: bounds memory at full size
VIEWS = {"none": (False,), "hflip": (False, True)}  # --tta: which mirror views are averaged


class Ensemble(StateFile):
    """ensemble.json: the model folders, relative to results/."""

    models: list[str]


def model_dirs(results=RESULTS_DIR):
    """The folders whose models are averaged: every fold after `train.py --folds K`, else results/ itself."""
    results = Path(results)
    ensemble = results / ENSEMBLE_FILE
    if not ensemble.exists():
        return [results]
    remedy = "retrain with `python train.py`, or delete it to use the model in results/ itself"
    folders = [results / d for d in read_state(ensemble, Ensemble, remedy)["models"]]
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


def in_current_precision(net):
    """The model itself, or a copy of it whose layers compute under the global dtype policy (a saved model keeps
    the precision it was trained in); the layers it keeps in float32 stay so."""
    trained = net.get_layer("bottoma_conv").dtype_policy.name  # a functional model's own policy is float32
    current = keras.mixed_precision.dtype_policy()
    if trained == current.name:
        return net

    def clone(layer):
        config = layer.get_config()
        if layer.dtype_policy.name == trained:
            config["dtype"] = current
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(net, clone_function=clone)
    copy.set_weights(net.get_weights())
    return copy


def load_models(results=RESULTS_DIR):
    """(models, input size, the first model's settings) of every model to average, checked against their
    settings."""
    nets, kinds, first = [], set(), None
    for folder in model_dirs(results):
        net, settings = load_model(folder), read_settings(folder)
        structures = net.output["mask"].shape[-1]
        if tuple(net.input_shape[1:3]) != tuple(settings["size"]) or structures != len(settings["structures"]):
            raise UserError(
                f"{folder / MODEL_FILE} takes {net.input_shape[1]}x{net.input_shape[2]} images and predicts "
                f"{structures} structure(s) but its {SETTINGS_FILE} says {settings['size'][0]}x{settings['size'][1]} "
                f"and {', '.join(settings['structures'])}: retrain"
            )
        nets.append(in_current_precision(net))
        kinds.add((tuple(settings["size"]), tuple(settings["structures"])))
        first = first or settings
    if len(kinds) > 1:
        raise UserError(f"the models in {results}/ differ in input size or structures {sorted(kinds)}: retrain")
    return nets, kinds.pop()[0], first


def data_parallel_devices():
    """How many devices a keras.distribution layout splits each batch over: 1 without one."""
    layout = keras.distribution.distribution() if keras.backend.backend() == "jax" else None
    return int(np.prod(layout.device_mesh.shape)) if layout else 1


def replicas(net):
    """How many devices net's predictions are split over: a tf.distribute strategy's replicas times the devices
    of a keras.distribution layout."""
    strategy = getattr(net, "distribute_strategy", None)  # TensorFlow's trainer has one
    return (strategy.num_replicas_in_sync if strategy else 1) * data_parallel_devices()


def network_outputs(net, x, batch_size=32):
    """net.predict on an array, padded so that every batch splits evenly over the devices of a
    keras.distribution layout (jax shards must be equal); the padding is cut from the outputs. A single batch on
    a single device goes through predict_on_batch, which skips the dataset predict() builds on every call (most
    of a live frame's time through Keras)."""
    pad = -len(x) % data_parallel_devices()
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    if len(x) <= batch_size and replicas(net) == 1:
        out = net.predict_on_batch(x)
    else:
        out = net.predict(x, batch_size=batch_size, verbose=0)
    return {name: value[: len(value) - pad] for name, value in out.items()}


def predicted_masks(net, x, specs, batch_size=32):
    """One model's post-processed masks (n, h, w, K) of a batch already at its input size (no mirror view)."""
    out = network_outputs(net, x, batch_size)
    return deploy.apply_each(out["mask"], out["present"], specs)


def predict_views(nets, images, tta="hflip", batch_size=32):
    """Each model's and each view's (mask probabilities (n, h, w, K), presence (n, K), out-of-distribution score
    (n,), nan for a model without one) of images at the models' size, the mirror view's mirrored back: a list,
    one triple per model and view."""
    x = np.asarray(images)[..., None].astype(np.float32)
    views = []
    for net in nets:
        for flip in VIEWS[tta]:
            out = network_outputs(net, x[:, :, ::-1] if flip else x, batch_size)
            probs, n = out["mask"], len(out["mask"])
            ood = out["ood"].reshape(n) if "ood" in out else np.full(n, np.nan, np.float32)
            views.append((probs[:, :, ::-1] if flip else probs, out["present"].reshape(n, -1), ood))
    return views


def mean_of_views(views):
    """The average (probabilities, presence, out-of-distribution score) of predict_views' triples."""
    # in float32 whatever the views' dtype: out-of-fold maps are stored as float16
    return tuple(np.mean([view[i] for view in views], axis=0, dtype=np.float32) for i in range(3))


def predict(nets, images, tta="hflip", batch_size=32):
    """Mean (mask probabilities (n, h, w, K), presence (n, K), out-of-distribution score (n,)) over the models
    and views, at the models' size."""
    return mean_of_views(predict_views(nets, images, tta, batch_size))


def predict_chunks(nets, size, images, tta="hflip", batch_size=32, at_full_size=False):
    """Yield (probabilities (n, h, w, K), presence (n, K), out-of-distribution score (n,)) of uint8 images at their
    own sizes (a list, an array or store.Frames), CHUNK at a time: at the models' size, or with at_full_size
    resized back to each image's own (a list where they differ)."""
    for start in range(0, len(images), CHUNK):
        chunk = images[start : start + CHUNK]
        probs, present, ood = predict(nets, augment.resize_images(chunk, size), tta, batch_size)
        if at_full_size:
            probs = [full_size(p, np.shape(image)) for p, image in zip(probs, chunk)]
            probs = np.stack(probs) if len({p.shape for p in probs}) <= 1 else probs
        yield probs, present, ood


class Serving(keras.Model):
    """Every model and view averaged, as one model: raw pixels (n, h, w, 1) in, {mask, present} out, and `ood`
    (n,) where the models have that output."""

    def __init__(self, nets, tta):
        super().__init__(name="serving")
        self.nets, self.flips = nets, VIEWS[tta]
        self.scores_ood = all("ood" in net.output for net in nets)
        self(np.zeros((1, *nets[0].input_shape[1:]), np.float32))  # built, as export requires

    def call(self, image):
        views = []
        for net in self.nets:
            for flip in self.flips:
                out = net(ops.flip(image, axis=2) if flip else image)
                views.append({**out, "mask": ops.flip(out["mask"], axis=2) if flip else out["mask"]})
        names = ("mask", "present", "ood") if self.scores_ood else ("mask", "present")
        mean = {name: ops.mean(ops.stack([view[name] for view in views]), axis=0) for name in names}
        if self.scores_ood:  # rank 1: runtimes that rename outputs are told them apart by rank
            mean["ood"] = ops.reshape(mean["ood"], (-1,))
        return mean


def runner(kind, path, threads=None):
    """A function (n, h, w, 1) float32 -> (mask probabilities, presence, out-of-distribution score) running an
    artefact with its own runtime (ONNX Runtime and OpenVINO on `threads` cores where given, else on all)."""
    if kind == "savedmodel":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))  # kept: its functions refer to its variables
        return lambda x: mask_and_presence(loaded.serve(x))
    if kind == "openvino":  # the ONNX file, compiled by OpenVINO in float32 (its bf16 default changes masks)
        try:
            import openvino
        except ImportError:
            raise UserError("the openvino runtime is not installed: `pip install openvino`") from None
        config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        compiled = openvino.Core().compile_model(str(path), "CPU", config)
        return lambda x: mask_and_presence(dict(compiled(x)))
    if kind == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's own choice, every core
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        outputs = [o.name for o in session.get_outputs()]
        return lambda x: mask_and_presence(dict(zip(outputs, session.run(None, {name: x}))))
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(str(path))
    interpreter.allocate_tensors()
    given, wanted = interpreter.get_input_details()[0], interpreter.get_output_details()

    def run(x):
        results = []
        for one in x:  # LiteRT's signature has a batch of one
            interpreter.set_tensor(given["index"], one[None])
            interpreter.invoke()
            results.append({d["name"]: interpreter.get_tensor(d["index"]) for d in wanted})
        return tuple(np.concatenate(parts) for parts in zip(*(mask_and_presence(r) for r in results)))

    return run


def mask_and_presence(outputs):
    """(mask, present, ood) from a runtime's named outputs, told apart by rank (LiteRT renames them); ood is nan
    for an artefact without that output."""
    arrays = [np.asarray(v) for v in outputs.values()]
    mask, present = next(a for a in arrays if a.ndim == 4), next(a for a in arrays if a.ndim == 2)
    return mask, present, next((a for a in arrays if a.ndim == 1), np.full(len(mask), np.nan, np.float32))
