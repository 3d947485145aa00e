"""Training and inference speed of segmenter's 2D and 3D models, beside a plain Keras model and MONAI.

    python benchmarks/train_bench.py [--dims 2,3] [--rounds 2] [--steps 8] [--json FILE]

One process, every contender in turn, ``--rounds`` times over (the median of the rounds is reported), so
that a machine whose speed drifts during the run (shared hosts do) treats them alike:

2D, 256 x 256, batch 8, 3 classes, a 4-level 32-filter U-Net with batch norm (24 GFLOP per image forward):
- ``keras_reference``: a U-Net of the same layers written in plain Keras (Keras' own BatchNormalization, not
  segmenter's fused one), Adam, Dice + cross-entropy written in a few ops, no metrics, in-memory tensors;
- ``segmenter_memory``: segmenter's model, compiled by the train stage's code (AdamW, its Dice + cross-entropy,
  its Dice metrics), fed in-memory tensors;
- ``segmenter_pipeline``: the same, fed by the train stage's input pipeline (shuffling, stateless per-sample
  augmentation, one-hot, batching) over the same images: the pipeline's cost is the difference;
- ``monai``: MONAI's BasicUNet with features (32, 64, 128, 256, 512, 32) (the same depth and widths), batch
  norm, Adam, DiceCELoss, in PyTorch on the CPU; only with the optional ``bench`` extra (torch, monai);
- ``monai_channels_last``: the same network and tensors in PyTorch's channels-last memory format (one line
  for a MONAI user).
Inference: ``keras_reference`` calls ``predict_on_batch``; ``segmenter`` runs the predict stage's
``inference.predict_probabilities`` on 32 images with the model as the predict stage loads it (batch norm
folded into the convolutions), ``segmenter_bfloat16`` the same with ``predict.precision: "bfloat16"``;
MONAI runs the network under ``torch.inference_mode``, in both layouts, and ``monai_bfloat16`` under
``torch.autocast`` to bfloat16 in channels-last. The machine's bfloat16 CPU flags go into the JSON: without
them bfloat16 is emulated. ``segmenter_convolutions_only`` runs just the convolutions of the model segmenter
predicts with, one after another on inputs of their shapes: the float32 ceiling, the rate segmenter would
predict at if everything else were free, and its ratio to MONAI the most segmenter could reach against it.

The input pipeline's cost is measured twice: as the difference of ``segmenter_pipeline`` and
``segmenter_memory`` (the paired rounds are in the JSON; the machine's drift between rounds blurs it), and as
the CPU time the pipeline alone takes per batch over the CPU time of a training step (cores x its seconds),
which estimates what it takes from a training run that keeps every core busy.

3D, as ``configs/hippocampus_3d.py`` trains (40 x 56 x 40 patches, batch 2, depth 3, 16 filters, group norm,
3 classes), with ``segmenter_memory``, ``segmenter_pipeline`` (the patch sampler with nnU-Net's 3D
augmentation over 20 generated volumes of 36 x 50 x 35 voxels) and MONAI's DynUNet of the same depth,
widths and normalisation (BasicUNet always pools four times; this network pools three times).

Training speed is timed step by step inside one ``fit`` (a Keras callback), after two warm-up steps, so a
step that waits for its batch counts and the set-up of ``fit`` does not: measured around a whole second
``fit`` call, the same network ran at two speeds (2.3 or 3.1 images/s, see the README). FLOPs are the
convolutions' multiply-adds x 2 (training: 3 x forward), and the fraction of the machine's peak is against a
2048 x 2048 float32 matmul timed in the same run.
"""
from __future__ import annotations

import argparse
import copy
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
from keras import layers, ops  # noqa: E402

from segmenter import data_pipeline, inference, models, training, volume_dataset  # noqa: E402
from segmenter.config import ModelConfig, TrainConfig  # noqa: E402
from segmenter.models import precision  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "train_bench.json"
NUM_CLASSES = 3
WARMUP_STEPS = 2
SETUPS = {
    2: {"shape": (256, 256), "batch": 8, "depth": 4, "base_filters": 32, "normalization": "batch"},
    3: {"shape": (40, 56, 40), "batch": 2, "depth": 3, "base_filters": 16, "normalization": "group"},
}


