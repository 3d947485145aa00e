"""MedPatchNet: a lightweight encoder-decoder of efficient spatial pyramid (ESP) blocks, for 2D and 3D.

The building block is ESPNet's efficient spatial pyramid of dilated convolutions (Mehta et al., "ESPNet:
Efficient Spatial Pyramid of Dilated Convolutions for Semantic Segmentation", ECCV 2018): a 1x1
(pointwise) convolution reduces the input to ``filters / K`` channels, then K parallel 3x3 (3x3x3 in
3D) convolutions with dilation rates 1, 2, 4 and 8 look at that reduced map with receptive fields of
3 to 17 pixels for the parameters of K small convolutions. Concatenating dilated branches as they are
leaves gridding artefacts (each dilated kernel samples a sparse grid); ESPNet's hierarchical feature
fusion removes them by adding the branches cumulatively, from the smallest dilation up, before the
concatenation. Normalisation and ReLU follow, and the block's input is added back (before the
normalisation, as in ESPNet) when it has the same number of channels.

The network around the blocks is the U-Net layout of ``unet.encoder_decoder``: ``depth`` levels of
filters doubling from ``base_filters``, max pooling between levels, a bottleneck, a decoder that
up-samples (``upsampling``), joins the encoder's skip connection and refines, and the shared softmax
head. Each level is two ESP blocks: the first changes the channel count, the second keeps it and so has
the residual connection (ESPNet's down-sampling block followed by its residual ESP blocks).

MedPatchNet's position-conditioned convolutions (convolutions told where the patch lies in the whole
volume) are the ``position_conditioning`` option of the encoder-decoder (:mod:`segmenter.models.positions`),
so the U-Nets can have them too. The model is built from built-in Keras layers (and, with that option, the
registered position split), so saved ``.keras`` files load in safe mode.
"""
from __future__ import annotations

import keras
from keras import layers

from segmenter.config import ModelConfig
from segmenter.models import blocks, unet

# Dilation rates of the pyramid's parallel branches (K = 4), smallest first.
ESP_DILATION_RATES = (1, 2, 4, 8)


def esp_block(x, filters: int, normalization: str, name: str):
    """Efficient spatial pyramid block with hierarchical feature fusion; ``filters`` output channels.

    The rate-1 branch takes the channels left over when ``filters`` does not divide by the number of
    branches and joins the concatenation directly; the dilated branches are summed cumulatively (rate 2,
    2 + 4, 2 + 4 + 8), as in ESPNet. With fewer than 4 filters the largest rates are dropped so that every
    branch keeps at least one channel.
    """
    rates = ESP_DILATION_RATES[: max(1, min(len(ESP_DILATION_RATES), filters))]
    branch_filters = filters // len(rates)
    first_filters = filters - (len(rates) - 1) * branch_filters
    use_bias = normalization == "none"

    reduced = blocks.conv(
        x, branch_filters, 1, use_bias=use_bias, kernel_initializer="he_normal", name=f"{name}_reduce"
    )
    branches = []
    fused = None
    for rate in rates:
        branch = blocks.conv(
            reduced,
            first_filters if rate == 1 else branch_filters,
            3,
            padding="same",
            dilation_rate=rate,
            use_bias=use_bias,
            kernel_initializer="he_normal",
            name=f"{name}_rate{rate}_conv",
        )
        if rate != 1:
            # Hierarchical feature fusion: each dilated branch is added to the sum of the smaller ones.
            fused = branch if fused is None else layers.Add(name=f"{name}_rate{rate}_fuse")([fused, branch])
            branch = fused
        branches.append(branch)
    x_out = branches[0] if len(branches) == 1 else layers.Concatenate(name=f"{name}_concat")(branches)

    if x.shape[-1] == filters:
        x_out = layers.Add(name=f"{name}_residual")([x, x_out])
    x_out = blocks.normalize(x_out, normalization, name=f"{name}_norm")
    return layers.Activation("relu", name=f"{name}_relu")(x_out)


def esp_level(x, filters: int, normalization: str, name: str):
    """One level of the network: an ESP block that sets the channels, then a residual ESP block."""
    x = esp_block(x, filters, normalization, name=f"{name}_1")
    return esp_block(x, filters, normalization, name=f"{name}_2")


def medpatchnet(input_shape: tuple[int, ...], num_classes: int, settings: ModelConfig) -> keras.Model:
    """MedPatchNet for (height, width, channels) images or (depth, height, width, channels) volumes.

    Spatial sizes must be divisible by ``2 ** settings.depth``. Layer names follow the U-Nets
    ("encoder_*", "bottleneck_*", "decoder_*"), so ``set_encoder_trainable`` works on it too.
    """
    # The U-Nets' encoder-decoder, with an ESP level where they have two convolutions.
    return unet.encoder_decoder(input_shape, num_classes, settings, block=esp_level, attention=False,
                                name="medpatchnet")
