"""Augmented training batches made on CPU threads while the model trains: one random affine transform per
sample, optional elastic deformation and gamma, and crop views that teach "no nerve here" from frames labelled
only where the nerve is.

The code is nerve/augment.py: the card's augmentation file is its face, so that `import augment` works from a
REPL while the library never imports a file at the top, where the commands live.

    >>> import augment
    >>> batches = augment.AugmentedBatches(images, masks, batch_size=4, seed=0)
"""

from nerve.augment import AugmentedBatches, augment_pair, crop_view, held_out_crop, random_affine

__all__ = ["AugmentedBatches", "augment_pair", "crop_view", "held_out_crop", "random_affine"]