# ----------------------------------------------------------------------------------------------------
# FLOPs and the machine's matmul rate
# ----------------------------------------------------------------------------------------------------
CONVOLUTIONS = (layers.Conv2D, layers.Conv3D, layers.Conv2DTranspose, layers.Conv3DTranspose)
TRANSPOSED = (layers.Conv2DTranspose, layers.Conv3DTranspose)


def keras_forward_flops(model: keras.Model) -> float:
    """2 x multiply-adds of the model's convolutions for one sample (model built for a fixed input size)."""
    total = 0.0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, CONVOLUTIONS):
            kernel = layer.kernel.shape  # (*k, in, out); transposed: (*k, out, in)
            # A transposed convolution does one kernel product per input position, a convolution per output one.
            positions = layer.input.shape[1:-1] if isinstance(layer, TRANSPOSED) else layer.output.shape[1:-1]
            total += 2.0 * np.prod(kernel) * np.prod(positions)
    return total


def torch_forward_flops(net, sample) -> float:
    """2 x multiply-adds of the network's convolutions for one sample, counted by forward hooks."""
    import torch

    total = [0.0]

    def count(module, inputs, output):
        kernel = np.prod(module.kernel_size) * module.in_channels * module.out_channels / module.groups
        positions = inputs[0].shape[2:] if isinstance(module, torch.nn.modules.conv._ConvTransposeNd) else output.shape[2:]
        total[0] += 2.0 * kernel * np.prod(positions)

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    with torch.inference_mode():
        net(sample)
    for hook in hooks:
        hook.remove()
    return total[0]  # positions exclude the batch axis: already per sample


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = tf.random.normal((n, n)), tf.random.normal((n, n))
    tf.linalg.matmul(a, b).numpy()
    started = time.perf_counter()
    for _ in range(repeats):
        c = tf.linalg.matmul(a, b)
    c.numpy()
    return 2.0 * n**3 * repeats / (time.perf_counter() - started) / 1e9


# ----------------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------------
def plain_keras_unet(shape, channels: int, setup: dict) -> keras.Model:
    """conv-BN-ReLU x 2 per level, max pooling, transposed convolutions, skips: the U-Net in plain Keras."""
    def block(x, filters):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.ReLU()(layers.BatchNormalization()(x))
        return x

    x = inputs = keras.Input((*shape, channels))
    skips = []
    for level in range(setup["depth"]):
        x = block(x, setup["base_filters"] * 2**level)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = block(x, setup["base_filters"] * 2 ** setup["depth"])
    for level in reversed(range(setup["depth"])):
        x = layers.Conv2DTranspose(setup["base_filters"] * 2**level, 2, strides=2)(x)
        x = block(layers.Concatenate()([x, skips[level]]), setup["base_filters"] * 2**level)
    return keras.Model(inputs, layers.Conv2D(NUM_CLASSES, 1, activation="softmax")(x))


def plain_dice_ce(y_true, y_pred):
    axes = tuple(range(len(y_pred.shape) - 1))
    overlap = ops.sum(y_true * y_pred, axes)
    dice = (2.0 * overlap + 1e-5) / (ops.sum(y_true, axes) + ops.sum(y_pred, axes) + 1e-5)
    crossentropy = -ops.mean(ops.sum(y_true * ops.log(ops.clip(y_pred, 1e-7, 1.0)), axis=-1))
    return 1.0 - ops.mean(dice) + crossentropy


def segmenter_model(shape, setup: dict) -> keras.Model:
    train = TrainConfig(batch_size=setup["batch"], model=ModelConfig(
        architecture="unet", depth=setup["depth"], base_filters=setup["base_filters"],
        normalization=setup["normalization"]))
    return training.build_compiled_model(train, (*shape, 1), ["background", "a", "b"])


