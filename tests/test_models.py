"""Architectures: output shapes, saving and loading in a fresh process, encoder weights, freezing, training.

Models are kept tiny (32x32 or 64x64 images, few filters) so that the file runs in well under a minute
on two CPU cores. No test downloads anything: encoder weights come from files the tests write.
"""
import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from segmenter.config import ModelConfig
from segmenter.losses import get_loss
from segmenter.metrics import get_metrics
from segmenter.models import ARCHITECTURES, backbones, build_model, set_encoder_trainable

# (case id, settings, image size): small enough to be fast, deep enough to exercise every level.
SMALL_MODELS = [
    ("unet", {"architecture": "unet", "depth": 2, "base_filters": 4}, 32),
    ("attention_unet", {"architecture": "attention_unet", "depth": 2, "base_filters": 4}, 32),
    ("residual_unet", {"architecture": "residual_unet", "depth": 2, "base_filters": 4, "dropout": 0.3}, 32),
    ("mobilenetv2_unet", {"architecture": "mobilenetv2_unet", "depth": 4, "base_filters": 4}, 64),
    ("deeplabv3plus_mobilenetv2", {"architecture": "deeplabv3plus", "base_filters": 2, "backbone": "mobilenetv2"}, 64),
    ("deeplabv3plus_resnet50", {"architecture": "deeplabv3plus", "base_filters": 2, "backbone": "resnet50"}, 64),
    ("medpatchnet", {"architecture": "medpatchnet", "depth": 2, "base_filters": 4}, 32),
    ("unet_deep_supervision", {"architecture": "unet", "depth": 3, "base_filters": 4, "deep_supervision": True}, 32),
    ("unet_batch_norm", {"architecture": "unet", "depth": 2, "base_filters": 4, "normalization": "batch"}, 32),
]
NUM_CLASSES = 3


def random_images(size, channels=1, count=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (count, size, size, channels)).astype("float32")


def test_every_architecture_has_a_case():
    assert {settings["architecture"] for _, settings, _ in SMALL_MODELS} == set(ARCHITECTURES)


@pytest.mark.parametrize("case, settings, size", SMALL_MODELS, ids=[case for case, _, _ in SMALL_MODELS])
def test_output_is_a_probability_map(case, settings, size):
    model = build_model(settings, (size, size, 1), NUM_CLASSES)
    probabilities = model.predict(random_images(size), verbose=0)
    assert probabilities.shape == (2, size, size, NUM_CLASSES)
    assert probabilities.dtype == np.float32
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "settings, size",
    [
        ({"architecture": "unet", "normalization": "batch", "upsampling": "resize"}, 32),
        ({"architecture": "residual_unet", "normalization": "instance"}, 32),
        ({"architecture": "attention_unet", "normalization": "none", "dropout": 0.5}, 32),
        ({"architecture": "mobilenetv2_unet", "upsampling": "resize", "normalization": "group", "depth": 5}, 64),
        ({"architecture": "deeplabv3plus", "normalization": "instance", "dropout": 0.1}, 32),
    ],
)
def test_settings_variants_build(settings, size):
    model = build_model({"depth": 2, "base_filters": 4, **settings}, (size, size, 3), 2)
    assert model.output_shape == (None, size, size, 2)


def test_accepts_a_pydantic_config_and_applies_defaults():
    model = build_model(ModelConfig(depth=2, base_filters=4), (32, 32, 1), 2)
    assert model.name == "unet"
    # The default normalisation is group normalisation with 8 groups when the channels allow it, and
    # a divisor of the channels otherwise (4 filters -> 4 groups).
    groups = {layer.name: layer.groups for layer in model.layers if isinstance(layer, keras.layers.GroupNormalization)}
    assert groups["encoder_0_1_norm"] == 4
    assert groups["encoder_1_1_norm"] == 8
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


@pytest.mark.parametrize("shape, groups", [((2, 6, 7, 5, 16), 8), ((3, 9, 11, 32), 8), ((2, 5, 6, 4, 12), -1),
                                            ((2, 8, 8, 3), 1)])
