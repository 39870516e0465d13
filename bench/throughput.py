"""Training and inference throughput of the default model, against the machine's matrix-multiply peak.

    python -m bench.throughput --quick     # one size, a few batches
    python -m bench.throughput             # 64x80, 96x128 and 128x160 in fp32; bf16 at 64x80
    python -m bench.throughput --grid      # every --sizes x --precisions x --batches (for GPUs: bench/gpu_check.py)

For each input size: training images/second without augmentation and with the augmentation workers
(augment_ratio: with / without, same run), the model's FLOPs per training image counted from its
convolutions (forward x3 for forward + backward), the GFLOP/s that makes, and inference images/second.
The dense float32 matrix-multiply GFLOP/s of this machine is measured in the same run;
train_flops_ratio = achieved / matmul at the default size. conv_only_flops_ratio is the same for the
network with batch norm, ELU and dropout taken out, in the same run: how much of the gap to the matmul
peak is the convolutions' own and how much the layers between them. conv_kernel_flops_ratio is two
3x3 convolutions alone at one of the network's inner shapes (128 channels, a quarter of the input's
side): the ceiling the backend's convolution kernels put on any network made of them. Runs under any
KERAS_BACKEND.
"""

import time
from pathlib import Path

from nerve.common import arg_parser

import keras
import numpy as np

from bench.accuracy import device
from nerve import augment
from nerve import model as unet
from nerve.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_SIZE = (96, 128)


def forward_flops(net):
    """Multiply-adds x2 of every convolution for one image (batch norm and activations left out: <2%)."""
    total = 0
    for layer in net.layers:
        if isinstance(layer, keras.layers.Conv2DTranspose):
            _, h, w, cin = layer.input.shape
            total += 2 * h * w * cin * layer.filters * np.prod(layer.kernel_size)
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, cout = layer.output.shape
            total += 2 * h * w * cout * layer.input.shape[-1] * np.prod(layer.kernel_size)
    return float(total)


def matmul_gflops(n=2048, repeats=10, trials=3, dtype="float32"):
    """Best of a few timed runs of dense matrix products in the Keras backend."""
    a = keras.ops.convert_to_tensor(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), dtype)
    keras.ops.convert_to_numpy(keras.ops.matmul(a, a))
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            c = keras.ops.matmul(a, a)
        keras.ops.convert_to_numpy(c)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


class PassThrough(keras.layers.Layer):
    """Returns its input; takes the call arguments of the layer it replaces (batch norm has a mask)."""

    def call(self, x, training=None, mask=None):
        return x


def convolutions_only(net):
    """The same network with batch norm, ELU and dropout replaced by identities: the same FLOPs."""

    def keep_convolutions(layer):
        between = (keras.layers.BatchNormalization, keras.layers.Dropout, unet.PerImageStandardization)
        if isinstance(layer, between) or layer.name.endswith("_elu"):
            return PassThrough(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(net, clone_function=keep_convolutions)


def conv_pair_gflops(size, channels, batch_size, steps=20):
    """Training GFLOP/s of two stacked 3x3 convolutions alone, at one of the network's inner shapes: the
    ceiling the backend's convolution kernels set, whatever the layers around them cost."""
    net = keras.Sequential(
        [
            keras.Input((*size, channels)),
            keras.layers.Conv2D(channels, 3, padding="same"),
            keras.layers.Conv2D(channels, 3, padding="same"),
        ]
    )
    net.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).standard_normal((batch_size * steps, *size, channels)).astype(np.float32)
    net.fit(x[:batch_size], x[:batch_size], batch_size=batch_size, verbose=0)
    start = time.perf_counter()
    net.fit(x, x, batch_size=batch_size, verbose=0)
    per_layer = 2 * np.prod(size) * channels * channels * 9
    # forward and weight gradient for both, input gradient only for the second (the input needs none)
    return 5 * per_layer * len(x) / (time.perf_counter() - start) / 1e9


def compiled_model(size, convolutions=False, base_filters=32, depth=4):
    net = unet.build_model((*size, 1), base_filters, depth, mean=100.0, std=50.0)
    net = convolutions_only(net) if convolutions else net
    net.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss={"mask": unet.dice_loss, "present": "binary_crossentropy"},
        loss_weights={"mask": 1.0, "present": 0.5},
    )
    return net


def train_rate(net, images, masks, batch_size, augmented):
    """Training images/second over one timed epoch after a warm-up; the same two worker threads either way,
    so the ratio isolates what augmentation costs."""
    batches = augment.AugmentedBatches(images, masks, batch_size, augment=augmented, workers=2)
    net.fit(batches, epochs=1, steps_per_epoch=2, verbose=0)
    start = time.perf_counter()
    net.fit(batches, epochs=1, verbose=0)
    return len(images) / (time.perf_counter() - start)


def inference_rate(net, images, batch_size=64):
    x = images[..., None].astype(np.float32)
    net.predict(x[:batch_size], batch_size=batch_size, verbose=0)
    start = time.perf_counter()
    net.predict(x, batch_size=batch_size, verbose=0)
    return len(x) / (time.perf_counter() - start)


