"""Seconds per volume of segmenter.sliding_window.sliding_window_predict with a small 3D U-Net on this machine.

    python benchmarks/sliding_window_bench.py [--size 128] [--patch 64] [--overlap 0.5] [--batch 2]
                                              [--classes 2] [--repeats 3] [--json FILE]

Defaults: one 128^3 single-channel volume, 64^3 patches, 50 % overlap (27 patches), batch 2, Gaussian
weighting (sigma = patch / 8), float16 accumulator, no mirroring.

The network is segmenter's own 3D U-Net (``segmenter.models``, architecture "unet", depth 2, 16 base
filters, normalisation "none"): 3 levels with 16, 32 and 64 filters - two 3x3x3 convolutions + ReLU per
level, 2x2x2 max pooling down, 2x2x2 stride-2 transposed convolutions up, skip concatenation, a 1x1x1
softmax head; random weights. It runs through ``model.predict_on_batch`` with ``jit_compile=False`` (XLA off).
After one warm-up volume (which traces the batch-2 and the final batch-1 shapes) the script times
``--repeats`` volumes and reports the median, and separately the time spent inside the model, so that
the NumPy tiling / blending overhead is visible.

When torch and monai import (``pip install -e ".[bench]"``), the same run also times MONAI's
``monai.inferers.sliding_window_inference`` (mode="gaussian", sigma_scale=0.125, same overlap, roi and
sw_batch_size) on CPU with a PyTorch twin of the same U-Net (same layers and parameter count), and
reports segmenter / MONAI (target <= 0.7). Without them the MONAI entry records why it was skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from segmenter import models  # noqa: E402
from segmenter.config import ModelConfig  # noqa: E402
from segmenter.sliding_window import compute_steps, memory_bytes, sliding_window_predict  # noqa: E402

FILTERS = (16, 32, 64)
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "sliding_window_bench.json"


def keras_unet3d(channels: int, num_classes: int, patch: int) -> keras.Model:
    """segmenter's 3D U-Net with 3 levels of FILTERS, no normalisation layers (as the PyTorch twin below)."""
    settings = ModelConfig(architecture="unet", depth=len(FILTERS) - 1, base_filters=FILTERS[0], normalization="none")
    return models.build_model(settings, (patch, patch, patch, channels), num_classes)


