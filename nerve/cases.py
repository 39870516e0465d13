"""Results per case, and the figures a paper reads off them: cases.csv (each image and structure: its presence,
the mask shown after the gate, Dice, IoU, boundary distances, areas), detection rates at the gate, and 95%
intervals from a bootstrap that resamples groups (subjects), never frames: frames of one subject are
near-duplicates, and resampling them would make the intervals too narrow. Conventions: docs/metrics.md."""

import csv
from pathlib import Path

from nerve.common import CASES_FILE, atomic_path

import numpy as np

from nerve.deploy import apply, full_size, unknown
from nerve.metrics import boundary_scores, dice_from_counts, pixel_counts

# NSD's tolerance where it is not given: in mm where every image's spacing is known, else in pixels
NSD_TOLERANCE = {"mm": 2.0, "px": 10.0}
# why a figure has no value on a set
CANNOT = {"specificity": "no image lacks it", "ppv": "no mask drawn", "npv": "no image left empty"}
RESAMPLES = 2000  # bootstrap resamples of the groups
CONFIDENCE = 0.95
SEED = 0  # the bootstrap's random stream: the same intervals on every run


def unit_of(spacing):
    """'mm' where every image's spacing is known, else 'px' (each image's own pixels)."""
    return "mm" if len(spacing) and np.isfinite(spacing).all() else "px"


def columns(unit, tolerance):
    """The names of the boundary columns, which carry their unit (and NSD its tolerance)."""
    return f"hd95_{unit}", f"assd_{unit}", f"nsd_{tolerance:g}{unit}"


def case_rows(probs, present, ood, truth, specs_of, ids, groups, spacing, names, tolerance=None):
    """One row per image and structure: probabilities (n, h, w, K) at the model's size and presence (n, K) against
    label maps `truth` at each image's own size, image i post-processed with specs_of(i) (one spec per
    structure); spacing (n, 2) in mm per pixel (nan: unknown, and then every distance is in pixels)."""
    unit = unit_of(spacing)
    tolerance = NSD_TOLERANCE[unit] if tolerance is None else tolerance
    hd95, assd, nsd = columns(unit, tolerance)
    rows = []
    for i, image_id in enumerate(ids):
        labels = np.asarray(truth[i])
        step = tuple(spacing[i]) if unit == "mm" else (1.0, 1.0)
        prob = full_size(probs[i], labels.shape).reshape(*labels.shape, -1)
        for s, (name, spec) in enumerate(zip(names, specs_of(i))):
            mask = apply(prob[None, ..., s], present[i, s : s + 1], spec)[0] > 0
            true = labels == s + 1
            (tp,), (fp,), (fn,) = pixel_counts(true[None], mask[None])
            boundary = boundary_scores(true, mask, step, tolerance)
            row = {
                "id": image_id,
                "group": groups[i],
                "structure": name,
                "truth_present": bool(true.any()),
                "presence": float(present[i, s]),
                "shown": bool(mask.any()),
                "flagged_unknown": bool(unknown(ood[i])),
                "dice": float(dice_from_counts(tp, fp, fn)),
                "iou": float(tp / (tp + fp + fn)) if tp + fp + fn else 1.0,
                hd95: boundary["hd95"],
                assd: boundary["assd"],
                nsd: boundary["nsd"],
                "predicted_area_px": int(tp + fp),
                "true_area_px": int(tp + fn),
            }
            if unit == "mm":
                pixel = step[0] * step[1]
                row.update(predicted_area_mm2=(tp + fp) * pixel, true_area_mm2=(tp + fn) * pixel)
            rows.append(row)
    return rows


def write_csv(results, rows):
    """results/cases.csv, atomically; its path."""
    path = Path(results) / CASES_FILE
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["id"])
        out.writeheader()
        out.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return path


