"""The out-of-distribution score: how far an image lies from the frames a model was trained on, in the model's own
features, so that a scan of other anatomy or from an unknown machine reads "not a scan this model knows".

The score is the Mahalanobis distance of the image's features, averaged over the image at every level of
the encoder and at the bottleneck, from the Gaussian of the training frames' (Lee et al., 2018, "A simple
unified framework for detecting out-of-distribution samples", whose feature ensemble takes several levels:
a scan of other anatomy differs in texture at the top as much as in anatomy at the bottom), its covariance
shrunk by Ledoit-Wolf, since several hundred channels are estimated from a few hundred to a few thousand
frames. It needs no data but the training frames and no change to training, and it lives in the network as
built-in layers (model.with_ood), so every export computes it.

The threshold is MARGIN times the QUANTILE of the validation frames' distances (subjects held out from
training): the frames a network was trained on lie closer to its features than a new subject's do, so a
threshold taken from them would flag most frames of a new subject; and subjects differ from each other more
than the frames of one, so the 99th percentile of some subjects flags a few percent of another's frames. The
margin was chosen on the competition images' validation subjects alone (docs/experiments.md), never on
scans of other anatomy. The network's `ood` output is the distance over the threshold: above
deploy.OOD_THRESHOLD (1) an image is "not a scan this model knows".
"""

import keras
import numpy as np
from sklearn.covariance import LedoitWolf

from nerve import model
from nerve.inference import VIEWS, network_outputs

QUANTILE = 0.99  # of the validation frames' distances, times MARGIN: the threshold
MARGIN = 1.25


def features(net, images, tta="hflip", batch_size=32):
    """Pooled features (views, n, channels) of uint8 images at the model's size, one row per view that tta names
    (the mirror view's of the mirror image)."""
    extractor = keras.Model(net.input, {"features": model.pooled_features(net)})
    x = np.asarray(images)[..., None].astype(np.float32)
    return np.stack(
        [network_outputs(extractor, x[:, :, ::-1] if flip else x, batch_size)["features"] for flip in VIEWS[tta]]
    )


def distances(views, mean, whitening):
    """Mahalanobis distances (n,) of features (views, n, channels), averaged over the views as the network's
    `ood` output is in inference.predict."""
    return np.linalg.norm((np.asarray(views, np.float64) - mean) @ whitening, axis=-1).mean(axis=0)


def gaussian(train_views):
    """(mean, whitening) of features (views, n, channels): whitening @ whitening.T is the shrunk precision."""
    fitted = LedoitWolf().fit(np.concatenate(train_views).astype(np.float64))
    values, vectors = np.linalg.eigh(fitted.precision_)
    return fitted.location_, vectors * np.sqrt(np.clip(values, 0, None))


def threshold(distance):
    """The distance above which a frame is not a scan the model knows, from validation frames' distances."""
    return MARGIN * float(np.quantile(distance, QUANTILE))


def held_out_flagged(distance, groups):
    """The share of validation frames a threshold would flag when set, as fit() sets it, on the other half of
    the validation groups (two halves, each thresholding the other): an estimate for new subjects that does
    not score the frames the threshold came from. None with a single group."""
    unique = np.unique(groups)
    if len(unique) < 2:
        return None
    first = np.isin(groups, unique[::2])
    flagged = [np.count_nonzero(distance[~half] > threshold(distance[half])) for half in (first, ~first)]
    return sum(flagged) / len(distance)


def fit(net, train_images, val_images, val_groups, tta="hflip", batch_size=32):
    """The network with its `ood` output fitted (training frames' Gaussian, validation frames' threshold), and
    what the fit found, for its settings.json."""
    mean, whitening = gaussian(features(net, train_images, tta, batch_size))
    distance = distances(features(net, val_images, tta, batch_size), mean, whitening)
    report = {
        "features": len(mean),
        "train_frames": len(train_images),
        "threshold_frames": len(val_images),
        "threshold_distance": threshold(distance),
        "held_out_flagged": held_out_flagged(distance, np.asarray(val_groups)),
    }
    return model.with_ood(net, mean, whitening, report["threshold_distance"]), report