def fake_data(n, size, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *size), dtype=np.uint8)
    masks = np.zeros((n, *size), np.uint8)
    masks[::2, size[0] // 3 : size[0] // 2, size[1] // 3 : size[1] // 2] = 1
    return images, masks


def grid(sizes, precisions, batches, steps, base_filters, depth):
    """Training images/second (no augmentation) at every size x precision x batch, one timed epoch of
    `steps` batches after a warm-up that compiles; then the matmul ceilings, in the same run."""
    for size in sizes:
        for precision in precisions:
            unet.set_precision(precision)
            for batch_size in batches:
                images, masks = fake_data(batch_size * steps, size)
                net = compiled_model(size, base_filters=base_filters, depth=depth)
                rate = train_rate(net, images, masks, batch_size, augmented=False)
                print(f"train_images_per_s_{size[0]}x{size[1]}_{precision}_b{batch_size}: {rate:.1f}", flush=True)
    unet.set_precision("fp32")
    big = 8192 if unet.has_accelerator() else 1024
    for dtype, name in (("float32", "fp32"), ("bfloat16", "bf16")):
        print(f"matmul_gflops_{name}: {matmul_gflops(big, repeats=5, dtype=dtype):.0f}", flush=True)


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="default size only, fewer images")
    ap.add_argument("--batch-size", type=int, default=None, help="unset: train.py's")
    ap.add_argument("--images", type=int, default=None, help="images per timed epoch; unset: 192 (quick: 64)")
    ap.add_argument("--grid", action="store_true", help="only the size x precision x batch grid below")
    ap.add_argument("--sizes", default="96x128,128x160", help="--grid: input sizes")
    ap.add_argument("--precisions", default="fp32,bf16,fp16", help="--grid: precisions")
    ap.add_argument("--batches", default="4,32,128", help="--grid: batch sizes")
    ap.add_argument("--steps", type=int, default=8, help="--grid: timed batches per configuration")
    ap.add_argument("--base-filters", type=int, default=32, help="--grid: model size")
    ap.add_argument("--depth", type=int, default=4, help="--grid: model depth")
    args = ap.parse_args()
    if args.grid:
        sizes = [tuple(map(int, s.split("x"))) for s in args.sizes.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
        grid(sizes, args.precisions.split(","), batches, args.steps, args.base_filters, args.depth)
    else:
        models(args.images or (64 if args.quick else 192), args.batch_size or RunConfig.batch_size, args.quick)
    print(f"device: {device()}")


def models(n, batch_size, quick):
    """The full model's training and inference rates at each size, against the machine's matmul peak."""
    sizes = [DEFAULT_SIZE] if quick else [(64, 80), DEFAULT_SIZE, (128, 160)]
    # bf16 at the smallest size only: where the CPU lacks native bf16 it is emulated and very slow
    runs = [(size, "fp32") for size in sizes] + ([] if quick else [((64, 80), "bf16")])
    peak = matmul_gflops()
    # measured before the full models: after them the same pair ran at half the speed (0.35 against 0.70-0.77)
    inner = (DEFAULT_SIZE[0] // 4, DEFAULT_SIZE[1] // 4)
    pair = conv_pair_gflops(inner, 128, batch_size)
    print(f"two 3x3 convolutions alone, 128 channels at {inner[0]}x{inner[1]}: {pair:.1f} GFLOP/s training")
    print(f"matmul: {peak:.0f} GFLOP/s (float32, 2048x2048); training batch {batch_size}")
    print(
        f"{'size':>8} {'precision':>9} {'GFLOP/img':>10} {'train img/s':>12} {'+augment':>9} {'GFLOP/s':>8} "
        f"{'infer img/s':>12}"
    )
    figures = {}
    for size, precision in runs:
        images, masks = fake_data(n, size)
        unet.set_precision(precision)
        net = compiled_model(size)
        flops = 3 * forward_flops(net) / 1e9
        plain = train_rate(net, images, masks, batch_size, augmented=False)
        augmented = train_rate(net, images, masks, batch_size, augmented=True)
        infer = inference_rate(net, images)
        print(
            f"{size[0]}x{size[1]:<5} {precision:>9} {flops:>10.2f} {plain:>12.1f} {augmented:>9.1f} "
            f"{plain * flops:>8.1f} {infer:>12.1f}",
            flush=True,
        )
        figures[size, precision] = {"plain": plain, "augmented": augmented, "flops": flops, "infer": infer}
    unet.set_precision("fp32")
    default = figures[DEFAULT_SIZE, "fp32"]
    images, masks = fake_data(n, DEFAULT_SIZE)
    convs = train_rate(compiled_model(DEFAULT_SIZE, convolutions=True), images, masks, batch_size, False)
    print(
        f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]:<5} {'fp32':>9} {default['flops']:>10.2f} {convs:>12.1f} {'':>9} "
        f"{convs * default['flops']:>8.1f}   convolutions only"
    )
    headline(figures, peak, convs, pair)


def headline(figures, peak, convs, pair):
    default = figures[DEFAULT_SIZE, "fp32"]
    print(f"train_images_per_s: {default['plain']:.2f}")
    print(f"infer_images_per_s: {default['infer']:.2f}")
    print(f"train_gflops: {default['plain'] * default['flops']:.1f}")
    print(f"matmul_gflops: {peak:.1f}")
    print(f"train_flops_ratio: {default['plain'] * default['flops'] / peak:.2f}")
    print(f"conv_only_flops_ratio: {convs * default['flops'] / peak:.2f}")
    print(f"conv_kernel_flops_ratio: {pair / peak:.2f}")
    print(f"augment_ratio: {default['augmented'] / default['plain']:.2f}")
    if ((64, 80), "bf16") in figures:
        print(f"bf16_speedup_64x80: {figures[(64, 80), 'bf16']['plain'] / figures[(64, 80), 'fp32']['plain']:.2f}")
    print(f"cpu_native_bf16: {unet.cpu_has_bf16()}")


if __name__ == "__main__":
    main()
