"""3D architectures and MedPatchNet: shapes, probabilities, one training step, .keras round trip.

Volumes are 16x16x16 with 4 base filters and depth 2, so that the whole file runs in seconds on two
CPU cores. The 2D models must keep the layer names they had before the blocks became dimension-parametric.
"""
import keras
import numpy as np
import pytest

from segmenter.models import ARCHITECTURES, blocks, build_model, set_encoder_trainable

NUM_CLASSES = 3
SIZE = 16
VOLUMETRIC_CASES = [
    {"architecture": "unet"},
    {"architecture": "residual_unet", "dropout": 0.3},
    {"architecture": "attention_unet", "upsampling": "resize"},
    {"architecture": "medpatchnet"},
    {"architecture": "medpatchnet", "upsampling": "resize", "normalization": "instance", "dropout": 0.2},
]


def random_volumes(shape, count=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (count, *shape)).astype("float32")


def random_masks(shape, count=2, seed=1):
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, (count, *shape[:-1]))
    return np.eye(NUM_CLASSES, dtype="float32")[labels]


def check_model(model, input_shape, tmp_path):
    """Probabilities of the right shape; one finite training step; identical predictions after reloading."""
    # Eager calls and an eager training step: tracing a graph for each tiny model would take most of the time.
    images = random_volumes(input_shape)
    probabilities = keras.ops.convert_to_numpy(model(images, training=False))
    assert probabilities.shape == (2, *input_shape[:-1], NUM_CLASSES)
    assert probabilities.dtype == np.float32
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)

    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", run_eagerly=True)
    loss = model.train_on_batch(images, random_masks(input_shape))
    assert np.isfinite(float(np.asarray(loss).ravel()[0]))

    expected = keras.ops.convert_to_numpy(model(images, training=False))
    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # safe mode: only built-in layers may be in the file
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(images, training=False)), expected, atol=1e-6)


@pytest.mark.parametrize("settings", VOLUMETRIC_CASES, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_volumetric_models(settings, tmp_path):
    keras.utils.set_random_seed(0)
    input_shape = (SIZE, SIZE, SIZE, 1)
    model = build_model({"depth": 2, "base_filters": 4, **settings}, input_shape, NUM_CLASSES)
    assert model.name == settings["architecture"]
    assert any(isinstance(layer, keras.layers.Conv3D) for layer in model.layers)
    layers_2d = (keras.layers.Conv2D, keras.layers.Conv2DTranspose, keras.layers.MaxPooling2D,
                 keras.layers.UpSampling2D)
    assert not any(isinstance(layer, layers_2d) for layer in model.layers)
    check_model(model, input_shape, tmp_path)


@pytest.mark.parametrize("base_filters", [2, 6])
def test_medpatchnet_2d(base_filters, tmp_path):
    # 2 filters are fewer than the 4 pyramid branches; 6 does not divide by 4.
    keras.utils.set_random_seed(0)
    input_shape = (32, 32, 2)
    settings = {"architecture": "medpatchnet", "depth": 2, "base_filters": base_filters}
    model = build_model(settings, input_shape, NUM_CLASSES)
    assert not any(isinstance(layer, keras.layers.Conv3D) for layer in model.layers)
    assert model.get_layer("encoder_0_1_concat").output.shape[-1] == base_filters
    check_model(model, input_shape, tmp_path)


def test_medpatchnet_is_a_pyramid_of_dilated_convolutions_with_fusion_and_residuals():
    model = build_model({"architecture": "medpatchnet", "depth": 2, "base_filters": 8}, (16, 16, 16, 1), 2)
    rates = [model.get_layer(f"encoder_1_1_rate{rate}_conv").dilation_rate for rate in (1, 2, 4, 8)]
    assert rates == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert model.get_layer("encoder_1_1_reduce").kernel_size == (1, 1, 1)
    assert model.get_layer("encoder_1_1_reduce").filters == 16 // 4
    # Hierarchical feature fusion: rate 4 is added to rate 2, rate 8 to their sum.
    assert isinstance(model.get_layer("encoder_1_1_rate8_fuse"), keras.layers.Add)
    # The first block of a level changes the channels (no residual); the second keeps them (residual).
    names = {layer.name for layer in model.layers}
    assert "encoder_1_1_residual" not in names and "encoder_1_2_residual" in names
    assert set_encoder_trainable(model, False) == sum(name.startswith("encoder_") for name in names)
    assert model.get_layer("probabilities").dtype_policy.compute_dtype == "float32"
    assert "medpatchnet" in ARCHITECTURES


def test_3d_input_size_must_divide_by_two_to_the_depth():
    with pytest.raises(ValueError, match="divisible by 4, got 16x16x18"):
        build_model({"depth": 2}, (16, 16, 18, 1), 2)
    with pytest.raises(ValueError, match="divisible by 8, got 4x16x16"):
        build_model({"architecture": "medpatchnet", "depth": 3}, (4, 16, 16, 1), 2)
    with pytest.raises(ValueError, match=r"\(depth, height, width, channels\)"):
        blocks.check_input_size((16, 16, 16, 16, 1), 4, "unet")
    with pytest.raises(ValueError, match="2D only"):
        build_model({"architecture": "mobilenetv2_unet", "depth": 2}, (32, 32, 32, 1), 2)


def test_2d_layer_names_are_unchanged_and_shared_by_3d():
    names = {}
    for shape in [(32, 32, 1), (16, 16, 16, 1)]:
        model = build_model({"architecture": "attention_unet", "depth": 2, "base_filters": 4}, shape, 2)
        names[len(shape)] = [layer.name for layer in model.layers]
    expected = [
        "image", "encoder_0_1_conv", "encoder_0_1_norm", "encoder_0_1_relu", "encoder_0_2_conv", "encoder_0_pool",
        "bottleneck_2_relu", "decoder_1_up_transpose", "decoder_0_attention_skip", "decoder_0_attention_gating",
        "decoder_0_attention_coefficients", "decoder_0_attention_apply", "decoder_0_concat", "decoder_0_2_relu",
        "logits", "probabilities",
    ]
    assert set(expected) <= set(names[3])
    assert names[3] == names[4]
    resize = build_model({"depth": 1, "base_filters": 4, "upsampling": "resize"}, (16, 16, 1), 2)
    assert isinstance(resize.get_layer("decoder_0_up_resize"), keras.layers.UpSampling2D)
    assert resize.get_layer("decoder_0_up_resize").interpolation == "bilinear"
    assert isinstance(resize.get_layer("decoder_0_up_conv"), keras.layers.Conv2D)
    residual = build_model({"architecture": "residual_unet", "depth": 1, "base_filters": 4}, (16, 16, 1), 2)
    assert {"encoder_0_shortcut_conv", "encoder_0_2_conv", "encoder_0_add"} <= {layer.name for layer in residual.layers}
