"""Training throughput of a U-Net on this machine, as a fraction of its fp32 matrix-multiply peak.

    python benchmarks/train_throughput.py [--size 256] [--depth 4] [--base-filters 32] [--batch 4]
                                          [--normalization group] [--steps 12] [--json FILE]

Feeds random in-memory tensors through tf.data (as the train stage does), times training steps after a
warm-up, counts the convolution FLOPs of the model (forward = 2 * kernel area * in * out channels * output
pixels per convolution; training ~ 3 x forward) and measures the machine's fp32 matmul rate, so the result
reads as "images/s and % of peak".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from segmenter import losses, metrics, models  # noqa: E402


def conv_forward_flops(model: keras.Model) -> float:
    """Multiply-adds x 2 of every Conv2D / Conv2DTranspose for one image."""
    total = 0.0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)):
            kernel = layer.kernel.shape  # (kh, kw, in, out) for Conv2D; (kh, kw, out, in) for transpose
            out_h, out_w = layer.output.shape[1:3]
            if isinstance(layer, keras.layers.Conv2DTranspose):
                in_h, in_w = layer.input.shape[1:3]
                total += 2.0 * kernel[0] * kernel[1] * kernel[2] * kernel[3] * in_h * in_w
            else:
                total += 2.0 * kernel[0] * kernel[1] * kernel[2] * kernel[3] * out_h * out_w
    return total


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    tf.linalg.matmul(a, b).numpy()
    started = time.perf_counter()
    for _ in range(repeats):
        c = tf.linalg.matmul(a, b)
    c.numpy()
    return 2.0 * n ** 3 * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base-filters", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--normalization", default="group")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--steps-per-execution", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    num_classes = 3
    model = models.build_model({"architecture": "unet", "depth": args.depth, "base_filters": args.base_filters,
                                "normalization": args.normalization}, (args.size, args.size, 1), num_classes)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=losses.get_loss("dice_ce", num_classes),
                  metrics=metrics.get_metrics(["background", "a", "b"]), steps_per_execution=args.steps_per_execution,
                  jit_compile=False)
    rng = np.random.default_rng(0)
    images = rng.random((args.batch * 4, args.size, args.size, 1), dtype=np.float32)
    masks = rng.integers(0, num_classes, (args.batch * 4, args.size, args.size))
    dataset = (tf.data.Dataset.from_tensor_slices((images, tf.one_hot(masks, num_classes)))
               .repeat().batch(args.batch).prefetch(tf.data.AUTOTUNE))
    model.fit(dataset, steps_per_epoch=2 * args.steps_per_execution, epochs=1, shuffle=False, verbose=0)  # warm-up and tracing
    steps = max(args.steps // args.steps_per_execution, 1) * args.steps_per_execution
    started = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, shuffle=False, verbose=0)
    seconds = time.perf_counter() - started
    images_per_s = steps * args.batch / seconds
    forward_gflop = conv_forward_flops(model) / 1e9
    peak = matmul_peak_gflops()
    achieved = images_per_s * 3 * forward_gflop
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "model": f"U-Net depth {args.depth}, {args.base_filters} filters, {args.normalization} norm",
        "image_size": args.size, "batch_size": args.batch, "steps": steps,
        "images_per_s": round(images_per_s, 3),
        "forward_gflop_per_image": round(forward_gflop, 2),
        "achieved_gflops": round(achieved, 1),
        "matmul_peak_gflops": round(peak, 1),
        "fraction_of_peak": round(achieved / peak, 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
