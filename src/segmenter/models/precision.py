"""The compute precision of a trained model at inference (``predict.precision``).

A model is saved with the dtype policy it was trained under: float32, or "mixed_float16" where training
used mixed precision. Prediction may choose another: "bfloat16" computes the convolutions in bfloat16 with
float32 weights, which on a CPU with AVX512_BF16 predicted the 2D U-Net of ``benchmarks/train_bench.py``
1.9-2.1 times and its 3D U-Net (group norm) 1.4 times as fast as float32; "float32" computes everything in
float32 (a model trained with mixed precision predicted at full precision). As under mixed-precision
training, normalisation layers and the softmax stay in float32 (see ``models.blocks``), so group norm's
statistics and the probabilities keep full precision; only the convolutions' inputs and products are
rounded (bfloat16 keeps float32's range with 8 significant bits).

Hand-written because Keras changes a model's precision only by rebuilding it under a new global policy,
which a loaded model cannot be: the model is cloned layer by layer with a per-layer dtype policy and the
(unchanged, float32) weights copied.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import keras
from keras import layers

# Keras dtype policy per predict.precision: weights stay float32, computation in the named type.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
_FLOAT32_LAYERS = (layers.BatchNormalization, layers.GroupNormalization, layers.LayerNormalization)
# CPU flags of instructions that compute bfloat16 products natively (/proc/cpuinfo on Linux: x86 lists them
# on its "flags" lines, Arm on its "Features" lines).
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# GPUs compute bfloat16 natively from compute capability 8.0 (Ampere) on.
BFLOAT16_GPU_CAPABILITY = (8, 0)


def _stays_float32(layer: keras.layers.Layer) -> bool:
    """Normalisation layers and softmax outputs: float32 under every policy, as in training."""
    if isinstance(layer, _FLOAT32_LAYERS):
        return True
    return getattr(layer, "activation", None) is keras.activations.softmax


def with_precision(model: keras.Model, precision: Optional[str]) -> keras.Model:
    """``model`` computing in ``precision`` ("float32" or "bfloat16"; None: ``model`` as it is). The clone
    has the same layers, names and weights; its input and its probabilities are float32 either way."""
    if precision is None:
        return model
    policy = POLICIES[precision]

    def clone(layer):
        config = layer.get_config()
        if not _stays_float32(layer):  # (clone_model makes the inputs itself: no InputLayer comes here)
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    cloned = keras.models.clone_model(model, clone_function=clone, recursive=True)
    cloned.set_weights(model.get_weights())
    return cloned


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The instruction-set flags of this machine's CPU (Linux); empty where they cannot be read."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith(("flags", "Features")) for flag in line.split(":", 1)[1].split()}


def gpu_capabilities() -> list[Optional[tuple[int, int]]]:
    """The CUDA compute capability of each GPU TensorFlow sees (None where it does not say)."""
    import tensorflow as tf

    return [tf.config.experimental.get_device_details(gpu).get("compute_capability")
            for gpu in tf.config.list_physical_devices("GPU")]


def bfloat16_is_emulated(capabilities: list, flags: set[str]) -> bool:
    """True where the model would run on a device without bfloat16 arithmetic, where bfloat16 is not expected to
    be faster than float32 (not measured: this project's CPU has it): with GPUs (``capabilities``, the model
    runs there) one older than compute capability 8.0; without, a CPU with none of ``BFLOAT16_CPU_FLAGS``."""
    if capabilities:
        return any(c is not None and tuple(c) < BFLOAT16_GPU_CAPABILITY for c in capabilities)
    return not any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


def emulation_notice(precision: Optional[str]) -> Optional[str]:
    """The line to print where ``precision`` (``predict.precision``) is "bfloat16" and this machine would
    emulate it (``bfloat16_is_emulated``); None otherwise."""
    if precision != "bfloat16" or not bfloat16_is_emulated(gpu_capabilities(), cpu_flags()):
        return None
    return ("predict.precision bfloat16: the device here has no bfloat16 arithmetic (a CPU without avx512_bf16, "
            "amx_bf16 or bf16, or a GPU older than compute capability 8.0), so it is emulated and unlikely to be "
            "faster than float32")
