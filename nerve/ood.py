"""The out-of-distribution score: how far an image lies from the frames a model was trained on, in the model's own
features, so that a scan of other anatomy or from an unknown machine reads "not a scan this model knows".

The score is the Mahalanobis distance of the image's features, averaged over the image at every level of
the encoder and at the bottleneck, from the Gaussian of the training frames' (Lee et al., 2018, "A simple
unified framework for detecting out-of-distribution samples", whose feature ensemble takes several levels:
a scan of other anatomy differs in texture at the top as much as in anatomy at the bottom), its covariance
shrunk by Ledoit-Wolf, since several hundred channels are estimated from a few hundred to a few thousand
frames. It needs no data but the training frames and no change to training, and it lives in the network as
built-in layers (model.with_ood), so every export computes it.

The threshold is a margin times the QUANTILE of the validation frames' distances (subjects held out from
training): the frames a network was trained on lie closer to its features than a new subject's do, so a
threshold taken from them would flag most frames of a new subject; and subjects differ from each other more
than the frames of one, so the 99th percentile of some subjects flags a few percent of another's frames. The
margin is the smallest of MARGINS that keeps false alarms on subjects it has not seen at FALSE_ALARMS,
estimated by leaving each validation subject out in turn (its frames against the threshold of the others): a
set whose subjects look alike gets a tight threshold, one whose subjects differ a looser one, from the
in-distribution frames alone, never from scans of other anatomy. The network's `ood` output is the distance
over the threshold: above deploy.OOD_THRESHOLD (1) an image is "not a scan this model knows".
"""

import keras
import numpy as np
from sklearn.covariance import LedoitWolf

from nerve import model
from nerve.inference import VIEWS, network_outputs

QUANTILE = 0.99  # of the validation frames' distances, times a margin: the threshold
# the candidates, smallest first: at least 10% above the 99th percentile, since a few validation subjects that
# happen to look alike would otherwise set a threshold that flags a few percent of the next subject's frames
MARGINS = np.round(np.arange(1.1, 1.51, 0.05), 2)
FALSE_ALARMS = 0.01  # the share of a new subject's frames a threshold may flag, half the 2% a user can bear
MARGIN = 1.25  # with a single validation group, which cannot be left out


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


def margin(distance, groups):
    """The smallest of MARGINS at which the threshold of all validation groups but one flags at most FALSE_ALARMS of
    the left-out group's frames, over all groups left out in turn; the largest where none does, MARGIN with a
    single group."""
    unique = np.unique(groups)
    if len(unique) < 2:
        return MARGIN
    others = {g: float(np.quantile(distance[groups != g], QUANTILE)) for g in unique}
    for m in MARGINS:
        flagged = sum(np.count_nonzero(distance[groups == g] > m * others[g]) for g in unique)
        if flagged <= FALSE_ALARMS * len(distance):
            return float(m)
    return float(MARGINS[-1])


def threshold(distance, groups):
    """The distance above which a frame is not a scan the model knows, from validation frames' distances and
    their groups."""
    return margin(distance, groups) * float(np.quantile(distance, QUANTILE))


def held_out_flagged(distance, groups):
    """The share of validation frames a threshold would flag when set, as fit() sets it (its margin included), on
    the other half of the validation groups (two halves, each thresholding the other): an estimate for new
    subjects that does not score the frames the threshold came from. None with a single group."""
    unique = np.unique(groups)
    if len(unique) < 2:
        return None
    first = np.isin(groups, unique[::2])
    flagged = [np.count_nonzero(distance[~half] > threshold(distance[half], groups[half])) for half in (first, ~first)]
    return sum(flagged) / len(distance)


def fit(net, train_images, val_images, val_groups, tta="hflip", batch_size=32):
    """The network with its `ood` output fitted (training frames' Gaussian, validation frames' threshold), and
    what the fit found, for its settings.json."""
    mean, whitening = gaussian(features(net, train_images, tta, batch_size))
    distance = distances(features(net, val_images, tta, batch_size), mean, whitening)
    groups = np.asarray(val_groups)
    report = {
        "features": len(mean),
        "train_frames": len(train_images),
        "threshold_frames": len(val_images),
        "margin": margin(distance, groups),
        "threshold_distance": threshold(distance, groups),
        "held_out_flagged": held_out_flagged(distance, groups),
    }
    return model.with_ood(net, mean, whitening, report["threshold_distance"]), report
