"""Build any architecture from its settings, and freeze or unfreeze its encoder."""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Union

import keras

from segmenter.config import ModelConfig
from segmenter.models import backbones, unet

# Each entry builds a Functional model from (input_shape, num_classes, settings: ModelConfig).
ARCHITECTURES = {
    "unet": unet.unet,
    "attention_unet": unet.attention_unet,
    "residual_unet": unet.residual_unet,
    "mobilenetv2_unet": backbones.mobilenetv2_unet,
    "deeplabv3plus": backbones.deeplabv3plus,
}

# The architectures whose encoder is a keras.applications backbone that can start from saved weights.
PRETRAINED_ENCODER_ARCHITECTURES = ("mobilenetv2_unet", "deeplabv3plus")

# Layers whose name is this prefix, or starts with it and "_", belong to the encoder.
ENCODER_PREFIX = "encoder"


def build_model(
    model_config: Union[ModelConfig, Mapping[str, Any]],
    input_shape: tuple[int, int, int],
    num_classes: int,
) -> keras.Model:
    """Build the segmentation model that ``model_config`` describes.

    Parameters
    ----------
    model_config : ModelConfig or dict
        The ``train.model`` settings; a dict is validated like a config file (missing keys take the
        defaults, unknown keys are an error).
    input_shape : tuple of int
        (height, width, channels) of the float32 input images. Height and width must be divisible by
        ``2 ** depth`` (by 16 for deeplabv3plus).
    num_classes : int
        Number of classes including background; the output has one softmax channel per class.

    Returns
    -------
    keras.Model
        Maps (batch, height, width, channels) images to (batch, height, width, num_classes) float32
        probabilities.
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
    return ARCHITECTURES[settings.architecture](tuple(input_shape), num_classes, settings)


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
