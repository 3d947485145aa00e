"""U-Net (Ronneberger et al. 2015) and its attention (Oktay et al. 2018) and residual variants.

All three share one encoder-decoder: ``depth`` down-sampling levels, filters doubling per level from
``base_filters``, skip connections at each level, and a bottleneck in between. They differ only in the
block each level is made of and in whether an attention gate filters the skip connections.

Each builds a 2D model for an ``input_shape`` of (height, width, channels) and a 3D model (3D
convolutions, pooling and up-sampling, as in Çiçek et al. 2016's 3D U-Net) for (depth, height, width,
channels); the blocks pick their layers from the rank of the tensors, so layer names are the same in both.
With ``deep_supervision`` the decoder's coarser levels get auxiliary outputs (models.deep_supervision);
with ``position_conditioning`` every block's input also gets the voxels' positions (models.positions).
"""
from __future__ import annotations

import keras
from keras import layers

from segmenter.config import ModelConfig
from segmenter.models import blocks, deep_supervision, positions


def unet(input_shape: tuple[int, ...], num_classes: int, settings: ModelConfig) -> keras.Model:
    """The plain U-Net: two 3x3 convolution + normalisation + ReLU per level."""
    return encoder_decoder(input_shape, num_classes, settings, block=blocks.conv_block, attention=False, name="unet")


def attention_unet(input_shape: tuple[int, ...], num_classes: int, settings: ModelConfig) -> keras.Model:
    """U-Net whose skip connections pass through attention gates."""
    return encoder_decoder(
        input_shape, num_classes, settings, block=blocks.conv_block, attention=True, name="attention_unet"
    )


def residual_unet(input_shape: tuple[int, ...], num_classes: int, settings: ModelConfig) -> keras.Model:
    """U-Net made of residual blocks."""
    return encoder_decoder(
        input_shape, num_classes, settings, block=blocks.residual_block, attention=False, name="residual_unet"
    )


def encoder_decoder(input_shape, num_classes: int, settings: ModelConfig, *, block, attention: bool, name: str):
    depth, base_filters, normalization = settings.depth, settings.base_filters, settings.normalization
    blocks.check_input_size(input_shape, 2**depth, name)

    inputs = blocks.input_layer(input_shape)
    x = inputs
    where = None  # the positions at each level's resolution, for a position-conditioned model
    if settings.position_conditioning:
        x, at_full_resolution = positions.split(inputs)
        where = positions.pyramid(at_full_resolution, depth)

    def conditioned(x, level: int, name: str):
        """``x`` with the positions at its level joined, where the model is conditioned on them."""
        return x if where is None else layers.Concatenate(name=f"{name}_positions")([x, where[level]])

    # Encoder: each level keeps its output for the skip connection, then halves the resolution.
    # Layer names start with "encoder" so that set_encoder_trainable can freeze them.
    skips = []
    for level in range(depth):
        x = block(conditioned(x, level, f"encoder_{level}"), base_filters * 2**level, normalization,
                  name=f"encoder_{level}")
        # As in the original U-Net, dropout acts only at the deepest levels, where the most filters are.
        if level == depth - 1:
            x = blocks.maybe_dropout(x, settings.dropout, name=f"encoder_{level}_dropout")
        skips.append(x)
        x = blocks.max_pool(x, name=f"encoder_{level}_pool")

    x = block(conditioned(x, depth, "bottleneck"), base_filters * 2**depth, normalization, name="bottleneck")
    x = blocks.maybe_dropout(x, settings.dropout, name="bottleneck_dropout")

    # Decoder: double the resolution, join the skip connection of the same level, refine.
    supervised = deep_supervision.supervised_levels(depth) if settings.deep_supervision else []
    auxiliary = {}
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = blocks.upsample(x, filters, settings.upsampling, name=f"decoder_{level}_up")
        skip = skips[level]
        if attention:
            skip = blocks.attention_gate(skip, x, max(filters // 2, 1), name=f"decoder_{level}_attention")
        x = layers.Concatenate(name=f"decoder_{level}_concat")([x, skip] + ([] if where is None else [where[level]]))
        x = block(x, filters, normalization, name=f"decoder_{level}")
        if level in supervised:
            auxiliary[level] = blocks.classifier(x, num_classes, prefix=f"deep_supervision_{level}_")

    outputs = blocks.classifier(x, num_classes)
    if supervised:
        return deep_supervision.DeepSupervisionModel(inputs, [outputs, *(auxiliary[level] for level in supervised)],
                                                     name=name)
    return keras.Model(inputs, outputs, name=name)