def monai_net(dims: int, setup: dict):
    import torch
    from monai.networks.nets import BasicUNet, DynUNet

    widths = [setup["base_filters"] * 2**level for level in range(setup["depth"] + 1)]
    if dims == 2:
        net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES, features=(*widths, widths[0]),
                        norm=("batch", {}), act=("relu", {"inplace": True}))
    else:
        net = DynUNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, kernel_size=[3] * len(widths),
                      strides=[1] + [2] * setup["depth"], upsample_kernel_size=[2] * setup["depth"],
                      filters=widths, norm_name=("group", {"num_groups": 8}), act_name=("relu", {"inplace": True}))
    return net, torch


class StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self.started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def keras_training_rate(model, dataset, batch: int, steps: int) -> float:
    """Samples per second over ``steps`` training steps of one ``fit``, after the warm-up steps."""
    times = StepTimes()
    model.fit(dataset, steps_per_epoch=WARMUP_STEPS + steps, epochs=1, verbose=0, callbacks=[times])
    return batch * steps / sum(times.seconds[WARMUP_STEPS:])


def convolutions_only(model: keras.Model, batch: int):
    """A function that runs each convolution of ``model`` once, one after another, on a batch of random inputs
    of that layer's input shape: the time the convolutions alone need for one batch, bias included (for a
    folded model the bias add is fused into the convolution). Nothing but the convolutions is run, so
    ``batch`` divided by its time is the fastest the model could predict at on this machine if
    normalisation, activations, pooling, concatenation and the softmax cost nothing."""
    convolutions = [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, CONVOLUTIONS)]
    inputs = [tf.random.normal((batch, *layer.input.shape[1:])) for layer in convolutions]

    sink = tf.Variable(0.0)

    # One graph, as the model runs (a function call per convolution cost up to a millisecond each), in which
    # each convolution waits for the one before it, as in the model, so that none overlap. Grappler drops a
    # control dependency on a stateless op, and then the convolution whose output nothing uses, so each
    # convolution's first value goes into a variable (a stateful op, which always runs) and the next
    # convolution waits for that. The inputs are arguments, so no convolution of constants is folded.
    @tf.function
    def run_all(tensors):
        written = None
        for layer, tensor in zip(convolutions, tensors):
            with tf.control_dependencies([] if written is None else [written]):
                output = layer(tf.identity(tensor))
            written = sink.assign_add(tf.reshape(output, [-1])[0])
        return written
    return lambda: run_all(inputs).numpy()


def pipeline_cpu_seconds(dataset, batches: int) -> float:
    """CPU seconds of this process per batch that ``dataset`` (the train stage's input pipeline) takes to make,
    with nothing else running, after a few warm-up batches. Over the CPU time of a training step (cores x its
    seconds) it estimates what the pipeline takes from a run that keeps every core busy, an estimate that the
    machine's drift between rounds does not blur, unlike the difference of two training rates (contention
    may cost a step somewhat more than the CPU time; idle spinning of tf.data's threads counts here)."""
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    started = time.process_time()
    for _ in range(batches):
        next(iterator)
    return (time.process_time() - started) / batches


def timed_rate(function, samples: int, repeats: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return samples * repeats / (time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def blob_labels(rng, shape) -> np.ndarray:
    """Two nested ellipsoids (classes 1 and 2) at a random place: labels with structure, as patches need."""
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    centre = [rng.uniform(0.35, 0.65) * n for n in shape]
    radius = [rng.uniform(0.15, 0.25) * n for n in shape]
    distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius))
    return (distance < 1).astype(np.int32) + (distance < 0.4).astype(np.int32)


def images_of(labels: np.ndarray, rng) -> np.ndarray:
    return (labels + rng.normal(0.0, 0.5, labels.shape)).astype(np.float32)[..., None]


