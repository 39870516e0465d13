"""Resizing to the network's input size, and augmented training batches made on the CPU while the model trains.

One random affine transform per sample (rotation, translation, flips, optionally zoom) is applied with a
single cv2.warpAffine to the image and, with nearest-neighbour sampling, to its mask, so the two stay
aligned and the mask stays binary. Optional elastic deformation shares one displacement field the same
way; an optional gamma curve changes the image's contrast alone (the network standardises each image, so
a linear change of brightness or contrast would teach it nothing). Every batch is a function of (seed,
epoch, batch index) alone, so results do not depend on which worker made it.

Crop views teach absence from frames labelled only where the structure is. A share of the samples is
replaced by a crop of the frame at full resolution (its aspect ratio kept, inside the tissue: a screen's
black bars are left out), resized to the network's input by the same function as a whole frame, then
augmented like one. At each drawn scale the crop either leaves a structure out (a margin beyond its
bounding box) or keeps it whole, a fair coin between the two; where one of the two cannot be drawn at
that scale neither is, and the sample stays the whole frame. So the zoom, the resizing and the frame's
borders are the same for crops with and without the structure, and only the tissue tells them apart.
"""

from nerve.common import IMAGE_WIDTH

import cv2
import keras
import numpy as np

from nerve import deploy

ROTATION_DEG = 10.0
SHIFT_PX = 20.0  # at the original 580-pixel width; scaled to the training size
FLIPS = ("horizontal",)  # left/right necks mirror each other; a vertical flip would put skin at the bottom
CROPS = 0.3  # share of training samples that are crop views (half of them without a structure)
CROP_SCALES = (0.4, 0.8)  # a crop's sides as a share of the frame's
CROP_MARGIN = 0.1  # of the crop's shorter side: how far a left-out structure stays outside it, a kept one inside
BLANK_LEVEL = 8  # pixels at or under this are a screen's black bars, not tissue


def resize_images(images, size, scale=1):
    """(n, H, W) uint8 images (times scale) -> (n, h, w) uint8 at size (h, w), area-averaged (deploy.resize), one
    image at a time: a memory-mapped input is never copied whole."""
    if not len(images):
        return np.zeros((0, *size), np.uint8)
    return np.stack([deploy.resize(np.asarray(im) * np.uint8(scale), size) for im in images])


def resize_masks(masks, size, n_structures=1):
    """(n, H, W) label maps -> (n, h, w) label maps: a pixel takes a structure's label if most of its area
    has it (so two structures never both qualify)."""
    labels = np.zeros((len(masks), *size), np.uint8)
    for i, mask in enumerate(masks):
        mask = np.asarray(mask)
        for k in range(1, n_structures + 1):
            labels[i][resize_images([mask == k], size, scale=255)[0] >= 128] = k
    return labels


def tissue_box(image):
    """(y0, y1, x0, x1) of the part of a frame that is not black bars: the rows and columns whose pixels are
    not almost all blank."""
    tissue = np.asarray(image) > BLANK_LEVEL
    rows, cols = np.flatnonzero(tissue.mean(axis=1) > 0.1), np.flatnonzero(tissue.mean(axis=0) > 0.1)
    if not len(rows) or not len(cols):
        return 0, tissue.shape[0], 0, tissue.shape[1]
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _starts(length, low, high):
    """Every start of a window of `length` inside [low, high)."""
    return np.arange(low, max(high - length + 1, low))


