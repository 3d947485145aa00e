"""Architectures built on a ``keras.applications`` encoder: a MobileNetV2 U-Net and DeepLabV3+.

The encoder is a nested model named ``encoder`` whose outputs are the backbone's feature maps the
decoder needs. Keeping it one layer makes freezing it during the first epochs of fine-tuning a single
switch (``set_encoder_trainable``), and its weights can come from ImageNet or from a local file.

The backbones expect 3-channel images in the range they were trained on. Images in segmenter are
normalised by the preload stage (to [0, 1] with the default min-max normalisation), so the model
replicates a grey channel to three and rescales [0, 1] to the backbone's range inside the graph; a
saved model therefore takes the same input as every other architecture.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import keras
from keras import layers

from segmenter.config import ModelConfig
from segmenter.models import blocks


@dataclass(frozen=True)
class Backbone:
    """How to build one ``keras.applications`` backbone and where to tap its features."""

    constructor: Callable[..., keras.Model]
    # Rescaling from [0, 1] images to the range the ImageNet weights were trained on.
    scale: float
    offset: float | tuple[float, float, float]
    # Feature maps at strides 2, 4, 8, 16 and 32, the skip connections of a U-Net.
    strided_features: tuple[str, str, str, str, str]
    # DeepLabV3+ taps the stride-4 map as low-level features and runs ASPP on the stride-16 map.
    low_level_feature: str
    high_level_feature: str


BACKBONES = {
    # MobileNetV2 was trained on images in [-1, 1]. The U-Net taps are those of the TensorFlow
    # segmentation tutorial (pix2pix decoder) plus the stride-32 output.
    "mobilenetv2": Backbone(
        constructor=keras.applications.MobileNetV2,
        scale=2.0,
        offset=-1.0,
        strided_features=(
            "block_1_expand_relu",
            "block_3_expand_relu",
            "block_6_expand_relu",
            "block_13_expand_relu",
            "block_16_project",
        ),
        low_level_feature="block_3_expand_relu",
        high_level_feature="block_13_expand_relu",
    ),
    # ResNet50 was trained with "caffe" preprocessing: 0-255 pixels minus the ImageNet channel means
    # (BGR order; the channels of a replicated grey image are identical, so the order does not matter).
    "resnet50": Backbone(
        constructor=keras.applications.ResNet50,
        scale=255.0,
        offset=(-103.939, -116.779, -123.68),
        strided_features=(
            "conv1_relu",
            "conv2_block3_out",
            "conv3_block4_out",
            "conv4_block6_out",
            "conv5_block3_out",
        ),
        low_level_feature="conv2_block3_out",
        high_level_feature="conv4_block6_out",
    ),
}


def build_backbone(name: str, image_size: tuple[int, int], encoder_weights: Optional[str]) -> keras.Model:
    """The headless backbone ``name`` for ``image_size`` images, with ImageNet, local or random weights.

    ``encoder_weights`` is None (random initialisation), "imagenet" (downloaded by Keras on first use)
    or the path of a ``.weights.h5`` or ``.keras`` file saved from the same headless backbone.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    local_file = None
    if encoder_weights not in (None, "imagenet"):
        local_file = Path(encoder_weights).expanduser()
        if not local_file.is_file():
            raise ValueError(
                f"encoder_weights {encoder_weights!r} is neither None, 'imagenet' nor an existing weights file"
            )
    backbone = BACKBONES[name].constructor(
        input_shape=(*image_size, 3),
        include_top=False,
        weights="imagenet" if encoder_weights == "imagenet" else None,
    )
    if local_file is not None:
        backbone.load_weights(str(local_file))
    return backbone


def with_fused_batch_normalization(model: keras.Model) -> keras.Model:
    """``model`` with each Keras BatchNormalization layer replaced by ``blocks.FusedBatchNormalization`` of the
    same settings and weights: the same network, whose training steps run TensorFlow's fused kernel (MobileNetV2
    has a batch norm after each of its 52 convolutions; its U-Net trained 13-27% faster on 2 CPU cores)."""
    def clone(layer):
        cls = blocks.FusedBatchNormalization if type(layer) is layers.BatchNormalization else type(layer)
        return cls.from_config(layer.get_config())

    fused = keras.models.clone_model(model, clone_function=clone)
    for original, copy in zip(model.layers, fused.layers):  # the same layers in the same order
        copy.set_weights(original.get_weights())
    return fused


def encoder(backbone: keras.Model, feature_names: list[str]) -> keras.Model:
    """A model from the backbone's input to the named feature maps, as one layer named ``encoder``.

    Its batch normalisations are ``blocks.FusedBatchNormalization``. The swap is made here rather than in
    ``build_backbone`` because a weights file names its layers after their classes: a file saved from
    ``build_backbone``'s network or from ``keras.applications`` must keep loading into the other.
    """
    outputs = [backbone.get_layer(feature).output for feature in feature_names]
    return with_fused_batch_normalization(keras.Model(backbone.input, outputs, name="encoder"))


def to_backbone_input(inputs, backbone_name: str):
    """Make a 3-channel image in the backbone's expected range from the model input."""
    channels = inputs.shape[-1]
    if channels == 3:
        x = inputs
    elif channels == 1:
        # Replicating the grey channel is what lets ImageNet weights see a familiar input.
        x = layers.Concatenate(name="grey_to_rgb")([inputs, inputs, inputs])
    else:
        # Other channel counts (e.g. several MRI sequences) are mixed into three by a learned 1x1 conv.
        x = layers.Conv2D(3, 1, name="channels_to_rgb")(inputs)
    spec = BACKBONES[backbone_name]
    return layers.Rescaling(spec.scale, offset=spec.offset, name="backbone_preprocessing")(x)