def datasets(dims: int, setup: dict, rng):
    """(in-memory batches, train-stage pipeline batches, a batch of inputs for inference), all endless."""
    shape, batch = setup["shape"], setup["batch"]
    train = TrainConfig(batch_size=batch)
    if dims == 2:
        labels = np.stack([blob_labels(rng, shape) for _ in range(4 * batch)])
        images = images_of(labels, rng)
        memory = tf.data.Dataset.from_tensor_slices((images, tf.one_hot(labels, NUM_CLASSES))).repeat()
        samples = tf.data.Dataset.from_tensor_slices((images, labels))
        pipeline = data_pipeline.epochs_dataset(samples, len(images), NUM_CLASSES, batch, first_epoch=0,
                                                epochs=10_000, augmentation=train.augmentation, shuffle=True)
        return memory.batch(batch).prefetch(tf.data.AUTOTUNE), pipeline, images
    volumes = [blob_labels(rng, (36, 50, 35)) for _ in range(20)]
    source = volume_dataset.VolumeSource.from_arrays([images_of(v, rng) for v in volumes], volumes)
    pipeline = volume_dataset.training_patches(source, 10_000, shape, NUM_CLASSES, batch, first_epoch=0,
                                               epochs=1, augmentation=train.augmentation.volume, seed=0)
    patches = list(volume_dataset.patches_of_epoch(source, 4 * batch, shape, NUM_CLASSES, batch).unbatch())
    images = np.stack([p[0].numpy() for p in patches])
    targets = np.stack([p[1].numpy() for p in patches])
    memory = tf.data.Dataset.from_tensor_slices((images, targets)).repeat().batch(batch).prefetch(tf.data.AUTOTUNE)
    return memory, pipeline, images


