"""The two-headed U-Net, its losses and metrics, written with keras.ops for any Keras backend.

Outputs: `mask` (sigmoid, HxWxK), each structure's pixels; `present` (sigmoid, K per image), whether
the image shows each structure at all, read from the bottleneck through global pooling so that any input
size divisible by 2**depth works. One structure (K = 1, the Kaggle nerve) is the original network.
Losses average over the structures, each scored on its own channel.

After training the network gets a third output, `ood`: how far the image's features lie from those of the
frames it was trained on (with_ood), and its presence is calibrated by a temperature (calibrated).
"""

from nerve.common import cpu_flags

import keras
import numpy as np
from keras import layers, ops

SMOOTH = 1.0  # Dice smoothing: an empty prediction on an empty mask scores 1
BN_MOMENTUM = 0.9  # Keras' 0.99 leaves inference statistics stale for the first few hundred steps
PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
STANDARDISE_EPSILON = 1e-6  # added to each image's variance: a blank image's std counts as 1e-3


def has_accelerator():
    """Whether the Keras backend sees a GPU."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def cpu_has_bf16():
    """Whether the CPU does bfloat16 arithmetic natively (AVX512_BF16 or AMX); elsewhere it is emulated."""
    return bool((cpu_flags() or set()) & {"avx512_bf16", "amx_bf16"})


def set_precision(choice="auto"):
    """Set Keras' global dtype policy for 'fp32', 'bf16', 'fp16' or 'auto'; return the policy name.

    auto: mixed float16 on a GPU, mixed bfloat16 on a CPU with native bf16, float32 otherwise.
    The output layers always compute in float32.
    """
    if choice == "auto":
        choice = "fp16" if has_accelerator() else "bf16" if cpu_has_bf16() else "fp32"
    keras.mixed_precision.set_dtype_policy(PRECISIONS[choice])
    return PRECISIONS[choice]


@keras.saving.register_keras_serializable(package="nerve")
class PerImageStandardization(layers.Layer):
    """What build_model's standardisation was until release 2: kept registered so that the models saved by
    those releases still load. New models use a built-in layer, so that plain Keras loads them."""

    def call(self, x):
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        std = ops.std(x, axis=(1, 2, 3), keepdims=True)
        return (x - mean) / ops.maximum(std, 1e-3)


def conv_bn_elu(x, filters, kernel_size, strides, name, synchronized=False):
    """Convolution, batch norm, ELU: the unit every layer of the network is made of."""
    x = layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, synchronized=synchronized, name=f"{name}_bn")(x)
    return layers.Activation("elu", name=f"{name}_elu")(x)


def double_conv(x, filters, name, synchronized):
    x = conv_bn_elu(x, filters, 3, 1, f"{name}a", synchronized)
    return conv_bn_elu(x, filters, 3, 1, f"{name}b", synchronized)


def build_model(
    input_shape=(96, 128, 1),
    base_filters=32,
    depth=4,
    dropout=0.3,
    mean=0.0,
    std=1.0,
    synchronized_bn=False,
    n_structures=1,
):
    """A U-Net with a mask head and a presence head; inputs are raw 0-255 pixel values.

    `mean` and `std` (of the training pixels) are folded into the first layer, so the saved
    model carries its own input normalisation. `synchronized_bn` (tensorflow only) computes batch-norm
    statistics over the global batch under a tf.distribute strategy, as one device would.
    """
    h, w = input_shape[:2]
    if h % 2**depth or w % 2**depth:
        raise ValueError(f"input size {h}x{w} must be divisible by 2**depth = {2**depth}")
    inputs = keras.Input(input_shape, name="image")
    # input statistics in float32 whatever the policy: bf16 would round the pixel values
    x = layers.Rescaling(1.0 / std, offset=-mean / std, dtype="float32", name="normalise")(inputs)
    # each image to zero mean and unit variance: a subject's gain and contrast settings then do not shift the
    # features batch norm's moving statistics were fitted to (a built-in layer: plain Keras loads the model)
    x = layers.LayerNormalization(
        axis=(1, 2, 3), center=False, scale=False, epsilon=STANDARDISE_EPSILON, dtype="float32", name="standardise"
    )(x)

    skips = []
    for level in range(depth):
        filters = base_filters * 2**level
        x = double_conv(x, filters, f"down{level}", synchronized_bn)
        skips.append(x)
        x = conv_bn_elu(x, filters, 2, 2, f"pool{level}", synchronized_bn)  # strided 2x2, not max pooling
    x = double_conv(x, base_filters * 2**depth, "bottom", synchronized_bn)
    bottleneck = layers.Dropout(dropout, name="bottom_dropout")(x)

    x = bottleneck
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, kernel_initializer="he_normal", name=f"up{level}_tconv")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = double_conv(x, filters, f"up{level}", synchronized_bn)
    mask = layers.Conv2D(n_structures, 1, activation="sigmoid", dtype="float32", name="mask")(x)

    # presence: 1x1 convolutions in place of dense layers, then pooled to one value per image
    p = conv_bn_elu(bottleneck, base_filters * 4, 1, 1, "presence", synchronized_bn)
    p = layers.Dropout(dropout, name="presence_dropout")(p)
    p = layers.Conv2D(n_structures, 1, kernel_initializer="he_normal", name="presence_logit")(p)
    p = layers.GlobalMaxPooling2D(name="presence_pool")(p)
    present = layers.Activation("sigmoid", dtype="float32", name="present")(p)
    return keras.Model(inputs, {"mask": mask, "present": present}, name="unet")


def pooled_features(net):
    """The network's features averaged over the image, (n, channels) float32, at every level of the encoder and
    the bottleneck (texture at the top, anatomy at the bottom): what the out-of-distribution score measures."""
    depth = sum(layer.name.endswith("_tconv") for layer in net.layers)
    names = [f"down{level}b_elu" for level in range(depth)] + ["bottom_dropout"]
    pooled = [
        layers.GlobalAveragePooling2D(dtype="float32", name=f"ood_pool_{name}")(net.get_layer(name).output)
        for name in names
    ]
    return layers.Concatenate(dtype="float32", name="ood_features")(pooled)


def calibrated(net, temperature):
    """The network with each structure's presence logit divided by its `temperature` before the sigmoid (a
    temperature of 1 is the network as trained). Built from the layers' outputs, so applied again it replaces
    the calibration; built-in layers only, so plain Keras still loads the saved model."""
    scaled = layers.Rescaling([1.0 / t for t in temperature], dtype="float32", name="presence_calibration")(
        net.get_layer("presence_pool").output
    )
    present = layers.Activation("sigmoid", dtype="float32", name="present")(scaled)
    return keras.Model(net.input, {**net.output, "present": present}, name=net.name)


def with_ood(net, mean, whitening, threshold):
    """The network with an output `ood` (n, 1): the Mahalanobis distance ||(f - mean) @ whitening|| of the
    image's pooled features f (pooled_features) from those of its training frames, over `threshold` (ood.py fits
    the three). Applied again it replaces the output; built-in layers only."""
    z = layers.Dense(len(mean), dtype="float32", name="ood_whiten")(pooled_features(net))
    direction = layers.UnitNormalization(dtype="float32", name="ood_direction")(z)
    distance = layers.Dot(axes=1, dtype="float32", name="ood_distance")([z, direction])  # z . z / |z| = |z|
    score = layers.Rescaling(1.0 / threshold, dtype="float32", name="ood")(distance)
    extended = keras.Model(net.input, {**net.output, "ood": score}, name=net.name)
    extended.get_layer("ood_whiten").set_weights([whitening, -np.asarray(mean) @ whitening])
    return extended


def soft_dice_per_image(y_true, y_pred):
    """Smoothed soft Dice of each image in a batch (probabilities, not thresholded masks) of (n, h, w, K),
    the mean over its K structures."""
    y_true = ops.cast(y_true, y_pred.dtype)
    inter = ops.sum(y_true * y_pred, axis=(1, 2))
    total = ops.sum(y_true, axis=(1, 2)) + ops.sum(y_pred, axis=(1, 2))
    return ops.mean((2.0 * inter + SMOOTH) / (total + SMOOTH), axis=-1)


@keras.saving.register_keras_serializable(package="nerve")
def dice_loss(y_true, y_pred):
    """1 - per-image Dice: each image counts equally, whatever the nerve's size."""
    return 1.0 - soft_dice_per_image(y_true, y_pred)


