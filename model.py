"""The two-headed U-Net: a Dice-loss `mask` head and a BCE `present` head from the bottleneck, ELU + batch
norm, 2x2 strided convolutions instead of max pooling, dropout, he_normal initialisation, 1x1 convolutions
instead of dense layers; its losses and metrics in `keras.ops`, for any Keras backend.

The code is nerve/model.py: the card's model file is its face, so that `import model` works from a REPL while
the library never imports a file at the top, where the commands live.

    >>> import model
    >>> model.build_model((96, 128, 1), base_filters=32).summary()
"""

from nerve.model import (
    DiceBCELoss,
    batch_dice_loss,
    build_model,
    dice_coef,
    dice_loss,
    lovasz_hinge_loss,
    set_precision,
)

__all__ = [
    "DiceBCELoss",
    "batch_dice_loss",
    "build_model",
    "dice_coef",
    "dice_loss",
    "lovasz_hinge_loss",
    "set_precision",
]
