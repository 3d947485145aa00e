"""Deep supervision: auxiliary outputs at the decoder's coarser levels, their share of the loss, and a
model that trains on them but predicts, saves and loads like any other."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from segmenter.config import ModelConfig
from segmenter.losses import get_loss
from segmenter.models import build_model, inference_model
from segmenter.models.deep_supervision import (DeepSupervisionModel, downsample_labels, level_weights,
                                               supervised_levels)

NUM_CLASSES = 3


def test_levels_and_weights_follow_nnunet():
    # The lowest decoder level (just after the bottleneck) is left out, except in a 2-level network.
    assert supervised_levels(2) == [1] and supervised_levels(3) == [1] and supervised_levels(5) == [1, 2, 3]
    assert supervised_levels(1) == []
    weights = level_weights([1, 2])
    assert np.allclose(weights, np.array([1, 0.5, 0.25]) / 1.75) and np.isclose(sum(weights), 1)


def test_labels_are_downsampled_to_exact_one_hot_by_nearest_neighbour():
    labels = np.random.default_rng(0).integers(0, NUM_CLASSES, (2, 8, 12, 4))
    one_hot = keras.ops.one_hot(labels, NUM_CLASSES)
    small = keras.ops.convert_to_numpy(downsample_labels(one_hot, 4))
    assert small.shape == (2, 2, 3, 1, NUM_CLASSES)
    np.testing.assert_array_equal(small.argmax(-1), labels[:, ::4, ::4, ::4])
    assert set(np.unique(small)) == {0.0, 1.0}


@pytest.mark.parametrize("architecture, input_shape, depth, aux_sizes", [
    ("unet", (32, 32, 1), 4, [16, 8]),
    ("residual_unet", (16, 16, 8, 2), 3, [(8, 8, 4)]),
    ("medpatchnet", (16, 16, 16, 1), 2, [(8, 8, 8)]),
])
def test_the_loss_is_the_weighted_sum_over_levels_and_only_the_main_output_is_predicted(
        architecture, input_shape, depth, aux_sizes):
    model = build_model(ModelConfig(architecture=architecture, depth=depth, base_filters=4, deep_supervision=True),
                        input_shape, NUM_CLASSES)
    assert isinstance(model, DeepSupervisionModel)
    shapes = [tuple(output.shape[1:-1]) for output in model.outputs]
    assert shapes == [tuple(input_shape[:-1])] + [size if isinstance(size, tuple) else (size, size)
                                                  for size in aux_sizes]
    loss = get_loss("dice_ce", NUM_CLASSES)
    model.compile(optimizer="adam", loss=loss)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, *input_shape)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, (2, *input_shape[:-1]))
    y = keras.ops.one_hot(labels, NUM_CLASSES)

    outputs = model(x, training=True)
    weights = level_weights(supervised_levels(depth))
    expected = weights[0] * float(loss(y, outputs[0]))
    for weight, output in zip(weights[1:], outputs[1:]):
        factor = input_shape[0] // output.shape[1]
        expected += weight * float(loss(keras.ops.one_hot(labels[(slice(None),) + (slice(None, None, factor),)
                                                                 * (len(input_shape) - 1)], NUM_CLASSES), output))
    assert np.isclose(float(model.compute_loss(x, y, outputs)), expected, rtol=1e-5)

    # Outside training the model is a single-output segmentation model; its validation loss the main one's.
    predicted = model.predict(x, verbose=0)
    assert predicted.shape == (2, *input_shape[:-1], NUM_CLASSES)
    np.testing.assert_allclose(predicted.sum(-1), 1.0, atol=1e-5)
    plain = inference_model(model)
    assert not isinstance(plain, DeepSupervisionModel) and plain.output_shape == (None, *input_shape[:-1], NUM_CLASSES)
    np.testing.assert_allclose(plain.predict(x, verbose=0), predicted, atol=1e-6)
    assert np.isclose(float(model.compute_loss(x, y, model(x))), float(loss(y, predicted)), rtol=1e-5)


def test_training_moves_the_auxiliary_heads_and_the_saved_model_loads_in_safe_mode(tmp_path):
    # Loading in a fresh process, with the loss and metrics: test_models' unet_deep_supervision case.
    model = build_model(ModelConfig(depth=3, base_filters=4, deep_supervision=True), (16, 16, 16, 1), NUM_CLASSES)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=get_loss("dice_ce", NUM_CLASSES))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 16, 16, 16, 1)).astype("float32")
    y = keras.ops.one_hot(rng.integers(0, NUM_CLASSES, (2, 16, 16, 16)), NUM_CLASSES)
    head = model.get_layer("deep_supervision_1_logits")
    before = keras.ops.convert_to_numpy(head.kernel).copy()
    model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(3), epochs=1, verbose=0)
    assert not np.allclose(keras.ops.convert_to_numpy(head.kernel), before)

    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False, safe_mode=True)
    assert isinstance(loaded, DeepSupervisionModel)
    np.testing.assert_allclose(inference_model(loaded).predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_deep_supervision_is_refused_for_the_backbone_networks():
    with pytest.raises(ValueError, match="deep_supervision is for unet"):
        ModelConfig(architecture="deeplabv3plus", deep_supervision=True)
    assert not isinstance(build_model(ModelConfig(depth=2, base_filters=4), (16, 16, 1), 2), DeepSupervisionModel)
