"""Layer blocks shared by every architecture: normalisation, convolution blocks, up-sampling, output head.

Each block is a short function that takes a tensor and its settings and returns a tensor, so that an
architecture reads top to bottom as a list of blocks. Every layer gets an explicit name built from the
block's name, which keeps saved models readable and lets ``set_encoder_trainable`` find the encoder by
the ``encoder`` prefix. Only built-in Keras layers are used, so saved models load without custom objects.
"""
from __future__ import annotations

import math

import keras
from keras import layers


def group_normalization(channels: int, name: str) -> layers.Layer:
    # Up to 8 groups, and always a number of groups that divides the channels (GroupNormalization
    # requires it): 16 channels -> 8 groups, 12 channels -> 4 groups, 3 channels -> 1 group.
    return layers.GroupNormalization(groups=math.gcd(8, channels), name=name)


def instance_normalization(channels: int, name: str) -> layers.Layer:
    # One group per channel is instance normalisation.
    return layers.GroupNormalization(groups=-1, name=name)


def batch_normalization(channels: int, name: str) -> layers.Layer:
    return layers.BatchNormalization(name=name)


def no_normalization(channels: int, name: str) -> layers.Layer:
    return layers.Identity(name=name)


# Each entry makes the normalisation layer for a tensor with the given number of channels. Group
# normalisation is the default because its statistics do not depend on the batch, which matters at the
# batch size of 4 that a 256x256 2D U-Net fits in memory with; batch normalisation is noisy there.
NORMALIZATIONS = {
    "group": group_normalization,
    "instance": instance_normalization,
    "batch": batch_normalization,
    "none": no_normalization,
}


def normalize(x, normalization: str, name: str):
    """Apply the normalisation named ``normalization`` (a key of ``NORMALIZATIONS``) to ``x``."""
    return NORMALIZATIONS[normalization](x.shape[-1], name)(x)


def conv_norm_relu(x, filters: int, normalization: str, name: str, kernel_size: int = 3, dilation_rate: int = 1):
    """Convolution, normalisation, ReLU: the unit every block is made of."""
    # A bias right before a normalisation layer is cancelled by its mean subtraction, so it is dropped.
    x = layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=normalization == "none",
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = normalize(x, normalization, name=f"{name}_norm")
    return layers.Activation("relu", name=f"{name}_relu")(x)


def conv_block(x, filters: int, normalization: str, name: str):
    """The U-Net block: two 3x3 convolutions, each followed by normalisation and ReLU."""
    x = conv_norm_relu(x, filters, normalization, name=f"{name}_1")
    return conv_norm_relu(x, filters, normalization, name=f"{name}_2")


def residual_block(x, filters: int, normalization: str, name: str):
    """Two 3x3 convolutions whose output is added to the (projected) input, as in ResNet."""
    shortcut = x
    if x.shape[-1] != filters:
        # A 1x1 convolution matches the channel count so that the two paths can be added.
        shortcut = layers.Conv2D(
            filters, 1, use_bias=False, kernel_initializer="he_normal", name=f"{name}_shortcut_conv"
        )(x)
        shortcut = normalize(shortcut, normalization, name=f"{name}_shortcut_norm")
    x = conv_norm_relu(x, filters, normalization, name=f"{name}_1")
    x = layers.Conv2D(
        filters,
        3,
        padding="same",
        use_bias=normalization == "none",
        kernel_initializer="he_normal",
        name=f"{name}_2_conv",
    )(x)
    x = normalize(x, normalization, name=f"{name}_2_norm")
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_relu")(x)


def attention_gate(skip, gating, inter_filters: int, name: str):
    """Weight the skip connection by attention coefficients computed from the decoder (Oktay et al. 2018).

    ``gating`` is the up-sampled decoder tensor at the skip's resolution. The gate learns a map in
    [0, 1] per pixel that suppresses skip features away from the structure the decoder is looking for.
    """
    theta = layers.Conv2D(inter_filters, 1, use_bias=False, kernel_initializer="he_normal", name=f"{name}_skip")(skip)
    phi = layers.Conv2D(inter_filters, 1, kernel_initializer="he_normal", name=f"{name}_gating")(gating)
    x = layers.Add(name=f"{name}_add")([theta, phi])
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    coefficients = layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_coefficients")(x)
    # Multiply broadcasts the single-channel coefficients over the skip's channels.
    return layers.Multiply(name=f"{name}_apply")([skip, coefficients])


def transpose_upsample(x, filters: int, name: str, kernel_size: int = 2):
    """Double the resolution with a learned transposed convolution."""
    return layers.Conv2DTranspose(
        filters, kernel_size, strides=2, padding="same", kernel_initializer="he_normal", name=f"{name}_transpose"
    )(x)


def resize_upsample(x, filters: int, name: str, kernel_size: int = 2):
    """Double the resolution with bilinear resizing, then a convolution sets the channel count.

    Resizing avoids the checkerboard artefacts that transposed convolutions can produce.
    """
    x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_resize")(x)
    return layers.Conv2D(filters, kernel_size, padding="same", kernel_initializer="he_normal", name=f"{name}_conv")(x)


UPSAMPLINGS = {
    "transpose": transpose_upsample,
    "resize": resize_upsample,
}


def upsample(x, filters: int, upsampling: str, name: str, kernel_size: int = 2):
    """Double the resolution of ``x`` the way ``upsampling`` (a key of ``UPSAMPLINGS``) says."""
    return UPSAMPLINGS[upsampling](x, filters, name=name, kernel_size=kernel_size)


def maybe_dropout(x, rate: float, name: str):
    """Dropout when ``rate`` > 0; no layer at all otherwise, so a model without dropout stays lean."""
    if rate <= 0:
        return x
    return layers.Dropout(rate, name=name)(x)


def classifier(x, num_classes: int):
    """Per-pixel class probabilities.

    The softmax runs in float32 whatever the global dtype policy, so that under mixed precision the
    probabilities and the loss computed from them keep full precision.
    """
    x = layers.Conv2D(num_classes, 1, name="logits")(x)
    return layers.Activation("softmax", dtype="float32", name="probabilities")(x)


def check_input_size(input_shape: tuple[int, int, int], divisor: int, architecture: str) -> None:
    """Raise ValueError unless the image height and width are positive multiples of ``divisor``."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {tuple(input_shape)}")
    height, width, channels = input_shape
    if channels is None or channels < 1:
        raise ValueError(f"input_shape must have at least one channel, got {tuple(input_shape)}")
    for size in (height, width):
        if size is None or size <= 0 or size % divisor:
            raise ValueError(
                f"{architecture} needs image height and width divisible by {divisor}, got {height}x{width}; "
                f"resize the images (preload.image_size) or lower model.depth"
            )


def input_layer(input_shape: tuple[int, int, int]) -> keras.KerasTensor:
    return keras.Input(shape=tuple(input_shape), dtype="float32", name="image")