def crop_box(rng, labels, box, scale_range=CROP_SCALES):
    """A crop (y0, x0, height, width) of a frame's label map inside its tissue `box`, and whether it keeps the
    structure it was drawn for (one of those in the frame, at random): (None, None) where the frame shows none,
    or where at the drawn scale a crop without it or one with it whole does not fit."""
    found = np.unique(labels[labels > 0])
    if not len(found):
        return None, None
    ys, xs = np.nonzero(labels == rng.choice(found))
    scale = rng.uniform(*scale_range)
    h, w = round(scale * labels.shape[0]), round(scale * labels.shape[1])
    margin = round(CROP_MARGIN * min(h, w))
    top, bottom, left, right = ys.min() - margin, ys.max() + 1 + margin, xs.min() - margin, xs.max() + 1 + margin
    y0s, x0s = _starts(h, box[0], box[1]), _starts(w, box[2], box[3])
    # keeping the structure whole: the window spans [top, bottom) on both axes
    y_in, x_in = y0s[(y0s <= top) & (y0s + h >= bottom)], x0s[(x0s <= left) & (x0s + w >= right)]
    # leaving it out: the window misses [top, bottom) or [left, right)
    y_out, x_out = (y0s + h <= top) | (y0s >= bottom), (x0s + w <= left) | (x0s >= right)
    outside = np.argwhere(y_out[:, None] | x_out[None, :])
    if not (len(y_in) and len(x_in) and len(outside)):
        return None, None
    keep = bool(rng.random() < 0.5)
    if keep:
        return (int(rng.choice(y_in)), int(rng.choice(x_in)), h, w), True
    i, j = outside[rng.integers(len(outside))]
    return (int(y0s[i]), int(x0s[j]), h, w), False


def held_out_crop(image, labels, seed, tries=20):
    """A crop (y0, x0, height, width) of a held-out frame by the training rule, drawn again where the rule finds
    no pair of crops at the scale drawn; None where it finds none in `tries` draws (or the frame shows nothing)."""
    rng, box = np.random.default_rng(seed), tissue_box(image)
    for _ in range(tries):
        crop, _ = crop_box(rng, np.asarray(labels), box)
        if crop is not None:
            return crop
    return None


def cropped(array, crop):
    """The window crop = (y0, x0, height, width) of a frame or label map."""
    y0, x0, h, w = crop
    return np.asarray(array)[y0 : y0 + h, x0 : x0 + w]


def crop_view(image, labels, crop, size, n_structures=1):
    """A crop (y0, x0, height, width) of a full-resolution frame and its label map, at the network's size:
    through the same resizing as a whole frame."""
    return deploy.resize(cropped(image, crop), size), resize_masks([cropped(labels, crop)], size, n_structures)[0]


def random_affine(rng, size, flips=FLIPS, rotation=ROTATION_DEG, shift=SHIFT_PX, scale=0.0):
    """A 2x3 matrix: flip(s), rotation about the centre (and a zoom by up to 1 +- scale) and translation,
    drawn from rng."""
    h, w = size
    centre = ((w - 1) / 2, (h - 1) / 2)
    angle = rng.uniform(-rotation, rotation)
    m = np.vstack([cv2.getRotationMatrix2D(centre, angle, 1.0), [0, 0, 1]])
    flip = np.eye(3)
    if "horizontal" in flips and rng.random() < 0.5:
        flip = np.array([[-1, 0, w - 1], [0, 1, 0], [0, 0, 1]]) @ flip
    if "vertical" in flips and rng.random() < 0.5:
        flip = np.array([[1, 0, 0], [0, -1, h - 1], [0, 0, 1]]) @ flip
    m = m @ flip
    m[:2, 2] += rng.uniform(-shift, shift, size=2) * w / IMAGE_WIDTH
    if scale > 0:  # drawn last and only when asked: the other draws stay those of a run without it
        zoom = cv2.getRotationMatrix2D(centre, 0.0, rng.uniform(1 - scale, 1 + scale))
        m = np.vstack([zoom, [0, 0, 1]]) @ m
    return m[:2]


def random_gamma(image, rng, gamma):
    """The uint8 image through a gamma curve of exponent (1 + gamma) ** u, u uniform in [-1, 1]."""
    exponent = (1 + gamma) ** rng.uniform(-1, 1)
    curve = np.round(255 * (np.arange(256) / 255) ** exponent).astype(np.uint8)
    return cv2.LUT(image, curve)


def elastic_maps(rng, size, alpha, sigma):
    """Sampling maps (map_x, map_y) for cv2.remap: a smooth random displacement of up to ~alpha px."""
    h, w = size
    dx, dy = (cv2.GaussianBlur(rng.uniform(-1, 1, size).astype(np.float32), (0, 0), sigma) for _ in range(2))
    scale = alpha / max(float(np.abs(dx).max()), float(np.abs(dy).max()), 1e-6)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return x + dx * scale, y + dy * scale