@keras.saving.register_keras_serializable(package="nerve")
def batch_dice_loss(y_true, y_pred):
    """1 - Dice over the whole batch's pixels, as the original Kaggle tutorials trained, given to every
    image: Keras averages per-image losses, so under a tf.distribute strategy each replica's share of the
    batch is scored and the shares averaged (jax's sharded arrays score the global batch)."""
    y_true = ops.cast(y_true, y_pred.dtype)
    axes = (0, 1, 2)  # per structure
    inter = ops.sum(y_true * y_pred, axis=axes)
    dice = (2.0 * inter + SMOOTH) / (ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes) + SMOOTH)
    return (1.0 - ops.mean(dice)) * ops.ones_like(y_pred[:, 0, 0, 0])


@keras.saving.register_keras_serializable(package="nerve")
def lovasz_hinge_loss(y_true, y_pred):
    """Lovasz hinge per image (Berman et al., 2018): a convex surrogate of 1 - IoU on the logits, whose
    gradient weights each pixel's hinge error by how much it moves the image's IoU (per structure, averaged)."""
    n, n_structures = ops.shape(y_pred)[0], ops.shape(y_pred)[-1]

    def rows(t):  # one row per image and structure
        return ops.reshape(ops.transpose(ops.cast(t, "float32"), (0, 3, 1, 2)), (n * n_structures, -1))

    y_true, p = rows(y_true), ops.clip(rows(y_pred), 1e-6, 1 - 1e-6)
    errors = 1.0 - (ops.log(p) - ops.log(1.0 - p)) * (2.0 * y_true - 1.0)
    order = ops.argsort(-errors, axis=-1)
    errors = ops.take_along_axis(errors, order, axis=-1)
    truth = ops.stop_gradient(ops.take_along_axis(y_true, order, axis=-1))
    positives = ops.sum(truth, axis=-1, keepdims=True)
    jaccard = 1.0 - (positives - ops.cumsum(truth, axis=-1)) / (positives + ops.cumsum(1.0 - truth, axis=-1))
    weights = ops.concatenate([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], axis=-1)
    return ops.mean(ops.reshape(ops.sum(ops.relu(errors) * weights, axis=-1), (n, n_structures)), axis=-1)


@keras.saving.register_keras_serializable(package="nerve")
class DiceBCELoss(keras.losses.Loss):
    """A Dice loss (over the batch, or per image) plus `bce_weight` times each image's mean per-pixel binary
    cross-entropy, whose gradient does not fade where the prediction is far from the truth."""

    def __init__(self, per_image=False, bce_weight=1.0, name="dice_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.per_image, self.bce_weight = per_image, bce_weight

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        dice = dice_loss(y_true, y_pred) if self.per_image else batch_dice_loss(y_true, y_pred)
        bce = ops.mean(ops.binary_crossentropy(y_true, y_pred), axis=tuple(range(1, len(y_pred.shape))))
        return dice + self.bce_weight * bce

    def get_config(self):
        return {**super().get_config(), "per_image": self.per_image, "bce_weight": self.bce_weight}


@keras.saving.register_keras_serializable(package="nerve")
def dice_coef(y_true, y_pred):
    """Mean per-image soft Dice, as a training metric."""
    return soft_dice_per_image(y_true, y_pred)
