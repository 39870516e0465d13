"""int8 models for the CPUs on ultrasound carts: static quantisation of an exported ONNX artefact with ONNX
Runtime's tools, calibrated on the run's training frames, and the check that decides whether it is kept.

What is quantised: the convolutions of the U-Net's trunk (encoder, bottleneck and decoder), weights int8 per
output channel, activations uint8 per tensor (the pair that int8 dot-product instructions multiply), their ranges
from CALIBRATION_FRAMES training frames (min-max), in ONNX's QDQ format. What stays float32: the 1x1 convolution
that gives the mask's probabilities and the presence head, whose outputs are compared with tuned thresholds,
and the out-of-distribution whitening; they are a small part of the work. int8 pays only where the CPU
multiplies int8 in its vector units (x86's AVX-512 VNNI, AVX-VNNI or AMX, Arm's dot product); elsewhere ONNX
Runtime's int8 convolutions are slower than float32, so export.py refuses it there.
"""

import statistics
import time

from nerve.common import UserError, cpu_flags, read_settings

import numpy as np

from nerve import deploy, inference, store
from nerve.checkpoint import read_run
from nerve.metrics import leaderboard_dice

CALIBRATION_FRAMES = 128
CHECK_FRAMES = 400  # validation frames an int8 artefact is checked on, at most
# the dot-product instructions by the names Linux gives their flags
DOT_PRODUCT = {
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "amx_int8": "AMX",
    "asimddp": "Arm dot product",
}
MAX_DICE_LOSS = 0.01  # an int8 artefact whose validation Dice falls further below float32's is not kept
# nor one whose out-of-distribution flag differs from float32's on more of the validation frames: the 2% of a new
# subject's frames a user can bear to see called unknown (quantisation moves the pooled features, and where few
# training frames fitted the Gaussian its whitening magnifies that)
MAX_FLAGS_DIFFER = 0.02


def dot_product_instructions():
    """The int8 dot-product instruction sets of this CPU (empty where it has none), or None where it cannot be
    told."""
    flags = cpu_flags()
    return None if flags is None else [name for flag, name in DOT_PRODUCT.items() if flag in flags]


