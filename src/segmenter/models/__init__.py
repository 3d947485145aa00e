"""Segmentation architectures: ``build_model(settings, input_shape, num_classes)`` and the registry behind it."""
from segmenter.models.factory import (
    ARCHITECTURES,
    ENCODER_PREFIX,
    PRETRAINED_ENCODER_ARCHITECTURES,
    build_model,
    set_encoder_trainable,
)
from segmenter.models.deep_supervision import inference_model
from segmenter.models.folding import fold_batch_normalization
from segmenter.models.positions import takes_positions
from segmenter.models.precision import with_precision

__all__ = [
    "ARCHITECTURES",
    "ENCODER_PREFIX",
    "PRETRAINED_ENCODER_ARCHITECTURES",
    "build_model",
    "fold_batch_normalization",
    "inference_model",
    "set_encoder_trainable",
    "takes_positions",
    "with_precision",
]
