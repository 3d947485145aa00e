"""Layer blocks shared by every architecture: normalisation, convolution blocks, up-sampling, output head.

Every block works on 2D tensors (batch, height, width, channels) and 3D tensors (batch, depth, height,
width, channels) alike: it reads the number of spatial dimensions from the rank of its input tensor and
picks the matching layer class (Conv2D or Conv3D, MaxPooling2D or MaxPooling3D, ...) through
``layer_class``, so one block library serves both and architectures built from it are dimension-parametric.

Each block is a short function that takes a tensor and its settings and returns a tensor, so that an
architecture reads top to bottom as a list of blocks. Every layer gets an explicit name built from the
block's name, which keeps saved models readable and lets ``set_encoder_trainable`` find the encoder by
the ``encoder`` prefix. Besides built-in Keras layers there are two registered layers, the group and batch
normalisations below; saved models load wherever ``segmenter.models`` has been imported.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import layers, ops

# The layer class of each kind for 2 and 3 spatial dimensions. Normalisation, activation, Add,
# Concatenate, Multiply and Dropout work on tensors of any rank and need no entry.
_LAYER_CLASSES = {
    "conv": {2: layers.Conv2D, 3: layers.Conv3D},
    "transpose": {2: layers.Conv2DTranspose, 3: layers.Conv3DTranspose},
    "max_pool": {2: layers.MaxPooling2D, 3: layers.MaxPooling3D},
    "upsampling": {2: layers.UpSampling2D, 3: layers.UpSampling3D},
}


def spatial_dims(x) -> int:
    """Number of spatial dimensions of a channels-last tensor: 2 for (batch, H, W, C), 3 for (batch, D, H, W, C)."""
    dims = len(x.shape) - 2
    if dims not in (2, 3):
        raise ValueError(f"expected a (batch, height, width, channels) or (batch, depth, height, width, channels) "
                         f"tensor, got shape {tuple(x.shape)}")
    return dims


def layer_class(kind: str, dims: int) -> type:
    """The Keras layer class of ``kind`` ("conv", "transpose", "max_pool", "upsampling") for ``dims`` (2 or 3)."""
    return _LAYER_CLASSES[kind][dims]


def conv(x, filters: int, kernel_size: int, name: str, **kwargs):
    """A Conv2D or Conv3D layer, whichever matches ``x``, applied to ``x``."""
    return layer_class("conv", spatial_dims(x))(filters, kernel_size, name=name, **kwargs)(x)


def max_pool(x, name: str):
    """Halve every spatial size of ``x`` with a 2x2 (2x2x2 in 3D) max pooling."""
    return layer_class("max_pool", spatial_dims(x))(2, name=name)(x)


# Normalisation layers always compute in float32: under the "mixed_float16" policy GroupNormalization's
# variance overflows/underflows in float16 and gives NaN (keras-team/keras issue 22586). Keras casts their
# float16 inputs to float32 and the next layer casts back. Under the float32 policy the layer config is the
# same as without the argument, so float32 models and their saved files are unchanged.
NORMALIZATION_DTYPE = "float32"


@keras.saving.register_keras_serializable(package="segmenter")
class ChannelsLastGroupNormalization(layers.GroupNormalization):
    """Keras' GroupNormalization (same weights, settings and results) computed from per-channel sums.

    Keras reshapes the channels into (groups, channels per group) and takes moments over the spatial axes
    and the channels of a group at once: reductions and their gradients over non-adjacent axes, which on a
    CPU made a 3D U-Net with group norm train at half the speed of the same net without normalisation
    (2.92 against 5.71 patches/s, 3.53 with this layer; a one-off comparison at train_bench.py's 3D setup). Here the mean and mean square of each channel come from one reduction over
    the spatial axes, a group's statistics from those of its channels, and the output is one multiply-add
    per element with a scale and shift per (sample, channel). Channels last (``axis`` -1) only.
    """

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        spatial_axes = tuple(range(1, len(x.shape) - 1))
        channels = x.shape[-1]
        groups = self.groups if self.groups > 0 else channels
        per_group = channels // groups
        channel_mean = ops.mean(x, axis=spatial_axes)  # (batch, channels)
        channel_square = ops.mean(ops.square(x), axis=spatial_axes)
        group_mean = ops.mean(ops.reshape(channel_mean, (-1, groups, per_group)), axis=-1, keepdims=True)
        group_square = ops.mean(ops.reshape(channel_square, (-1, groups, per_group)), axis=-1, keepdims=True)
        # E[x^2] - E[x]^2 may round below 0 where the variance is ~0.
        variance = ops.maximum(group_square - ops.square(group_mean), 0.0)
        scale = ops.rsqrt(variance + self.epsilon) * ops.ones((1, 1, per_group))  # (batch, groups, per_group)
        scale = ops.reshape(scale, (-1, channels))
        shift = -ops.reshape(group_mean * ops.ones((1, 1, per_group)), (-1, channels)) * scale
        if self.scale:
            scale, shift = scale * self.gamma, shift * self.gamma
        if self.center:
            shift = shift + self.beta
        broadcast = (-1, *([1] * len(spatial_axes)), channels)
        outputs = x * ops.reshape(scale, broadcast) + ops.reshape(shift, broadcast)
        return ops.cast(outputs, self.compute_dtype)


def group_normalization(channels: int, name: str) -> layers.Layer:
    # Up to 8 groups, and always a number of groups that divides the channels (GroupNormalization
    # requires it): 16 channels -> 8 groups, 12 channels -> 4 groups, 3 channels -> 1 group.
    return ChannelsLastGroupNormalization(groups=math.gcd(8, channels), name=name, dtype=NORMALIZATION_DTYPE)


def instance_normalization(channels: int, name: str) -> layers.Layer:
    # One group per channel is instance normalisation.
    return ChannelsLastGroupNormalization(groups=-1, name=name, dtype=NORMALIZATION_DTYPE)


@keras.saving.register_keras_serializable(package="segmenter")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization (same weights, settings, results and moving statistics) whose training step
    runs TensorFlow's fused kernel.

    Keras 3 computes batch statistics with ``ops.moments`` and normalises with separate element-wise ops,
    each a pass over the activations forward and backward; tf.keras 2 called the fused kernel, which takes
    the statistics and normalises in one op and has a one-op gradient. On 2 CPU cores the 4-level
    batch-norm U-Net of ``benchmarks/train_bench.py`` in plain Keras trained at 2.37 images/s with this layer
    against 2.16 with Keras' (interleaved rounds), and segmenter's went from 0.89-1.0 to 1.18 times the plain
    Keras model in that script. The kernel returns the unbiased (n - 1) batch variance; Keras keeps the
    biased one in its moving variance, so it is rescaled before the moving averages are updated.
    Channels last only; masks, renorm, synchronised statistics, a frozen layer and inference take Keras'
    own path. It is a BatchNormalization, so ``fold_batch_normalization`` folds it like one.
    """

    def call(self, inputs, training=None, mask=None):
        rank = len(inputs.shape)
        channels_last = self.axis in (-1, rank - 1)
        if not (training and self.trainable and channels_last and mask is None and rank in (4, 5)
                and not self.renorm and not self.synchronized):
            return super().call(inputs, training=training, mask=mask)
        x = ops.cast(inputs, "float32")
        channels = x.shape[-1]
        gamma = ops.cast(self.gamma, "float32") if self.scale else ops.ones((channels,), "float32")
        beta = ops.cast(self.beta, "float32") if self.center else ops.zeros((channels,), "float32")
        outputs, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=self.epsilon, data_format="NHWC" if rank == 4 else "NDHWC", is_training=True)
        count = ops.cast(ops.prod(ops.shape(x)[:-1]), "float32")
        variance = unbiased_variance * (count - 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return ops.cast(outputs, self.compute_dtype)


def batch_normalization(channels: int, name: str) -> layers.Layer:
    return FusedBatchNormalization(name=name, dtype=NORMALIZATION_DTYPE)


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
    x = conv(
        x,
        filters,
        kernel_size,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=normalization == "none",
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )
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
        shortcut = conv(x, filters, 1, use_bias=False, kernel_initializer="he_normal", name=f"{name}_shortcut_conv")
        shortcut = normalize(shortcut, normalization, name=f"{name}_shortcut_norm")
    x = conv_norm_relu(x, filters, normalization, name=f"{name}_1")
    x = conv(
        x,
        filters,
        3,
        padding="same",
        use_bias=normalization == "none",
        kernel_initializer="he_normal",
        name=f"{name}_2_conv",
    )
    x = normalize(x, normalization, name=f"{name}_2_norm")
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_relu")(x)


def attention_gate(skip, gating, inter_filters: int, name: str):
    """Weight the skip connection by attention coefficients computed from the decoder (Oktay et al. 2018).

    ``gating`` is the up-sampled decoder tensor at the skip's resolution. The gate learns a map in
    [0, 1] per pixel (voxel in 3D) that suppresses skip features away from the structure the decoder is looking for.
    """
    theta = conv(skip, inter_filters, 1, use_bias=False, kernel_initializer="he_normal", name=f"{name}_skip")
    phi = conv(gating, inter_filters, 1, kernel_initializer="he_normal", name=f"{name}_gating")
    x = layers.Add(name=f"{name}_add")([theta, phi])
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    coefficients = conv(x, 1, 1, activation="sigmoid", name=f"{name}_coefficients")
    # Multiply broadcasts the single-channel coefficients over the skip's channels.
    return layers.Multiply(name=f"{name}_apply")([skip, coefficients])


def transpose_upsample(x, filters: int, name: str, kernel_size: int = 2):
    """Double the resolution with a learned transposed convolution."""
    return layer_class("transpose", spatial_dims(x))(
        filters, kernel_size, strides=2, padding="same", kernel_initializer="he_normal", name=f"{name}_transpose"
    )(x)


def resize_upsample(x, filters: int, name: str, kernel_size: int = 2):
    """Double the resolution by resizing (bilinear in 2D, nearest in 3D), then a convolution sets the channels.

    Resizing avoids the checkerboard artefacts that transposed convolutions can produce.
    """
    dims = spatial_dims(x)
    # UpSampling3D only repeats voxels (it has no interpolation option), and a trilinear resize would
    # need a Lambda or custom layer, which would stop saved models loading in safe mode. In 3D,
    # nearest-neighbour repetition followed by the convolution below is still free of the checkerboard
    # pattern, and the convolution smooths the blocky result.
    interpolation = {"interpolation": "bilinear"} if dims == 2 else {}
    x = layer_class("upsampling", dims)(2, name=f"{name}_resize", **interpolation)(x)
    return conv(x, filters, kernel_size, padding="same", kernel_initializer="he_normal", name=f"{name}_conv")


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


def classifier(x, num_classes: int, prefix: str = ""):
    """Per-pixel (per-voxel in 3D) class probabilities; ``prefix`` names an auxiliary head's layers.

    The softmax runs in float32 whatever the global dtype policy, so that under mixed precision the
    probabilities and the loss computed from them keep full precision.
    """
    x = conv(x, num_classes, 1, name=f"{prefix}logits")
    return layers.Activation("softmax", dtype="float32", name=f"{prefix}probabilities")(x)


def check_input_size(input_shape: tuple[int, ...], divisor: int, architecture: str) -> None:
    """Raise ValueError unless every spatial size is a positive multiple of ``divisor``.

    ``input_shape`` is (height, width, channels) for 2D images or (depth, height, width, channels) for
    3D volumes.
    """
    if len(input_shape) not in (3, 4):
        raise ValueError(
            f"input_shape must be (height, width, channels) or (depth, height, width, channels), "
            f"got {tuple(input_shape)}"
        )
    *spatial, channels = input_shape
    if channels is None or channels < 1:
        raise ValueError(f"input_shape must have at least one channel, got {tuple(input_shape)}")
    sizes = "x".join(str(size) for size in spatial)
    names = "image height and width" if len(spatial) == 2 else "volume depth, height and width"
    for size in spatial:
        if size is None or size <= 0 or size % divisor:
            raise ValueError(
                f"{architecture} needs {names} divisible by {divisor}, got {sizes}; "
                + ("resize the images (preload.image_size)" if len(spatial) == 2 else "change preload.patch_size")
                + " or lower model.depth"
            )


def input_layer(input_shape: tuple[int, ...]) -> keras.KerasTensor:
    """The float32 model input for (height, width, channels) images or (depth, height, width, channels) volumes."""
    return keras.Input(shape=tuple(input_shape), dtype="float32", name="image")