def float_convolutions(model):
    """The names of the convolutions kept in float32: those the mask's probabilities come straight from (a Sigmoid
    follows them) and those that do not lead to the mask at all (the presence head)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    mask_output = next(o.name for o in model.graph.output if o.name.startswith("mask"))
    toward_mask, todo = set(), [mask_output]
    while todo:  # every node the mask output depends on
        node = producer.get(todo.pop())
        if node is not None and node.name not in toward_mask:
            toward_mask.add(node.name)
            todo.extend(node.input)
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "Conv"
        and (
            node.name not in toward_mask
            or any(c.op_type == "Sigmoid" for out in node.output for c in consumers.get(out, []))
        )
    ]


def quantize(source, target, frames, size):
    """Write the int8 copy of the ONNX model at `source` to `target`, its activation ranges from gray uint8
    `frames` (any sizes) at the model's input size."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(f"prepared-{target.name}")
    # batch norm folded into the convolutions first, so that the folded weights are what is quantised
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    name = model.graph.input[0].name

    class Frames(CalibrationDataReader):
        def __init__(self):
            self.left = iter(frames)

        def get_next(self):
            frame = next(self.left, None)
            return None if frame is None else {name: deploy.model_input(frame, size)}

    quantize_static(
        str(prepared),
        str(target),
        Frames(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "ConvTranspose"],
        nodes_to_exclude=float_convolutions(model),
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    prepared.unlink()


def latencies(runs, x, rounds=3, repeats=10):
    """Each run's median time of run(x) in ms, measured in turns so that a busy moment of the machine weighs on
    all of them alike, after two warm-up calls each."""
    times = {kind: [] for kind in runs}
    for run in runs.values():
        run(x), run(x)
    for _ in range(rounds):
        for kind, run in runs.items():
            for _ in range(repeats):
                start = time.perf_counter()
                run(x)
                times[kind].append(time.perf_counter() - start)
    return {kind: 1e3 * statistics.median(t) for kind, t in times.items()}


def compare(runs, frames, truth, size, specs, names, ood_threshold):
    """An int8 artefact against its float32 original on labelled frames: runs = {"fp32": f, "int8": g}, each
    (n, h, w, 1) float32 -> (mask, present, ood). Per structure the Dice of each against the truth (frames that
    show it) and between the two (frames where either draws it); the largest presence difference, the share of
    frames whose out-of-distribution flag differs, and each one's single-frame latency."""
    labels, present, flags = {}, {}, {}
    for kind, run in runs.items():
        outputs = [run(deploy.model_input(frame, size)) for frame in frames]
        present[kind] = np.concatenate([p for _, p, _ in outputs])
        flags[kind] = deploy.unknown(np.concatenate([o for *_, o in outputs]), ood_threshold)
        # the masks before the flag, which is compared on its own
        labels[kind] = [deploy.labels(m[0], p[0], specs, frame.shape) for frame, (m, p, _) in zip(frames, outputs)]
    figures = {"frames": len(frames), "structures": {}}
    for k, name in enumerate(names):
        drawn = {kind: [m == k + 1 for m in maps] for kind, maps in labels.items()}
        dice = {
            f"dice_{kind}": [
                leaderboard_dice(t[None] == k + 1, m[None])[0] for t, m in zip(truth, masks) if np.any(t == k + 1)
            ]
            for kind, masks in drawn.items()
        }
        pairs = [(a, b) for a, b in zip(drawn["fp32"], drawn["int8"]) if a.any() or b.any()]
        dice["dice_between"] = [leaderboard_dice(a[None], b[None])[0] for a, b in pairs]
        figures["structures"][name] = {key: float(np.mean(d)) if d else None for key, d in dice.items()}
    figures["presence_max_difference"] = float(np.abs(present["fp32"] - present["int8"]).max())
    figures["ood_flags_differ"] = float(np.mean(flags["fp32"] != flags["int8"]))
    timed = latencies(runs, deploy.model_input(frames[0], size))
    return {**figures, **{f"latency_ms_{kind}": ms for kind, ms in timed.items()}}


def shortfalls(figures):
    """Why an int8 artefact is not kept: a validation Dice more than MAX_DICE_LOSS below float32's, an
    out-of-distribution flag that differs on more than MAX_FLAGS_DIFFER of the frames, or no speed gained."""
    found = [
        f"{name} Dice {f['dice_int8']:.3f} against float32's {f['dice_fp32']:.3f}"
        for name, f in figures["structures"].items()
        if f["dice_fp32"] is not None and f["dice_int8"] < f["dice_fp32"] - MAX_DICE_LOSS
    ]
    if figures["ood_flags_differ"] > MAX_FLAGS_DIFFER:
        found.append(
            f"its out-of-distribution flag differs from float32's on {figures['ood_flags_differ']:.1%} of the frames"
        )
    if figures["latency_ms_int8"] >= figures["latency_ms_fp32"]:
        found.append(f"{figures['latency_ms_int8']:.1f} ms a frame against float32's {figures['latency_ms_fp32']:.1f}")
    return found


def run_frames(results):
    """(training frames to calibrate on, validation frames to check on, their label maps): the first model's
    training and held-out frames, at most CALIBRATION_FRAMES and CHECK_FRAMES of each, evenly spaced."""
    run = read_run(results)
    where = run[0]["arrays"] if run else None
    try:
        arrays = store.load_arrays(where, ("train_images", "train_masks", "train_ids", "train_sizes"))
    except (UserError, TypeError):  # TypeError: a run without a record
        raise UserError(
            f"--quantize int8 calibrates on the run's training frames, but the arrays train.py used ({where}) "
            f"cannot be read: rebuild them with data.py where run.json says"
        ) from None
    frames, labels = store.frames(arrays, "train_images"), store.frames(arrays, "train_masks")
    held_out = np.isin(arrays["train_ids"], read_settings(inference.model_dirs(results)[0])["val_ids"])

    def spread(rows, n):
        return rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)] if len(rows) else rows

    train, val = spread(np.flatnonzero(~held_out), CALIBRATION_FRAMES), spread(np.flatnonzero(held_out), CHECK_FRAMES)
    return [frames[i] for i in train], [frames[i] for i in val], [labels[i] for i in val]


def int8_artefact(results, artefact, size, specs, names):
    """Replace the ONNX `artefact` by its int8 copy, calibrated and checked on the run's frames; return the check's
    figures. Refused where this CPU lacks int8 dot-product instructions or the copy fails the check."""
    found = dot_product_instructions()
    if found == []:
        wanted = ", ".join(DOT_PRODUCT.values())
        raise UserError(
            f"this CPU has no int8 dot-product instructions ({wanted}): an int8 model would run slower here than "
            f"float32. Export without --quantize, or on the machine that will run it"
        )
    calibration, frames, truth = run_frames(results)
    target = artefact.with_name(f"int8-{artefact.name}")
    quantize(artefact, target, calibration, size)
    runs = {"fp32": inference.runner("onnx", artefact), "int8": inference.runner("onnx", target)}
    figures = compare(runs, frames, truth, size, specs, names, deploy.OOD_THRESHOLD)
    missed = shortfalls(figures)
    if missed:
        raise UserError(f"the int8 model is not kept (checked on {len(frames)} validation frames): {'; '.join(missed)}")
    target.replace(artefact)
    return {**figures, "calibration_frames": len(calibration), "instructions": found or ["not known"]}


def summary(figures):
    """The int8 check in one line."""
    dice = ", ".join(
        f"{name} Dice {f['dice_fp32']:.3f} -> {f['dice_int8']:.3f} (between the two {f['dice_between']:.3f})"
        for name, f in figures["structures"].items()
        if f["dice_fp32"] is not None
    )
    speed = figures["latency_ms_fp32"] / figures["latency_ms_int8"]
    return (
        f"int8 on {figures['frames']} validation frames: {dice}; out-of-distribution flags differ on "
        f"{figures['ood_flags_differ']:.1%}; {figures['latency_ms_int8']:.1f} ms a frame against float32's "
        f"{figures['latency_ms_fp32']:.1f} ({speed:.2f}x; {', '.join(figures['instructions'])})"
    )