# ----------------------------------------------------------------------------------------------------
# One dimensionality
# ----------------------------------------------------------------------------------------------------
def bench(dims: int, rounds: int, steps: int, peak_gflops: float) -> dict:
    setup = SETUPS[dims]
    shape, batch = setup["shape"], setup["batch"]
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    memory, pipeline, images = datasets(dims, setup, rng)
    inference_images = np.concatenate([images] * max(1, 32 // len(images)))[:32]

    seg = segmenter_model(shape, setup)
    contenders = {"segmenter_memory": (seg, memory), "segmenter_pipeline": (seg, pipeline)}
    flops = {"segmenter": keras_forward_flops(seg)}
    predicting = models.fold_batch_normalization(seg)  # as inference.trained_models loads a trained model
    # predict.precision "bfloat16": the convolutions in bfloat16 (models.precision).
    predicting_bfloat16 = models.with_precision(predicting, "bfloat16")
    infer = {"segmenter": lambda: inference.predict_probabilities(predicting, inference_images, batch),
             "segmenter_bfloat16": lambda: inference.predict_probabilities(predicting_bfloat16, inference_images, batch),
             "segmenter_convolutions_only": convolutions_only(predicting, batch)}
    if dims == 2:
        reference = plain_keras_unet(shape, 1, setup)
        reference.compile(optimizer=keras.optimizers.Adam(1e-3), loss=plain_dice_ce, jit_compile=False)
        contenders = {"keras_reference": (reference, memory), **contenders}
        flops["keras_reference"] = keras_forward_flops(reference)
        reference_batch = tf.constant(inference_images[:batch])
        infer["keras_reference"] = lambda: reference.predict_on_batch(reference_batch)

    monai_skipped = None
    try:
        net, torch = monai_net(dims, setup)
        from monai.losses import DiceCELoss
    except Exception as error:  # noqa: BLE001 - any import failure means "the bench extra is not installed"
        monai_skipped = f"torch/monai not importable ({type(error).__name__}: {error}); pip install -e '.[bench]'"
    monai_train = {}
    if monai_skipped is None:
        x_memory, y_memory = (torch.from_numpy(np.ascontiguousarray(np.moveaxis(a.numpy(), -1, 1)))
                              for a in next(iter(memory)))
        x_infer = torch.from_numpy(np.ascontiguousarray(np.moveaxis(inference_images[:batch], -1, 1)))
        flops["monai"] = torch_forward_flops(net.eval(), x_memory)
        # MONAI as shipped computes in PyTorch's default NCHW layout; "channels last" (NHWC, NDHWC in 3D) is
        # one line for its users (the guide's PyTorch reference ran it), so it is timed as a contender too.
        # In bfloat16 it was the faster layout (0.92-1.0 s against 1.27-1.52 s per batch of 8; a scratch script).
        channels_last = torch.channels_last if dims == 2 else torch.channels_last_3d
        variants = {"monai": (net, lambda t: t),
                    "monai_channels_last": (copy.deepcopy(net).to(memory_format=channels_last),
                                            lambda t: t.contiguous(memory_format=channels_last))}
        loss_function = DiceCELoss(softmax=True, batch=True)

        def monai_training(variant, arrange):
            optimizer = torch.optim.Adam(variant.parameters(), lr=1e-3)
            x, y = arrange(x_memory), arrange(y_memory)

            def step():
                optimizer.zero_grad(set_to_none=True)
                loss = loss_function(variant(x), y)
                loss.backward()
                optimizer.step()

            def rate():
                variant.train()
                for _ in range(WARMUP_STEPS):
                    step()
                started = time.perf_counter()
                for _ in range(steps):
                    step()
                return batch * steps / (time.perf_counter() - started)
            return rate

        def monai_inference(variant, arrange, dtype=None):
            x = arrange(x_infer)

            def infer_once():
                variant.eval()
                with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                            enabled=dtype is not None):
                    torch.softmax(variant(x).float(), dim=1).numpy()
            return infer_once

        for name, (variant, arrange) in variants.items():
            monai_train[name] = monai_training(variant, arrange)
            infer[name] = monai_inference(variant, arrange)
        # bfloat16 (autocast, as PyTorch users run it) in the faster of the two layouts.
        infer["monai_bfloat16"] = monai_inference(*variants["monai_channels_last"], dtype=torch.bfloat16)

    train_rates = {name: [] for name in [*contenders, *monai_train]}
    infer_rates = {name: [] for name in infer}
    pipeline_cpu = []  # CPU seconds per batch of the pipeline alone, one figure per round
    for round_index in range(rounds):
        for name, (model, dataset) in contenders.items():
            train_rates[name].append(keras_training_rate(model, dataset, batch, steps))
            print(f"{dims}D round {round_index + 1}: {name} trains {train_rates[name][-1]:.2f} samples/s", flush=True)
        pipeline_cpu.append(pipeline_cpu_seconds(pipeline, batches=4 * steps))
        print(f"{dims}D round {round_index + 1}: the pipeline alone takes {1e3 * pipeline_cpu[-1]:.1f} CPU ms "
              f"per batch", flush=True)
        for name, rate in monai_train.items():
            train_rates[name].append(rate())
            print(f"{dims}D round {round_index + 1}: {name} trains {train_rates[name][-1]:.2f} samples/s", flush=True)
        for name, function in infer.items():
            samples = len(inference_images) if name in ("segmenter", "segmenter_bfloat16") else batch
            infer_rates[name].append(timed_rate(function, samples, repeats=max(2, steps // 2)))
            print(f"{dims}D round {round_index + 1}: {name} infers {infer_rates[name][-1]:.2f} samples/s", flush=True)

    def flops_of(name):
        return flops["segmenter"] if name.startswith("segmenter") else flops["monai" if name.startswith("monai") else name]

    result = {"setup": {**setup, "shape": list(shape), "classes": NUM_CLASSES,
                        "segmenter_forward_gflop": round(flops["segmenter"] / 1e9, 2)},
              "training": {}, "inference": {}}
    for name, rates in train_rates.items():
        rate = statistics.median(rates)
        result["training"][name] = {
            "samples_per_s": round(rate, 3), "all_rounds": [round(r, 3) for r in rates],
            "forward_gflop_per_sample": round(flops_of(name) / 1e9, 2),
            "fraction_of_matmul_peak": round(3 * flops_of(name) * rate / 1e9 / peak_gflops, 3)}
    for name, rates in infer_rates.items():
        rate = statistics.median(rates)
        result["inference"][name] = {
            "samples_per_s": round(rate, 3), "all_rounds": [round(r, 3) for r in rates],
            "fraction_of_matmul_peak": round(flops_of(name) * rate / 1e9 / peak_gflops, 3)}
    training_rates = {name: entry["samples_per_s"] for name, entry in result["training"].items()}
    inference_rates = {name: entry["samples_per_s"] for name, entry in result["inference"].items()}
    # The pipeline's CPU time per batch over the CPU time a training step from memory has (cores x its
    # seconds), round by round: what the pipeline takes from a training run that keeps every core busy.
    cores = len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    cpu_shares = [cpu * rate / (batch * cores) for cpu, rate in zip(pipeline_cpu, train_rates["segmenter_memory"])]
    result["pipeline_alone"] = {"cpu_ms_per_batch": round(1e3 * statistics.median(pipeline_cpu), 2),
                                "all_rounds": [round(1e3 * c, 2) for c in pipeline_cpu], "cores": cores}
    ratios = {"pipeline_cost": round(1 - training_rates["segmenter_pipeline"] / training_rates["segmenter_memory"], 3),
              "pipeline_cost_paired_rounds": [round(1 - p / m, 3) for p, m in
                                              zip(train_rates["segmenter_pipeline"], train_rates["segmenter_memory"])],
              "pipeline_cpu_share": round(statistics.median(cpu_shares), 4),
              "infer_segmenter_over_its_convolutions_only": round(
                  inference_rates["segmenter"] / inference_rates["segmenter_convolutions_only"], 3)}
    if "keras_reference" in training_rates:
        ratios["train_segmenter_pipeline_over_keras_reference"] = round(
            training_rates["segmenter_pipeline"] / training_rates["keras_reference"], 3)
        ratios["infer_segmenter_over_keras_reference"] = round(
            inference_rates["segmenter"] / inference_rates["keras_reference"], 3)
    if monai_skipped is None:
        for name in monai_train:
            ratios[f"train_segmenter_pipeline_over_{name}"] = round(
                training_rates["segmenter_pipeline"] / training_rates[name], 3)
        for name in variants:
            ratios[f"infer_segmenter_over_{name}"] = round(inference_rates["segmenter"] / inference_rates[name], 3)
        # The most segmenter could reach against MONAI in float32 with every operation but its convolutions free.
        ratios["infer_segmenter_convolutions_only_over_monai"] = round(
            inference_rates["segmenter_convolutions_only"] / inference_rates["monai"], 3)
        ratios["infer_segmenter_bfloat16_over_monai_bfloat16"] = round(
            inference_rates["segmenter_bfloat16"] / inference_rates["monai_bfloat16"], 3)
        result["monai"] = {"network": type(net).__name__, "torch": torch.__version__, "threads": torch.get_num_threads()}
    else:
        result["monai"] = {"skipped": monai_skipped}
    result["ratios"] = ratios
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="2,3", help="2, 3 or 2,3")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per contender and round")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()

    load_before = os.getloadavg()
    peaks = [matmul_gflops()]
    results = {}
    for dims in (int(d) for d in args.dims.split(",")):
        results[f"{dims}d"] = bench(dims, args.rounds, args.steps, peaks[0])
    peaks.append(matmul_gflops())
    result = {
        "command": "python benchmarks/train_bench.py " + " ".join(
            f"--{k} {v}" for k, v in (("dims", args.dims), ("rounds", args.rounds), ("steps", args.steps))),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "bfloat16_cpu_flags": sorted(set(precision.BFLOAT16_CPU_FLAGS) & precision.cpu_flags()),
                    "matmul_gflops_before_after": [round(p, 1) for p in peaks]},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        **results,
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