def conv_forward_gflops(patch: int, channels: int, num_classes: int, filters=FILTERS) -> float:
    """2 x multiply-adds of one patch through the U-Net above."""
    total, c, size = 0.0, channels, patch
    for level, f in enumerate(filters):
        vox = size ** 3
        total += 2 * 27 * c * f * vox + 2 * 27 * f * f * vox
        c = f
        if level < len(filters) - 1:
            size //= 2
    for f in reversed(filters[:-1]):
        size *= 2
        vox = size ** 3
        total += 2 * 8 * c * f * (vox // 8)  # transposed conv: one 2x2x2 x c x f product per input voxel
        total += 2 * 27 * (2 * f) * f * vox + 2 * 27 * f * f * vox
        c = f
    total += 2 * c * num_classes * size ** 3
    return total / 1e9


def time_segmenter(model, volume, args) -> dict:
    model_seconds = [0.0]

    def predict(batch):
        started = time.perf_counter()
        out = model.predict_on_batch(batch)
        model_seconds[0] += time.perf_counter() - started
        return out

    def once():
        model_seconds[0] = 0.0
        started = time.perf_counter()
        labels = sliding_window_predict(predict, volume, (args.patch,) * 3, num_classes=args.classes,
                                        overlap=args.overlap, batch_size=args.batch)
        return time.perf_counter() - started, model_seconds[0], labels

    warm_seconds, _, _ = once()
    runs = [once() for _ in range(args.repeats)]
    totals = [r[0] for r in runs]
    models_only = [r[1] for r in runs]
    return {
        "seconds_per_volume": statistics.median(totals),
        "seconds_all_repeats": totals,
        "seconds_in_model": statistics.median(models_only),
        "seconds_tiling_and_blending": statistics.median(t - m for t, m in zip(totals, models_only)),
        "warmup_seconds": warm_seconds,
        "labels": runs[-1][2],
    }


def time_monai(volume, args) -> dict:
    try:
        import monai
        import torch
        from monai.inferers import sliding_window_inference
    except Exception as error:  # noqa: BLE001 - any import failure means "not installed here"
        return {"skipped": f"torch/monai not importable ({type(error).__name__}: {error}); "
                           "pip install -e '.[bench]' (see pyproject.toml)"}

    class Block(torch.nn.Sequential):
        def __init__(self, cin, cout):
            super().__init__(torch.nn.Conv3d(cin, cout, 3, padding=1), torch.nn.ReLU(inplace=True),
                             torch.nn.Conv3d(cout, cout, 3, padding=1), torch.nn.ReLU(inplace=True))

    class TorchUNet3D(torch.nn.Module):
        """The PyTorch twin of keras_unet3d (same layers, same parameter count)."""

        def __init__(self, channels, num_classes, filters=FILTERS):
            super().__init__()
            self.down = torch.nn.ModuleList()
            c = channels
            for f in filters:
                self.down.append(Block(c, f))
                c = f
            self.ups = torch.nn.ModuleList()
            self.decoders = torch.nn.ModuleList()
            for f in reversed(filters[:-1]):
                self.ups.append(torch.nn.ConvTranspose3d(c, f, 2, stride=2))
                self.decoders.append(Block(2 * f, f))
                c = f
            self.head = torch.nn.Conv3d(c, num_classes, 1)

        def forward(self, x):
            skips = []
            for level, block in enumerate(self.down):
                x = block(x)
                if level < len(self.down) - 1:
                    skips.append(x)
                    x = torch.nn.functional.max_pool3d(x, 2)
            for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
                x = decoder(torch.cat([up(x), skip], dim=1))
            return torch.softmax(self.head(x), dim=1)

    net = TorchUNet3D(volume.shape[-1], args.classes).eval()
    inputs = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 0)[None]))

    def once():
        started = time.perf_counter()
        with torch.inference_mode():
            probs = sliding_window_inference(inputs, (args.patch,) * 3, args.batch, net, overlap=args.overlap,
                                             mode="gaussian", sigma_scale=0.125)
            labels = probs.argmax(1)[0].to(torch.uint8).numpy()
        return time.perf_counter() - started, labels

    warm_seconds, _ = once()
    runs = [once() for _ in range(args.repeats)]
    totals = [r[0] for r in runs]
    return {
        "torch": torch.__version__, "monai": monai.__version__, "torch_threads": torch.get_num_threads(),
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "seconds_per_volume": statistics.median(totals), "seconds_all_repeats": totals,
        "warmup_seconds": warm_seconds, "labels": runs[-1][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    volume = np.random.default_rng(0).normal(size=(args.size,) * 3 + (1,)).astype(np.float32)
    voxels = args.size ** 3
    patches = int(np.prod([len(s) for s in compute_steps(volume.shape[:3], (args.patch,) * 3, args.overlap)]))
    load_before = os.getloadavg()

    model = keras_unet3d(1, args.classes, args.patch)
    seg = time_segmenter(model, volume, args)
    seg_labels = seg.pop("labels")
    gflop = conv_forward_gflops(args.patch, 1, args.classes) * patches
    seg.update({
        "voxels_per_second": voxels / seg["seconds_per_volume"],
        "patches_per_second": patches / seg["seconds_per_volume"],
        "model_gflop_per_volume": round(gflop, 1),
        "model_gflops_per_second": round(gflop / seg["seconds_in_model"], 1),
        "parameters": int(model.count_params()),
        "memory_bytes_formula": memory_bytes(volume.shape, (args.patch,) * 3, num_classes=args.classes,
                                             batch_size=args.batch, input_copy=False),
    })
    mon = time_monai(volume, args)
    mon_labels = mon.pop("labels", None)
    if "seconds_per_volume" in mon:
        mon["voxels_per_second"] = voxels / mon["seconds_per_volume"]
        mon["ratio_segmenter_over_monai"] = seg["seconds_per_volume"] / mon["seconds_per_volume"]
        mon["target_ratio_at_most"] = 0.7
        del mon_labels  # different random weights: the label maps are not comparable

    result = {
        "benchmark": "sliding_window_predict, one volume",
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        },
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": keras.__version__, "numpy": np.__version__},
        "setup": {"volume": [args.size] * 3 + [1], "patch": [args.patch] * 3, "overlap": args.overlap,
                  "patches": patches, "batch": args.batch, "classes": args.classes, "sigma_scale": 0.125,
                  "accumulate": "float16", "mirroring": False, "xla_jit_compile": False,
                  "model": "segmenter unet (3D), filters 16/32/64 (3 levels), 2 conv3x3x3+ReLU per level, "
                           "maxpool, transposed-conv upsampling, softmax head, random weights",
                  "repeats": args.repeats, "statistic": "median"},
        "segmenter": seg,
        "monai": mon,
        "label_fractions": np.bincount(seg_labels.ravel(), minlength=args.classes).tolist(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")
    print(f"\nsegmenter: {seg['seconds_per_volume']:.2f} s per {args.size}^3 volume ({patches} patches of "
          f"{args.patch}^3, {seg['voxels_per_second'] / 1e6:.2f} Mvoxel/s; model "
          f"{seg['seconds_in_model']:.2f} s, tiling+blending {seg['seconds_tiling_and_blending']:.2f} s)")
    if "seconds_per_volume" in mon:
        print(f"MONAI:     {mon['seconds_per_volume']:.2f} s; ratio segmenter/MONAI "
              f"{mon['ratio_segmenter_over_monai']:.2f} (target <= 0.7)")
    else:
        print(f"MONAI:     {mon['skipped']}")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
