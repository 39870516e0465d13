"""What a reader opens: results/report.html, one self-contained page of an evaluation (the headline figures with
their intervals beside the labels' own agreement, the detection counts, a per-group plot, the ROC curve, the
worst cases, the run's settings and data), and MODEL_CARD.md, what a trained model is, from what, how good."""

import base64
import csv
import dataclasses
import html
import json
import platform
import subprocess
from datetime import date
from pathlib import Path

from nerve.common import (
    DUPLICATES_FILE,
    EVALUATION_FILE,
    MANIFEST,
    MODEL_CARD_FILE,
    REPORT_FILE,
    atomic_path,
    read_settings,
)

import keras
import numpy as np

from nerve import store
from nerve.cases import CANNOT, span
from nerve.config import RunConfig
from nerve.figures import per_group_figure, png_bytes, roc_figure
from nerve.inference import model_dirs
from nerve.metrics import structure_presence

# The field's figures a reader compares with (19-expert study of ultrasound-guided regional anaesthesia)
EXPERT_AGREEMENT = {"nerve": 0.48, "artery": 0.88}
PAGE_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    ".facts td{text-align:left;max-width:700px;overflow-wrap:anywhere}"
    "pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:12px}.note{color:#555;font-size:14px}"
)


def label_agreement(results):
    """The labels' agreement with themselves: the mean Dice of the near-duplicate frame pairs that duplicates.py
    found where both masks mark something, and how many pairs; None where it has not run."""
    path = Path(results) / DUPLICATES_FILE
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        dice = [float(r["dice"]) for r in csv.DictReader(f) if int(r["area_a"]) and int(r["area_b"])]
    return {"dice": float(np.mean(dice)), "pairs": len(dice)} if dice else None


def _image(png):
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header, rows, kind="figures"):
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class={kind}><tr>{cells}</tr>{body}</table>"


def _figure_rows(summary):
    for name, s in summary.items():
        for key, f in s["figures"].items():
            if f["value"] is None:
                yield [name, key, "n/a", f"cannot be measured: {CANNOT.get(key, 'no image to score')}", 0]
            else:
                yield [name, key, f"{f['value']:.3f}", span(f), f["images"]]


def _unit_note(rows):
    distance = next((k for k in rows[0] if k.startswith("hd95_")), "hd95_px") if rows else "hd95_px"
    if distance.endswith("_mm"):
        return distance, "Distances and areas in mm, from each image's pixel spacing."
    return distance, (
        "Distances in pixels at each image's own size: the pixel spacing of this set is not known (give data.py "
        "--spacing, or a spacing column in its --groups CSV, for mm)."
    )


def write_html(results, evaluated, report, worst_png, about):
    """results/report.html of a report (cases.summary's figures and report["cases"]' rows), with the worst cases'
    PNG and `about` (the run's settings, the data's manifest) embedded; its path."""
    rows, summary, names = report["cases"], report["summary"], report["structures"]
    distance, unit_note = _unit_note(rows)
    agreement = label_agreement(results)
    ceiling = ", ".join(f"{k} {v:.2f}" for k, v in EXPERT_AGREEMENT.items())
    own = (
        f"These labels agree with themselves at Dice {agreement['dice']:.3f} over {agreement['pairs']} "
        "near-duplicate frame pairs (duplicates.py)."
        if agreement
        else "Run duplicates.py to measure these labels' agreement with themselves."
    )
    counts = [[n, *s["frames"].values(), s["images"], s["groups"]] for n, s in summary.items()]
    parts = [
        f"<h1>Evaluation: {html.escape(str(evaluated))}</h1>",
        f"<p class=note>{date.today()}; {', '.join(names)}; {len(rows) // max(len(names), 1)} images in "
        f"{next(iter(summary.values()))['groups'] if summary else 0} groups. {unit_note}</p>",
        "<h2>Headline figures</h2>",
        "<p class=note>Means with 95% bootstrap intervals that resample groups (subjects), not frames. Dice and "
        "NSD over the images that show the structure; HD95 and ASSD over those that show it and got a mask (the "
        "misses are in the sensitivity); detection rates frame by frame at the tuned gate.</p>",
        _table(["structure", "figure", "value", "95% interval", "images"], _figure_rows(summary)),
        f"<p class=note>Experts agree with each other at Dice {ceiling} (19-expert ultrasound-guided regional "
        f"anaesthesia study). {own}</p>",
        "<h2>Detection at the gate</h2>",
        _table(["structure", "found", "missed", "false alarms", "correctly empty", "images", "groups"], counts),
        "<h2>Per group</h2>",
        _image(png_bytes(per_group_figure(rows, names, distance))),
        "<h2>Presence: ROC curve</h2>",
        _image(png_bytes(roc_figure(rows, names, summary))),
        "<h2>Worst cases</h2>",
        _image(Path(worst_png).read_bytes()),
        "<h2>All figures</h2>",
        f"<pre>{html.escape(report['table'])}</pre>",
        "<h2>Run and data</h2>",
        _table(["setting", "value"], sorted(about["settings"].items()), "facts"),
        _table(["data", "value"], sorted(about["data"].items()), "facts"),
        f"<p class=note>Every image: {html.escape(str(Path(results) / 'cases.csv'))}.</p>",
    ]
    page = f"<!doctype html><html><head><meta charset=utf-8><title>Evaluation</title><style>{PAGE_STYLE}</style>"
    page += f"</head><body>{''.join(parts)}</body></html>\n"
    path = Path(results) / REPORT_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path