def test_group_normalization_matches_keras_in_values_and_gradients(shape, groups):
    import tensorflow as tf

    from segmenter.models.blocks import ChannelsLastGroupNormalization

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(3.0, 2.0, shape).astype(np.float32))  # a mean far from 0, as after a convolution
    reference, ours = keras.layers.GroupNormalization(groups=groups), ChannelsLastGroupNormalization(groups=groups)
    reference.build(shape)
    ours.build(shape)
    weights = [rng.normal(1.0, 0.3, w.shape).astype(np.float32) for w in reference.weights]
    reference.set_weights(weights)
    ours.set_weights(weights)
    results = []
    for layer in (reference, ours):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.sin(x))
        results.append([y, *tape.gradient(loss, [x, *layer.trainable_weights])])
    for expected, actual in zip(*results):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(4, 9, 11, 16), (2, 5, 6, 7, 8)])
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_fused_batch_normalization_trains_like_keras(shape, policy):
    """Outputs, gradients (input, gamma, beta) and moving statistics over training steps, then inference, equal
    those of Keras' BatchNormalization; under mixed precision on a float16 input as well."""
    import tensorflow as tf

    from segmenter.models.blocks import NORMALIZATION_DTYPE, FusedBatchNormalization

    rng = np.random.default_rng(0)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        reference = keras.layers.BatchNormalization(dtype=NORMALIZATION_DTYPE)
        ours = FusedBatchNormalization(dtype=NORMALIZATION_DTYPE)
        for layer in (reference, ours):
            layer.build(shape)
        weights = [rng.normal(1.0, 0.3, w.shape).astype(np.float32) for w in reference.weights]
        weights[3] = np.abs(weights[3])  # a variance
        reference.set_weights(weights)
        ours.set_weights(weights)
        input_dtype = "float16" if policy == "mixed_float16" else "float32"
        for step in range(3):
            # A mean far from 0 and a spread far from 1, as after a convolution.
            x = tf.constant(rng.normal(3.0, 2.0, shape).astype(input_dtype))
            weight = tf.constant(rng.normal(size=shape).astype(np.float32))
            results = []
            for layer in (reference, ours):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = layer(x, training=True)
                    loss = tf.reduce_sum(tf.cast(y, "float32") * weight)
                gradients = tape.gradient(loss, [x, *layer.trainable_weights])
                results.append([y, *gradients, layer.moving_mean, layer.moving_variance])
            assert results[1][0].dtype == results[0][0].dtype
            for expected, actual in zip(*results):
                np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                                           rtol=2e-4, atol=2e-4)
        assert not np.allclose(ours.moving_mean.numpy(), weights[2])  # the statistics moved
        np.testing.assert_allclose(ours(x, training=False), reference(x, training=False), rtol=1e-5, atol=1e-5)
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("settings, shape", [
    ({"architecture": "unet", "depth": 2, "base_filters": 4, "normalization": "batch"}, (32, 32, 1)),
    ({"architecture": "residual_unet", "depth": 1, "base_filters": 4, "normalization": "batch"}, (8, 16, 16, 2)),
    ({"architecture": "mobilenetv2_unet", "depth": 4, "base_filters": 4}, (64, 64, 1)),
])
def test_folding_batch_normalization_keeps_the_predictions(settings, shape):
    from segmenter.models import fold_batch_normalization

    model = build_model(settings, shape, NUM_CLASSES)
    rng = np.random.default_rng(0)
    for layer in model._flatten_layers():  # trained-looking statistics, not the initial 0 and 1
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.5, size))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size))
            layer.beta.assign(rng.normal(0, 0.2, size))
    folded = fold_batch_normalization(model)
    images = rng.normal(size=(2, *shape)).astype(np.float32)
    np.testing.assert_allclose(folded.predict_on_batch(images), model.predict_on_batch(images), atol=2e-5)
    top_level_norms = [layer for layer in folded.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if settings["architecture"] != "mobilenetv2_unet":
        assert not top_level_norms  # every conv + batch norm pair was folded
    assert fold_batch_normalization(build_model({"depth": 1, "base_filters": 4}, (16, 16, 1), 2)).name == "unet"


PRECISION_CASES = [*SMALL_MODELS, ("unet_3d", {"architecture": "unet", "depth": 2, "base_filters": 8}, 16),
                   ("medpatchnet_positions_3d", {"architecture": "medpatchnet", "depth": 2, "base_filters": 4,
                                                 "position_conditioning": True}, 16)]


@pytest.mark.parametrize("case, settings, size", PRECISION_CASES, ids=[case for case, _, _ in PRECISION_CASES])
def test_bfloat16_prediction_computes_convolutions_in_bfloat16_and_keeps_the_probabilities(case, settings, size):
    from segmenter.models import fold_batch_normalization, inference_model, with_precision

    keras.utils.set_random_seed(0)
    # A position-conditioned model takes the patch's 3 position channels after the image's.
    channels = 4 if settings.get("position_conditioning") else 1
    shape = (size, size, size, channels) if case.endswith("3d") else (size, size, channels)
    # As the predict stage loads a model: single output, batch norm folded.
    model = fold_batch_normalization(inference_model(build_model(settings, shape, NUM_CLASSES)))
    model(np.zeros((1, *shape), np.float32))
    bfloat16 = with_precision(model, "bfloat16")
    assert with_precision(model, None) is model
    layers_of = {layer.name: layer for layer in bfloat16._flatten_layers() if not isinstance(layer, keras.Model)}
    convolutions = [layer for layer in layers_of.values() if isinstance(layer, keras.layers.Conv2D | keras.layers.Conv3D)]
    assert convolutions and all(layer.compute_dtype == "bfloat16" for layer in convolutions)
    assert all(layer.dtype_policy.name == "float32" for layer in layers_of.values()
               if isinstance(layer, keras.layers.GroupNormalization | keras.layers.BatchNormalization))
    for original, cloned in zip(model.weights, bfloat16.weights, strict=True):  # the float32 weights, unchanged
        assert cloned.dtype == "float32"
        np.testing.assert_array_equal(np.asarray(cloned), np.asarray(original))
    images = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    expected, probabilities = model.predict_on_batch(images), bfloat16.predict_on_batch(images)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    # bfloat16 keeps 8 significant bits: on random images through these untrained nets the probabilities
    # move by 0.003 or less on average, a few hundredths at most (attention gates amplify it most).
    difference = np.abs(probabilities - expected)
    assert difference.mean() < 0.01 and difference.max() < 0.1
    # And back: the bfloat16 clone at float32 predicts as the original.
    np.testing.assert_allclose(with_precision(bfloat16, "float32").predict_on_batch(images), expected, atol=1e-5)


def test_a_model_trained_with_mixed_precision_predicts_in_float32_when_asked():
    from segmenter.models import with_precision

    keras.utils.set_random_seed(0)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model({"depth": 2, "base_filters": 4}, (32, 32, 1), 2)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("logits").compute_dtype == "float16"
    float32 = with_precision(model, "float32")
    assert {layer.compute_dtype for layer in float32.layers} == {"float32"}
    images = random_images(32)
    # float16 keeps 11 significant bits: the float32 clone differs from it by a few thousandths.
    np.testing.assert_allclose(float32.predict_on_batch(images), model.predict_on_batch(images), atol=0.02)


def test_bfloat16_warning_only_where_no_device_computes_it(tmp_path):
    from segmenter.models.precision import bfloat16_is_emulated, cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert {"avx2", "avx512_bf16"} <= cpu_flags(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\n")  # Arm (e.g. Graviton3)
    assert "bf16" in cpu_flags(cpuinfo)
    assert cpu_flags(tmp_path / "missing") == set()
    assert not bfloat16_is_emulated([], {"avx512_bf16"}) and not bfloat16_is_emulated([], {"amx_bf16"})
    assert not bfloat16_is_emulated([], {"bf16"})
    assert bfloat16_is_emulated([], {"avx2", "avx512f"})
    # With GPUs the model runs there: Ampere (8.0) and later compute bfloat16, a T4 (7.5) does not.
    assert not bfloat16_is_emulated([(8, 0), (9, 0)], set())
    assert bfloat16_is_emulated([(7, 5)], {"avx512_bf16"})
    assert not bfloat16_is_emulated([None], set())  # capability unknown: no warning


def test_the_bfloat16_notice_is_given_only_where_bfloat16_would_be_emulated(monkeypatch):
    from segmenter.models import precision

    monkeypatch.setattr(precision, "gpu_capabilities", lambda: [])
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert "is emulated and unlikely to be faster" in precision.emulation_notice("bfloat16")
    assert precision.emulation_notice("float32") is None and precision.emulation_notice(None) is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    assert precision.emulation_notice("bfloat16") is None


def test_default_unet_is_four_levels_of_doubling_filters():
    model = build_model({}, (256, 256, 1), 2)
    widths = [model.get_layer(f"encoder_{level}_1_conv").filters for level in range(4)]
    assert widths == [16, 32, 64, 128]
    assert model.get_layer("bottleneck_1_conv").filters == 256
    assert model.get_layer("bottleneck_1_conv").kernel_initializer.__class__.__name__ == "HeNormal"


def test_normalization_choices():
    def normalization_layers(normalization):
        model = build_model({"depth": 1, "base_filters": 16, "normalization": normalization}, (32, 32, 1), 2)
        return [layer for layer in model.layers if layer.name.endswith("_norm")]

    # Instance normalisation is one group per channel (GroupNormalization resolves groups=-1 when built).
    instance = normalization_layers("instance")
    assert all(layer.groups == layer.input.shape[-1] for layer in instance)
    assert {layer.groups for layer in instance} == {16, 32}
    assert all(layer.groups == 8 for layer in normalization_layers("group"))
    assert all(type(layer).__name__ == "FusedBatchNormalization" for layer in normalization_layers("batch"))
    assert all(isinstance(layer, keras.layers.Identity) for layer in normalization_layers("none"))


@pytest.mark.parametrize(
    "settings, input_shape, message",
    [
        ({"architecture": "unet", "depth": 3}, (36, 36, 1), "divisible by 8"),
        ({"architecture": "residual_unet", "depth": 2}, (32, 30, 1), "divisible by 4"),
        ({"architecture": "mobilenetv2_unet", "depth": 4}, (72, 72, 1), "divisible by 16"),
        ({"architecture": "mobilenetv2_unet", "depth": 6}, (128, 128, 1), "depth 1 to 5"),
        ({"architecture": "mobilenetv2_unet", "depth": 2}, (16, 16, 1), "at least 32x32"),
        ({"architecture": "deeplabv3plus", "depth": 2}, (40, 40, 1), "divisible by 16"),
        ({"architecture": "unet"}, (32, 32), "height, width, channels"),
    ],
)
def test_bad_input_shapes_raise_value_error(settings, input_shape, message):
    with pytest.raises(ValueError, match=message):
        build_model(settings, input_shape, 2)


def test_bad_settings_raise_value_error():
    with pytest.raises(ValueError, match="architecture"):
        build_model({"architecture": "segnet"}, (32, 32, 1), 2)
    with pytest.raises(ValueError, match="base_filter"):
        build_model({"base_filter": 8}, (32, 32, 1), 2)
    with pytest.raises(ValueError, match="num_classes"):
        build_model({}, (32, 32, 1), 1)


def test_output_is_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model({"depth": 2, "base_filters": 4}, (32, 32, 1), 2)
        assert model.get_layer("logits").compute_dtype == "float16"
        assert model.output.dtype == "float32"
    finally:
        keras.config.set_dtype_policy(previous)


LOAD_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import segmenter.losses, segmenter.metrics, segmenter.models

    folder = sys.argv[1]
    cases = json.loads(open(f"{folder}/cases.json").read())
    report = {}
    for case, size in cases.items():
        model = keras.models.load_model(f"{folder}/{case}.keras")
        images = np.load(f"{folder}/{case}_images.npy")
        np.save(f"{folder}/{case}_loaded.npy", model.predict(images, verbose=0))
        report[case] = {
            "loss": type(model.loss).__name__,
            "metrics": model.evaluate(images, np.load(f"{folder}/{case}_truth.npy"), verbose=0, return_dict=True),
        }
    print(json.dumps(report))
    """
)


def test_every_architecture_saves_and_loads_in_a_fresh_process(tmp_path):
    cases = {}
    for case, settings, size in SMALL_MODELS:
        model = build_model(settings, (size, size, 1), NUM_CLASSES)
        model.compile(
            optimizer="adam",
            loss=get_loss("dice_ce", NUM_CLASSES, [0.5, 1.0, 1.0]),
            metrics=get_metrics(["background", "disc", "vertebra"]),
        )
        images = random_images(size, seed=len(cases))
        truth = np.eye(NUM_CLASSES, dtype="float32")[np.random.default_rng(1).integers(0, NUM_CLASSES, (2, size, size))]
        np.save(tmp_path / f"{case}_images.npy", images)
        np.save(tmp_path / f"{case}_truth.npy", truth)
        np.save(tmp_path / f"{case}_expected.npy", model.predict(images, verbose=0))
        model.save(tmp_path / f"{case}.keras")
        cases[case] = size
    (tmp_path / "cases.json").write_text(json.dumps(cases))

    result = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    for case in cases:
        np.testing.assert_allclose(
            np.load(tmp_path / f"{case}_loaded.npy"), np.load(tmp_path / f"{case}_expected.npy"), atol=1e-6, err_msg=case
        )
        assert report[case]["loss"] == "DiceCrossEntropyLoss"
        assert {"loss", "mean_foreground_dice", "dice_disc", "dice_vertebra"} <= set(report[case]["metrics"])


@pytest.mark.parametrize(
    "settings, backbone_name, layer_name",
    [
        ({"architecture": "mobilenetv2_unet", "depth": 3}, "mobilenetv2", "block_2_expand"),
        ({"architecture": "deeplabv3plus", "backbone": "resnet50"}, "resnet50", "conv2_block1_1_conv"),
    ],
)
def test_encoder_weights_load_from_a_local_file(tmp_path, settings, backbone_name, layer_name):
    keras.utils.set_random_seed(1)
    source = backbones.build_backbone(backbone_name, (64, 64), encoder_weights=None)
    weights_file = tmp_path / "encoder.weights.h5"
    source.save_weights(weights_file)
    expected = source.get_layer(layer_name).get_weights()

    # The file is used at another image size: convolution weights do not depend on it.
    settings = {**settings, "base_filters": 2}
    loaded = build_model({**settings, "encoder_weights": str(weights_file)}, (128, 128, 1), 2)
    random = build_model(settings, (128, 128, 1), 2)
    loaded_weights = loaded.get_layer("encoder").get_layer(layer_name).get_weights()
    random_weights = random.get_layer("encoder").get_layer(layer_name).get_weights()
    for want, got in zip(expected, loaded_weights):
        np.testing.assert_array_equal(got, want)
    # The kernel of a randomly initialised encoder differs (biases start at zero in both).
    assert not np.array_equal(random_weights[0], expected[0])

    with pytest.raises(ValueError, match="neither"):
        build_model({**settings, "encoder_weights": str(tmp_path / "missing.weights.h5")}, (64, 64, 1), 2)


def test_encoder_batch_normalization_is_fused_and_computes_as_keras():
    keras.utils.set_random_seed(2)
    plain = backbones.build_backbone("mobilenetv2", (32, 32), encoder_weights=None)
    assert "block_16_project_BN" in [layer.name for layer in plain.layers]
    fused = backbones.encoder(plain, ["block_16_project_BN"])
    assert fused.name == "encoder"
    kinds = [type(layer).__name__ for layer in fused.layers]
    assert kinds.count("FusedBatchNormalization") == 51 and "BatchNormalization" not in kinds
    images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    reference = keras.Model(plain.input, plain.get_layer("block_16_project_BN").output)
    np.testing.assert_allclose(fused(images, training=False), reference(images, training=False), rtol=1e-5, atol=1e-5)
    # In training each of 51 layers normalises with batch statistics (of 4 values per channel at the last
    # level, 1 x 1 pixels), whose rounding differs between the kernels: a little apart after 51 of them.
    np.testing.assert_allclose(fused(images, training=True), reference(images, training=True), rtol=0, atol=5e-3)
    np.testing.assert_allclose(fused.get_layer("bn_Conv1").moving_mean, plain.get_layer("bn_Conv1").moving_mean,
                               rtol=1e-5, atol=1e-6)


def test_imagenet_weights_are_requested_from_keras_applications(monkeypatch):
    # Downloading is not allowed in tests: record what the constructor is asked for, build without weights.
    requested = []
    real = backbones.BACKBONES["mobilenetv2"]

    def recording_constructor(**kwargs):
        requested.append(kwargs["weights"])
        return real.constructor(**{**kwargs, "weights": None})

    fake = backbones.Backbone(**{**real.__dict__, "constructor": recording_constructor})
    monkeypatch.setitem(backbones.BACKBONES, "mobilenetv2", fake)
    build_model({"architecture": "mobilenetv2_unet", "depth": 2, "encoder_weights": "imagenet"}, (64, 64, 1), 2)
    build_model({"architecture": "deeplabv3plus", "base_filters": 2}, (64, 64, 1), 2)
    assert requested == ["imagenet", None]


def test_grey_input_is_replicated_and_rescaled_for_the_backbone():
    model = build_model({"architecture": "mobilenetv2_unet", "depth": 2, "base_filters": 2}, (64, 64, 1), 2)
    preprocess = keras.Model(model.input, model.get_layer("backbone_preprocessing").output)
    rgb = preprocess.predict(np.full((1, 64, 64, 1), 0.25, "float32"), verbose=0)
    # MobileNetV2 expects [-1, 1]: 0.25 -> -0.5 in each of three channels.
    assert rgb.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(rgb, -0.5)


@pytest.mark.parametrize(
    "settings, size",
    [
        ({"architecture": "unet", "depth": 2, "base_filters": 4, "normalization": "batch"}, 32),
        ({"architecture": "mobilenetv2_unet", "depth": 2, "base_filters": 4}, 64),
    ],
)
def test_frozen_encoder_does_not_change_while_the_decoder_trains(settings, size):
    keras.utils.set_random_seed(2)
    model = build_model(settings, (size, size, 1), 2)
    encoder_layers = [layer for layer in model.layers if layer.name.startswith("encoder")]
    # The convolution that makes the logits, just before the softmax.
    decoder_layer = model.layers[-2]

    assert set_encoder_trainable(model, False) == len(encoder_layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=get_loss("dice_ce", 2))
    encoder_before = [weight.copy() for layer in encoder_layers for weight in layer.get_weights()]
    decoder_before = [weight.copy() for weight in decoder_layer.get_weights()]
    images = random_images(size, count=4)
    masks = np.eye(2, dtype="float32")[(images[..., 0] > 0.5).astype(int)]
    model.fit(images, masks, batch_size=2, epochs=1, verbose=0)

    encoder_after = [weight for layer in encoder_layers for weight in layer.get_weights()]
    # Non-trainable weights (batch-normalisation statistics) must not move either.
    for before, after in zip(encoder_before, encoder_after):
        np.testing.assert_array_equal(before, after)
    assert any(not np.array_equal(b, a) for b, a in zip(decoder_before, decoder_layer.get_weights()))

    set_encoder_trainable(model, True)
    assert all(layer.trainable for layer in encoder_layers)


def test_set_encoder_trainable_needs_an_encoder():
    inputs = keras.Input((8, 8, 1))
    with pytest.raises(ValueError, match="encoder"):
        set_encoder_trainable(keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs)), False)


def squares_dataset(count, size, rng):
    """Images with one bright noisy square each; the mask marks the square."""
    images = rng.normal(0.2, 0.05, (count, size, size, 1)).astype("float32")
    labels = np.zeros((count, size, size), dtype=int)
    for index in range(count):
        side = rng.integers(6, 14)
        row, column = rng.integers(0, size - side, 2)
        images[index, row : row + side, column : column + side] += 0.6
        labels[index, row : row + side, column : column + side] = 1
    return images, np.eye(2, dtype="float32")[labels]


def test_tiny_unet_learns_squares():
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    images, masks = squares_dataset(32, 32, rng)
    model = build_model({"depth": 2, "base_filters": 8}, (32, 32, 1), 2)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=get_loss("dice_ce", 2),
        metrics=get_metrics(["background", "square"]),
    )
    before = model.evaluate(images, masks, batch_size=8, verbose=0, return_dict=True)
    history = model.fit(images, masks, batch_size=4, epochs=4, verbose=0, validation_data=(images[:8], masks[:8]))
    after = model.evaluate(images, masks, batch_size=8, verbose=0, return_dict=True)

    assert {"val_mean_foreground_dice", "val_dice_square"} <= set(history.history)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["mean_foreground_dice"] > 0.8
    assert after["dice_square"] == pytest.approx(after["mean_foreground_dice"])