def augment_pair(image, mask, rng, flips=FLIPS, elastic=0.0, elastic_sigma=8.0, scale=0.0, gamma=0.0):
    """One image and its mask under the same random transform."""
    size = image.shape
    m = random_affine(rng, size, flips, scale=scale)
    image = cv2.warpAffine(image, m, size[::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    mask = cv2.warpAffine(mask, m, size[::-1], flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    if elastic > 0:
        mx, my = elastic_maps(rng, size, elastic, elastic_sigma)
        image = cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        mask = cv2.remap(mask, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    if gamma > 0:
        image = random_gamma(image, rng, gamma)
    return image, mask


def one_hot(masks, n_structures):
    """(n, h, w) label maps -> (n, h, w, K) 0/1 float32, one channel per structure."""
    return (np.asarray(masks)[..., None] == np.arange(1, n_structures + 1, dtype=np.uint8)).astype(np.float32)


def as_batch(images, masks, n_structures=1):
    """Model inputs and targets from uint8 arrays: (n, h, w, 1) float32 and {mask (n, h, w, K), present (n, K)}."""
    x = images[..., None].astype(np.float32)
    y = one_hot(masks, n_structures)
    return x, {"mask": y, "present": y.reshape(len(y), -1, n_structures).max(axis=1)}


class AugmentedBatches(keras.utils.PyDataset):
    """Shuffled, augmented batches of (image, {mask, present}) at the arrays' size; with `crops`, that share of
    the samples are crop views (see above) of `originals` = (full-resolution images, label maps, the row of each
    training image in them).

    Workers are threads: cv2 releases the GIL, so threads make batches in parallel with the training step
    without copying the arrays into other processes (bench/throughput.py's augment_ratio measures the cost).
    """

    def __init__(
        self,
        images,
        masks,
        batch_size=32,
        seed=0,
        augment=True,
        shuffle=True,
        flips=FLIPS,
        elastic=0.0,
        scale=0.0,
        gamma=0.0,
        workers=2,
        epoch=0,
        multiple=1,
        n_structures=1,
        crops=0.0,
        originals=None,
    ):
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=8)
        self.images, self.masks = images, masks
        self.batch_size, self.seed, self.augment, self.shuffle = batch_size, seed, augment, shuffle
        self.flips, self.elastic, self.scale, self.gamma = tuple(flips), elastic, scale, gamma
        self.n_structures, self.crops, self.originals = n_structures, crops, originals
        self.epoch = epoch  # batches depend on (seed, epoch, index) only: a resumed run sees the same ones
        # with data parallelism on jax every batch must split evenly over the devices: the last batch of
        # an epoch is cut to a multiple of them (shuffled, so other images are left out each epoch)
        self.length = len(images) - len(images) % multiple
        self.order = self._order()

    def _order(self):
        n = len(self.images)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __len__(self):
        return -(-self.length // self.batch_size)

    def __getitem__(self, index):
        idx = self.order[index * self.batch_size : min((index + 1) * self.batch_size, self.length)]
        images, masks = self.images[idx], self.masks[idx]
        if self.augment:
            if self.crops:
                images, masks = self._with_crop_views(idx, images, masks, index)
            rng = np.random.default_rng([self.seed, self.epoch, index])
            pairs = [
                augment_pair(im, m, rng, self.flips, self.elastic, scale=self.scale, gamma=self.gamma)
                for im, m in zip(images, masks)
            ]
            images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        return as_batch(images, masks, self.n_structures)

    def _with_crop_views(self, idx, images, masks, index):
        """The batch with a share `crops` of its samples replaced by crop views, drawn from a random stream of
        their own: the other draws stay those of a run without crops."""
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        full_images, full_labels, rows = self.originals
        for j, i in enumerate(idx):
            if rng.random() >= self.crops:
                continue
            image, labels = full_images[rows[i]], full_labels[rows[i]]
            crop, _ = crop_box(rng, labels, tissue_box(image))
            if crop is not None:
                images[j], masks[j] = crop_view(image, labels, crop, images.shape[1:], self.n_structures)
        return images, masks

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self._order()