def data_facts(arrays_dir, arrays, names):
    """What the report and the model card say of the arrays a model was trained or evaluated on: the layout and
    folder they came from, how many images and groups, the typical size, how many images lack each structure."""
    manifest = store.read_manifest(arrays_dir) if (Path(arrays_dir) / MANIFEST).exists() else {}
    source = manifest.get("source", {})
    present = structure_presence(store.frames(arrays, "train_masks"), len(names))
    return {
        "layout": source.get("layout", "unknown"),
        "input": source.get("input", str(arrays_dir)),
        "train": int(len(arrays["train_ids"])),
        "groups": int(len(np.unique(np.asarray(arrays["train_subjects"]).astype(str)))),
        "typical_size": "x".join(map(str, store.typical_size(arrays["train_sizes"]))),
        "lacking": {name: int((~present[:, k]).sum()) for k, name in enumerate(names)},
    }


def about(results, arrays_dir, arrays):
    """What a report says of its run and data: the run's settings (config.RunConfig's, as its first model
    stored them) and data_facts() of the arrays."""
    settings = read_settings(model_dirs(results)[0])
    shown = {f.name: settings[f.name] for f in dataclasses.fields(RunConfig) if f.name in settings}
    return {"settings": shown, "data": data_facts(arrays_dir, arrays, settings["structures"])}


def versions():
    """What a result was made with: the project's commit where it is a git checkout, Keras and its backend."""
    try:
        here = Path(__file__).parent
        git = ["git", "rev-parse", "--short", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True, cwd=here, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {
        "project_commit": commit or "unknown",
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def model_card(results):
    """The model card of the run in results/ as a dict (in the spirit of MONAI bundles' metadata.json): what it
    segments and from what images, the training data, the cross-validated figures with intervals, what its gate
    was validated on, its inputs and outputs, versions; from its first model's settings and evaluation.json."""
    settings = read_settings(model_dirs(results)[0])
    path = Path(results) / EVALUATION_FILE
    evaluation = json.loads(path.read_text()) if path.is_file() else {}
    names, data = settings["structures"], evaluation.get("data", {})
    lacking = data.get("lacking", {})
    gate = {}
    for name in names:
        on = evaluation.get("tuned_on", {}).get(name)
        if settings.get("postprocess") != "tuned" or not on:
            gate[name] = "the default gate (--postprocess fixed, or not evaluated)"
            continue
        rows = f"{on['rows']} held-out frames and crop views ({on['crop_views']} views), {on['without']} without {name}"
        gate[name] = (
            f"the default gate: {rows}, too few without it to tune one on"
            if name in evaluation.get("default_gate", [])
            else f"tuned out of fold on {rows}"
        )
    return {
        "task": f"segment {', '.join(names)} in grayscale B-mode ultrasound images, and say where none is shown",
        "modality": "ultrasound (B-mode, grayscale)",
        "images": {
            "layout": data.get("layout", "unknown"),
            "folder": data.get("input", "unknown"),
            "typical_size": data.get("typical_size"),
            "scanner": data.get("scanner", "not recorded"),
            "region": data.get("region", "not recorded"),
        },
        "training_data": {"images": data.get("train"), "groups": data.get("groups"), "lacking_each": lacking},
        "cross_validated": evaluation.get("summary", {}),
        "evaluated_on": evaluation.get("evaluated"),
        "gate": gate,
        "out_of_distribution": "a distance in the bottleneck's features, thresholded on the validation subjects' "
        "frames: an image above it gets no mask and is reported as not a scan the model knows",
        "not_validated_on": "other anatomy, scanners or presets than the training data's, unless evaluated with "
        "evaluate.py --labelled; it has not been tested in clinical use",
        "inputs": "one grayscale image (H, W) uint8 at any size, resized to the network's "
        f"{settings['size'][0]}x{settings['size'][1]} inside",
        "outputs": "per structure a probability map and a presence probability, an out-of-distribution score, "
        "and after the tuned gate a label map at the image's own size",
        "network": f"two-headed U-Net, {settings['base_filters']} base filters, depth {settings['depth']}",
        "versions": versions(),
    }


def card_markdown(fields):
    """MODEL_CARD.md's text from model_card()."""
    lines = ["# Model card", "", fields["task"] + ".", ""]
    for key in ("modality", "network", "artefact", "inputs", "outputs", "out_of_distribution", "not_validated_on"):
        if key in fields:
            lines.append(f"- **{key.replace('_', ' ')}**: {fields[key]}")
    lines += ["", "## Images and training data", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in {**fields["images"], **fields["training_data"]}.items()]
    lines += ["", f"## Figures ({fields['evaluated_on'] or 'not evaluated'}), 95% intervals over groups", ""]
    for name, s in fields["cross_validated"].items():
        for key, f in s["figures"].items():
            value = "n/a" if f["value"] is None else f"{f['value']:.3f} ({span(f)})"
            lines.append(f"- {name} {key}: {value}, {f['images']} images")
    lines += ["", "## The gate", ""] + [f"- {name}: {text}" for name, text in fields["gate"].items()]
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in fields["versions"].items()]
    return "\n".join(lines) + "\n"


def write_card(folder, fields):
    """MODEL_CARD.md in `folder`, atomically; its path."""
    path = Path(folder) / MODEL_CARD_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(card_markdown(fields))
    return path
