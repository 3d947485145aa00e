"""Predict masks with the trained model: for the preloaded test split, or for a folder of new images.

Inference needs only ``experiments/<experiment>/train/``: the model and ``preprocessing.json`` (the
normalisation and image size it was trained with), copied there by the train stage as nnU-Net copies its
plans beside its results.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import keras
import numpy as np
from skimage.transform import resize
from tqdm import tqdm

import segmenter.losses  # noqa: F401  (registers custom objects for load_model)
import segmenter.metrics  # noqa: F401
import segmenter.models  # noqa: F401
from segmenter import io
from segmenter.artifacts import (atomic_directory, check_replaceable_folder, read_json, save_resolved_config,
                                 write_json_atomic)
from segmenter.config import Config, NormalizationConfig
from segmenter.dataset import iter_split, read_manifest
from segmenter.errors import InputError
from segmenter.preprocessing import prepare_image

# Output suffix per input format: label maps go back in the user's format, except where that format
# cannot hold a label map written by us (DICOM), where NIfTI with the series' affine is the usual choice.
OUTPUT_SUFFIX = {".csv": ".csv", ".png": ".png", ".npy": ".npy", ".nii": ".nii.gz", ".nii.gz": ".nii.gz",
                 ".dcm": ".nii.gz", "": ".nii.gz"}


@dataclasses.dataclass
class PredictResult:
    output_dir: Path
    num_masks: int

    def __str__(self) -> str:
        return f"Wrote {self.num_masks} masks\n{self.output_dir}"


def load_trained_model(config: Config) -> tuple[keras.Model, dict]:
    train_dir = config.stage_dir("train")
    model_path = train_dir / "model.keras"
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no trained model; run the train stage first")
    model = keras.models.load_model(model_path, compile=False)
    return model, read_json(train_dir / "preprocessing.json")


def predict_probabilities(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Softmax probabilities (N, H, W, C) for normalised images (N, H, W, channels)."""
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float32)


def predict_test_set(config: Config) -> PredictResult:
    """Write ``predict/test/<id>.npy`` (uint8 label maps) for every test slice, at its original size when
    preload kept the test split at that size (``test-native/``), else at the preloaded size."""
    model, _ = load_trained_model(config)
    out_dir = config.stage_dir("predict") / "test"
    test_split = read_manifest(config.preloaded_dir)["splits"]["test"]
    # When preload resized the test slices it also kept them at their original size, and evaluate scores
    # there: the masks are then written on each slice's original grid, as for new images.
    original_shapes = ({record["id"]: tuple(record["original_shape"]) for record in test_split["slices"]}
                       if test_split.get("native") else {})
    count = 0
    with atomic_directory(out_dir) as tmp_dir:
        for shard in iter_split(config.preloaded_dir, "test"):
            probabilities = predict_probabilities(model, shard.images, config.predict.batch_size)
            for slice_id, slice_probabilities in zip(shard.ids, probabilities):
                label_map = labels_at_size(slice_probabilities, original_shapes.get(str(slice_id)))
                np.save(tmp_dir / f"{slice_id}.npy", label_map)  # the folder as a whole is swapped in atomically
                count += 1
        write_json_atomic({"model": str(config.stage_dir("train") / "model.keras"), "num_masks": count},
                          tmp_dir / "predictions.json")
    save_resolved_config(config, config.stage_dir("predict"))
    return PredictResult(out_dir, count)


def _predict_image(model, array: np.ndarray, preprocessing: dict, batch_size: int, slice_axis: int) -> np.ndarray:
    """Label map at the input's own size for a 2D image or, slice by slice, a 3D volume."""
    normalization = NormalizationConfig.model_validate(preprocessing["normalization"])
    size = tuple(preprocessing["image_size"])
    if array.ndim == 2:
        slices = [array]
    else:
        slices = [np.take(array, i, axis=slice_axis) for i in range(array.shape[slice_axis])]
    batch = np.stack([prepare_image(s, normalization, size)[1] for s in slices])[..., np.newaxis]
    probabilities = predict_probabilities(model, batch, batch_size)
    labels = [labels_at_size(p, s.shape) for p, s in zip(probabilities, slices)]
    return labels[0] if array.ndim == 2 else np.stack(labels, axis=slice_axis)


def labels_at_size(probabilities: np.ndarray, shape: Optional[tuple]) -> np.ndarray:
    """The label map (uint8) of one slice's (H, W, classes) probabilities, resized to ``shape`` (None: as is).

    Probabilities, not labels, are resized, then the argmax is taken: nearest-neighbour on labels would
    give blocky borders when the model ran at a lower resolution.
    """
    if shape is not None and tuple(shape) != probabilities.shape[:-1]:
        probabilities = resize(probabilities, (*shape, probabilities.shape[-1]), order=1, preserve_range=True)
    return probabilities.argmax(-1).astype(np.uint8)


def predict_folder(config: Config, input_dir: Path, output_dir: Optional[Path] = None) -> PredictResult:
    """Segment every image in ``input_dir``; one mask per input, under the input's name."""
    input_dir = Path(input_dir).resolve()
    cases = io.list_cases(input_dir, "image")
    model, preprocessing = load_trained_model(config)
    test_predictions = config.stage_dir("predict") / "test"
    if output_dir is None:
        # predict/<input folder name>, never predict/test itself, which holds the test-set predictions.
        name = input_dir.name if input_dir.name != "test" else "test_input"
        output_dir = config.stage_dir("predict") / name
    check_replaceable_folder(output_dir, [input_dir, test_predictions], ["predictions.json"], "--output")
    with atomic_directory(output_dir) as tmp_dir:
        for case_id, path in tqdm(sorted(cases.items()), unit="image", desc="predict", disable=None):
            image = io.read_image(path)
            if image.array.ndim not in (2, 3):
                raise InputError(path, f"expected a 2D image or 3D volume, got shape {image.array.shape}")
            label_map = _predict_image(model, image.array, preprocessing, config.predict.batch_size,
                                       preprocessing.get("slice_axis", 2))
            input_suffix = "" if path.is_dir() else path.name[len(case_id):].lower()
            suffix = OUTPUT_SUFFIX.get(input_suffix, ".nii.gz")
            io.write_mask(label_map, tmp_dir / f"{case_id}{suffix}", reference=image)
        write_json_atomic({"input": str(input_dir), "model": str(config.stage_dir("train") / "model.keras"),
                           "num_masks": len(cases)}, tmp_dir / "predictions.json")
    return PredictResult(output_dir, len(cases))
