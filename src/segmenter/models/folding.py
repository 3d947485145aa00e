"""Batch normalisation folded into the convolution before it, for inference.

At inference a BatchNormalization layer is a fixed per-channel affine map: y = gamma * (x - mean) / sqrt(var +
eps) + beta. Right after a convolution it can be folded into that convolution's kernel and bias, which
removes two passes over every activation and lets TensorFlow's oneDNN kernels fuse convolution, bias and
ReLU: a 4-level U-Net with batch norm predicted about a fifth faster on 2 CPU cores
(benchmarks/train_bench.py). Group and instance normalisation depend on the image and cannot be folded.
Hand-written because Keras has no such transform (TensorFlow Lite's converter and TensorRT fold BN only in
their own formats).
"""
from __future__ import annotations

import keras
import numpy as np
from keras import layers

_CONVOLUTIONS = (layers.Conv2D, layers.Conv3D)


def _foldable_pairs(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """BatchNormalization layer name -> the convolution whose output only it reads."""
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, layers.BatchNormalization) or layer.axis not in (-1, len(layer.input.shape) - 1):
            continue
        producer = layer.input._keras_history.operation
        if (type(producer) in _CONVOLUTIONS and producer.groups == 1  # not a subclass such as a transpose
                and len(producer._outbound_nodes) == 1 and len(producer._inbound_nodes) == 1):
            pairs[layer.name] = producer
    return pairs


def fold_batch_normalization(model: keras.Model) -> keras.Model:
    """``model`` with each batch normalisation that directly follows a convolution folded into it (inference
    only: the folded model has no batch statistics to update). ``model`` itself when there is none."""
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):  # a functional model only
        return model
    pairs = _foldable_pairs(model)
    if not pairs:
        return model
    folded_convolutions = {conv.name: name for name, conv in pairs.items()}

    def clone(layer):
        config = layer.get_config()
        if layer.name in folded_convolutions:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    def call(layer, *args, **kwargs):
        # A folded normalisation is left out of the graph: its input goes straight on.
        return args[0] if layer.name in pairs else layer(*args, **kwargs)

    folded = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for layer in model.layers:
        if layer.name in pairs:
            continue
        target = folded.get_layer(layer.name)
        if layer.name not in folded_convolutions:
            target.set_weights(layer.get_weights())
            continue
        norm = model.get_layer(folded_convolutions[layer.name])
        mean, variance = (np.asarray(v, dtype=np.float64) for v in (norm.moving_mean, norm.moving_variance))
        gamma = np.asarray(norm.gamma, dtype=np.float64) if norm.scale else np.ones_like(mean)
        beta = np.asarray(norm.beta, dtype=np.float64) if norm.center else np.zeros_like(mean)
        factor = gamma / np.sqrt(variance + norm.epsilon)
        kernel = np.asarray(layer.kernel, dtype=np.float64) * factor  # the last axis is the output channels
        bias = np.asarray(layer.bias, dtype=np.float64) if layer.use_bias else np.zeros_like(mean)
        target.set_weights([kernel.astype(np.float32), (beta + (bias - mean) * factor).astype(np.float32)])
    return folded