def interval(values, included, groups, rng):
    """The mean of values[included] with its bootstrap interval over groups: {value, low, high, images}, value
    None where nothing is included, low and high None where one group holds them all (no spread to resample).
    Each resample draws the groups with replacement and takes the mean over
    the included images of the groups drawn (scipy's bootstrap resamples observations, not clusters)."""
    values, included = np.asarray(values, np.float64), np.asarray(included, bool)
    n = int(included.sum())
    if not n:
        return {"value": None, "low": None, "high": None, "images": 0}
    _, group = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    sums = np.bincount(group, np.where(included, values, 0.0))
    counts = np.bincount(group, included.astype(float))
    value = float(sums.sum() / counts.sum())
    if np.count_nonzero(counts) < 2:
        return {"value": value, "low": None, "high": None, "images": n}
    draws = rng.integers(0, len(sums), (RESAMPLES, len(sums)))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)  # nan: a resample without such images
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.nanpercentile(means, [tail, 100 - tail])
    return {"value": value, "low": float(low), "high": float(high), "images": n}


def span(figure, digits=3):
    """A figure's interval as text: 'low - high', or why there is none."""
    if figure["low"] is None:
        return "one group: none"
    return f"{figure['low']:.{digits}f} - {figure['high']:.{digits}f}"


def summary(rows, names):
    """Per structure: the headline figures with their intervals (Dice and NSD over the images that show it,
    HD95 and ASSD over those that show it and got a mask, the detection rates), the frame counts at the gate
    (true/false positives and negatives) and the number of groups."""
    out = {}
    for name in names:
        mine = [r for r in rows if r["structure"] == name]
        if not mine:
            continue
        rng = np.random.default_rng(SEED)
        groups = [r["group"] for r in mine]
        truth, shown = (np.array([r[k] for r in mine], bool) for k in ("truth_present", "shown"))
        hd95, assd, nsd = (k for k in mine[0] if k.startswith(("hd95_", "assd_", "nsd_")))
        column = {k: np.array([r[k] for r in mine], np.float64) for k in ("dice", hd95, assd, nsd)}
        figures = {
            "dice_nonempty": (column["dice"], truth),
            hd95: (column[hd95], truth & shown),
            assd: (column[assd], truth & shown),
            nsd: (column[nsd], truth),
            "sensitivity": (shown, truth),
            "specificity": (~shown, ~truth),
            "ppv": (truth, shown),
            "npv": (~truth, ~shown),
        }
        out[name] = {
            "figures": {key: interval(v, inc, groups, rng) for key, (v, inc) in figures.items()},
            "frames": {
                "true_positive": int((truth & shown).sum()),
                "false_negative": int((truth & ~shown).sum()),
                "false_positive": int((~truth & shown).sum()),
                "true_negative": int((~truth & ~shown).sum()),
            },
            "images": len(mine),
            "groups": len(set(map(str, groups))),
        }
    return out


def headline_table(summary):
    """The headline figures with their 95% intervals as plain text, one line per structure and figure; a figure
    that cannot be measured on the set says why."""
    lines = [f"{'structure':>10}  {'figure':>14}  {'value':>8}  {'95% interval':>17}  {'images':>6}  groups"]
    for name, s in summary.items():
        for key, f in s["figures"].items():
            if f["value"] is None:
                why = CANNOT.get(key, "no image to score")
                lines.append(f"{name:>10}  {key:>14}  {'n/a':>8}  {'(' + why + ')':>17}  {0:>6}  {s['groups']}")
                continue
            lines.append(f"{name:>10}  {key:>14}  {f['value']:>8.3f}  {span(f):>17}  {f['images']:>6}  {s['groups']}")
    return "\n".join(lines)


def detection_line(summary):
    """The frame counts at the gate, in one sentence per structure."""
    said = []
    for name, s in summary.items():
        f = s["frames"]
        said.append(
            f"{name}: found in {f['true_positive']} of {f['true_positive'] + f['false_negative']} frames that show "
            f"it, drawn on {f['false_positive']} of {f['false_positive'] + f['true_negative']} that do not"
        )
    return "; ".join(said)