def mobilenetv2_unet(input_shape: tuple[int, int, int], num_classes: int, settings: ModelConfig) -> keras.Model:
    """U-Net with a MobileNetV2 encoder and a pix2pix-style decoder (TensorFlow segmentation tutorial).

    ``settings.depth`` (1 to 5) is how many of the backbone's stride-2 stages are used: depth 4 stops
    the encoder at stride 16. The decoder doubles the resolution ``depth`` times with an up-sampling +
    normalisation + ReLU step, joining the backbone's feature map of the same stride each time; the
    last step up-samples straight to the class logits, as in the tutorial. The ``backbone`` setting is
    not used: the architecture's name fixes it.
    """
    depth = settings.depth
    if depth > 5:
        raise ValueError(f"mobilenetv2_unet supports depth 1 to 5 (MobileNetV2 down-samples 5 times), got {depth}")
    blocks.check_input_size(input_shape, 2**depth, "mobilenetv2_unet")
    # Keras builds MobileNetV2 for images of at least 32x32.
    if min(input_shape[:2]) < 32:
        raise ValueError(f"mobilenetv2_unet needs images of at least 32x32, got {input_shape[0]}x{input_shape[1]}")

    backbone_name = "mobilenetv2"
    backbone = build_backbone(backbone_name, input_shape[:2], settings.encoder_weights)
    feature_names = list(BACKBONES[backbone_name].strided_features[:depth])

    inputs = blocks.input_layer(input_shape)
    x = to_backbone_input(inputs, backbone_name)
    *skips, x = encoder(backbone, feature_names)(x)
    x = blocks.maybe_dropout(x, settings.dropout, name="bottleneck_dropout")

    # skips[i] has stride 2**(i + 1); each decoder level up-samples to the next skip's stride.
    for level in reversed(range(1, depth)):
        filters = settings.base_filters * 2**level
        x = blocks.upsample(x, filters, settings.upsampling, name=f"decoder_{level}_up", kernel_size=3)
        x = blocks.normalize(x, settings.normalization, name=f"decoder_{level}_norm")
        x = layers.Activation("relu", name=f"decoder_{level}_relu")(x)
        x = layers.Concatenate(name=f"decoder_{level}_concat")([x, skips[level - 1]])

    # The last step goes from stride 2 to full resolution directly to the class scores.
    x = blocks.upsample(x, num_classes, settings.upsampling, name="decoder_0_up", kernel_size=3)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mobilenetv2_unet")


def atrous_spatial_pyramid_pooling(x, filters: int, normalization: str, name: str = "aspp"):
    """ASPP (Chen et al. 2017): parallel 1x1, dilated 3x3 (rates 6, 12, 18) and image-pooling branches."""
    height, width = x.shape[1:3]
    # The image-level branch has a single pixel, where group or instance normalisation would erase it,
    # so it has a bias and no normalisation.
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    pooled = layers.Conv2D(filters, 1, activation="relu", kernel_initializer="he_normal", name=f"{name}_pool_conv")(
        pooled
    )
    pooled = layers.UpSampling2D((height, width), interpolation="nearest", name=f"{name}_pool_resize")(pooled)
    branches = [pooled, blocks.conv_norm_relu(x, filters, normalization, name=f"{name}_rate1", kernel_size=1)]
    for rate in (6, 12, 18):
        branches.append(blocks.conv_norm_relu(x, filters, normalization, name=f"{name}_rate{rate}", dilation_rate=rate))
    x = layers.Concatenate(name=f"{name}_concat")(branches)
    return blocks.conv_norm_relu(x, filters, normalization, name=f"{name}_projection", kernel_size=1)


def deeplabv3plus(input_shape: tuple[int, int, int], num_classes: int, settings: ModelConfig) -> keras.Model:
    """DeepLabV3+ (Chen et al. 2018) on a ResNet50 or MobileNetV2 backbone at output stride 16.

    Images need a height and width divisible by 16 whatever ``settings.depth``, which this architecture
    does not use. The widths scale with ``base_filters``: ASPP and decoder use 16 x base_filters
    channels (256 with the default 16, as in the paper) and the low-level projection 3 x base_filters (48).
    """
    blocks.check_input_size(input_shape, 16, "deeplabv3plus")
    if min(input_shape[:2]) < 32:
        raise ValueError(f"deeplabv3plus needs images of at least 32x32, got {input_shape[0]}x{input_shape[1]}")
    wide_filters = settings.base_filters * 16
    normalization = settings.normalization

    spec = BACKBONES[settings.backbone]
    backbone = build_backbone(settings.backbone, input_shape[:2], settings.encoder_weights)

    inputs = blocks.input_layer(input_shape)
    x = to_backbone_input(inputs, settings.backbone)
    low_level, x = encoder(backbone, [spec.low_level_feature, spec.high_level_feature])(x)

    x = atrous_spatial_pyramid_pooling(x, wide_filters, normalization)
    x = blocks.maybe_dropout(x, settings.dropout, name="aspp_dropout")

    # Decoder: bring the context features to stride 4, join the projected low-level features, refine.
    x = layers.UpSampling2D(4, interpolation="bilinear", name="decoder_resize_4")(x)
    low_level = blocks.conv_norm_relu(
        low_level, settings.base_filters * 3, normalization, name="decoder_low_level", kernel_size=1
    )
    x = layers.Concatenate(name="decoder_concat")([x, low_level])
    x = blocks.conv_norm_relu(x, wide_filters, normalization, name="decoder_1")
    x = blocks.conv_norm_relu(x, wide_filters, normalization, name="decoder_2")
    x = layers.UpSampling2D(4, interpolation="bilinear", name="decoder_resize_1")(x)

    outputs = blocks.classifier(x, num_classes)
    return keras.Model(inputs, outputs, name=f"deeplabv3plus_{settings.backbone}")
