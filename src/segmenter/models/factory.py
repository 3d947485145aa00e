"""Build any architecture from its settings, and freeze or unfreeze its encoder."""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Union

import keras

from segmenter.config import DEFAULT_DEPTH, ModelConfig
from segmenter.models import backbones, medpatchnet, unet

# Each entry builds a Functional model from (input_shape, num_classes, settings: ModelConfig).
ARCHITECTURES = {
    "unet": unet.unet,
    "attention_unet": unet.attention_unet,
    "residual_unet": unet.residual_unet,
    "mobilenetv2_unet": backbones.mobilenetv2_unet,
    "deeplabv3plus": backbones.deeplabv3plus,
    "medpatchnet": medpatchnet.medpatchnet,
}

# The architectures whose encoder is a keras.applications backbone that can start from saved weights.
PRETRAINED_ENCODER_ARCHITECTURES = ("mobilenetv2_unet", "deeplabv3plus")

# The architectures that build 3D models for (depth, height, width, channels) inputs; the others (the
# keras.applications backbones) are 2D only.
VOLUMETRIC_ARCHITECTURES = ("unet", "attention_unet", "residual_unet", "medpatchnet")

# Layers whose name is this prefix, or starts with it and "_", belong to the encoder.
ENCODER_PREFIX = "encoder"


def build_model(
    model_config: Union[ModelConfig, Mapping[str, Any]],
    input_shape: tuple[int, ...],
    num_classes: int,
) -> keras.Model:
    """Build the segmentation model that ``model_config`` describes.

    Parameters
    ----------
    model_config : ModelConfig or dict
        The ``train.model`` settings; a dict is validated like a config file (missing keys take the
        defaults, unknown keys are an error).
    input_shape : tuple of int
        (height, width, channels) of the float32 input images for a 2D model, or (depth, height, width,
        channels) of the input volumes for a 3D model (architectures in ``VOLUMETRIC_ARCHITECTURES``
        only). Every spatial size must be divisible by ``2 ** depth`` (by 16 for deeplabv3plus).
    num_classes : int
        Number of classes including background; the output has one softmax channel per class.

    Returns
    -------
    keras.Model
        Maps (batch, height, width, channels) images to (batch, height, width, num_classes) float32
        probabilities; in 3D, (batch, depth, height, width, channels) volumes to (batch, depth, height,
        width, num_classes).
    """
    settings = model_config if isinstance(model_config, ModelConfig) else ModelConfig.model_validate(dict(model_config))
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background and one structure), got {num_classes}")
    if settings.encoder_weights is not None and settings.architecture not in PRETRAINED_ENCODER_ARCHITECTURES:
        warnings.warn(
            f"model.encoder_weights={settings.encoder_weights!r} is ignored: {settings.architecture} has no "
            f"pretrained encoder (only {', '.join(PRETRAINED_ENCODER_ARCHITECTURES)} do)",
            stacklevel=2,
        )
    if len(input_shape) == 4 and settings.architecture not in VOLUMETRIC_ARCHITECTURES:
        raise ValueError(
            f"{settings.architecture} is 2D only and cannot take the 3D input_shape {tuple(input_shape)}; "
            f"use one of {', '.join(VOLUMETRIC_ARCHITECTURES)} for volumes"
        )
    if settings.depth is None:
        settings = settings.model_copy(update={"depth": default_depth(input_shape)})
    return ARCHITECTURES[settings.architecture](tuple(input_shape), num_classes, settings)


def default_depth(input_shape) -> int:
    """The depth of a model built without one: ``DEFAULT_DEPTH`` in 2D; in 3D the most levels (up to 5) that
    halve every side of the patch evenly and leave at least 4 voxels at the bottleneck (the train stage
    passes the plan's depth instead)."""
    spatial = [int(side) for side in input_shape[:-1]]
    if len(spatial) == 2:
        return DEFAULT_DEPTH
    depth = 1
    while depth < 5 and all(side % 2 ** (depth + 1) == 0 and side // 2 ** (depth + 1) >= 4 for side in spatial):
        depth += 1
    return depth


def is_encoder_layer(layer: keras.layers.Layer) -> bool:
    return layer.name == ENCODER_PREFIX or layer.name.startswith(f"{ENCODER_PREFIX}_")


def set_encoder_trainable(model: keras.Model, trainable: bool) -> int:
    """Freeze (``trainable=False``) or unfreeze the encoder of a model made by ``build_model``.

    Returns the number of layers changed. As always in Keras, compile the model again after this call
    for the change to reach training. A frozen pretrained encoder also runs its batch normalisation in
    inference mode, which is what fine-tuning wants.
    """
    encoder_layers = [layer for layer in model.layers if is_encoder_layer(layer)]
    if not encoder_layers:
        raise ValueError(f"model {model.name!r} has no layer named {ENCODER_PREFIX!r} or {ENCODER_PREFIX}_*")
    for layer in encoder_layers:
        layer.trainable = trainable
    return len(encoder_layers)
