"""Predict masks with the trained model: for the preloaded test cases, or for a folder of new images.

Inference needs only ``experiments/<experiment>/train/``: the model and ``preprocessing.json`` (the
normalisation per channel, sample size and classes it was trained with), copied there by the train stage as
nnU-Net copies its plans beside its results. The test cases are segmented exactly as a user's folder is:
``predict`` runs :func:`predict_cases` over the preloaded ``test/images`` as ``predict --input`` runs it over
the user's folder, and writes one label map per case at the case's own geometry (a volume as NIfTI with its
affine, a 2D image in its own format).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import keras
import numpy as np
from skimage.transform import resize
from tqdm import tqdm

import segmenter.losses  # noqa: F401  (registers custom objects for load_model)
import segmenter.metrics  # noqa: F401
import segmenter.models  # noqa: F401
from segmenter import consistency, io, layout, locks
from segmenter.artifacts import atomic_directory, check_replaceable_folder, read_json, save_resolved_config, write_json_atomic
from segmenter.config import Config, ConfigError, NormalizationConfig
from segmenter.errors import InputError
from segmenter.io.writers import output_suffix
from segmenter.manifest import check_classes, read_manifest
from segmenter.preprocessing import prepare_image


@dataclasses.dataclass
class PredictResult:
    output_dir: Path
    num_masks: int

    def __str__(self) -> str:
        return f"Wrote {self.num_masks} masks\n{self.output_dir}"


def load_trained_model(config: Config) -> tuple[keras.Model, dict]:
    """The trained model and its preprocessing, checked against the config's classes."""
    train_dir = config.stage_dir("train")
    model_path = layout.model_path(train_dir)
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no trained model; run the train stage first")
    preprocessing = read_json(layout.preprocessing_path(train_dir))
    check_classes(config.classes, preprocessing["classes"], f"the model in {train_dir}")
    model = keras.models.load_model(model_path, compile=False)
    outputs = model.output_shape[-1]
    if outputs != len(config.classes):
        raise ConfigError(f"{model_path}: the model has {outputs} output channels but the config names "
                          f"{len(config.classes)} classes {config.classes}; run the train stage again")
    consistency.check_model_input(model.input_shape, preprocessing["image_size"],
                                  len(preprocessing.get("channels", ["image"])), model_path,
                                  layout.preprocessing_path(train_dir))
    return model, preprocessing


def predict_probabilities(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Softmax probabilities (N, H, W, C) for normalised images (N, H, W, channels)."""
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float32)


def predict_cases(model: keras.Model, preprocessing: dict, cases: dict[str, list[Path]], output_dir: Path,
                  suffix_of: Callable[[str, list[Path], int], str], batch_size: int, record: dict,
                  dicom_seg: bool = False, previews: bool = False) -> int:
    """Segment every case (id -> its channel files) into ``output_dir``, replaced whole at the end.

    ``suffix_of(case_id, paths, ndim)`` names the output format of each case; ``record`` goes into
    ``predictions.json`` with the count. With ``dicom_seg``, a case read from a DICOM series folder also
    gets a DICOM Segmentation object referencing that series. With ``previews``, ``preview/<case>.png`` and
    ``preview/index.html`` (:class:`segmenter.visualize.PreviewWriter`) are written beside the masks, in the
    same temporary folder. Returns the number of masks written.
    """
    with atomic_directory(output_dir) as tmp_dir:
        preview = None
        if previews:
            from segmenter.visualize import PREVIEW_DIR, PreviewWriter  # matplotlib: only when asked

            preview = PreviewWriter(tmp_dir / PREVIEW_DIR, preprocessing,
                                    title=f"Predictions for {record.get('input')}")
        for case_id, paths in tqdm(cases.items(), unit="case", desc="predict", disable=None):
            layout.safe_name(case_id, "case id", paths[0])  # it becomes the mask's file name
            image = io.read_channels(paths)
            spatial_ndim = image.array.ndim - (len(paths) > 1)
            if spatial_ndim not in (2, 3):
                raise InputError(paths[0], f"expected a 2D image or 3D volume, got shape {image.array.shape}")
            label_map = predict_image(model, image.array, len(paths), preprocessing, batch_size)
            reference = io.LoadedImage(label_map, image.spacing, image.affine, image.source)
            mask_name = f"{case_id}{suffix_of(case_id, paths, spatial_ndim)}"
            io.write_mask(label_map, tmp_dir / mask_name, reference=reference)
            if preview is not None:
                preview.add(case_id, image, len(paths), label_map, mask_name)
            if dicom_seg:
                if not Path(paths[0]).is_dir():
                    raise InputError(paths[0], "--format dicom-seg needs DICOM series folders as input")
                from segmenter.io.dicom_seg import DICOM_SEG_SUFFIX, write_dicom_seg  # highdicom: only when asked

                write_dicom_seg(label_map, paths[0], preprocessing["classes"], tmp_dir / f"{case_id}{DICOM_SEG_SUFFIX}")
        if preview is not None:
            preview.write_index()
        write_json_atomic({**record, "num_masks": len(cases)}, tmp_dir / layout.PREDICTIONS_RECORD)
    return len(cases)


@locks.locked("predict")
def predict_test_set(config: Config) -> PredictResult:
    """Segment the preloaded test cases into ``predict/test/``, each in its source's format at its own geometry."""
    manifest = read_manifest(config.preloaded_dir)
    check_classes(config.classes, manifest.classes, f"the preloaded dataset {config.preloaded_dir}")
    model, preprocessing = load_trained_model(config)
    train_dir = config.stage_dir("train")
    consistency.check_model_data(preprocessing, manifest, train_dir, config.preloaded_dir)
    consistency.check_model_input(model.input_shape, manifest.sample_size, len(manifest.channels),
                                  layout.model_path(train_dir), f"the preloaded dataset {config.preloaded_dir}")
    for case in manifest.test.cases:  # the manifest's ids and suffixes become file names in predict/test
        layout.safe_name(case.id + case.output_suffix, "test case file name",
                         layout.manifest_path(config.preloaded_dir))
    suffixes = {case.id: case.output_suffix for case in manifest.test.cases}
    cases = io.list_image_cases(layout.test_images_dir(config.preloaded_dir), len(manifest.channels))
    missing = sorted(set(suffixes) - set(cases))
    if missing:
        raise FileNotFoundError(f"{layout.test_images_dir(config.preloaded_dir)}: test case {missing[0]} missing; "
                                "run the preload stage again")
    out_dir = layout.test_predictions_dir(config.stage_dir("predict"))
    count = predict_cases(model, preprocessing, {case: cases[case] for case in suffixes}, out_dir,
                          lambda case_id, paths, ndim: suffixes[case_id], config.predict.batch_size,
                          {"model": str(layout.model_path(train_dir)),
                           # evaluate checks these: predictions of the current model and preload
                           "model_sha256": consistency.model_digest(train_dir),
                           "preload_fingerprint": manifest.fingerprint,
                           "input": str(layout.test_images_dir(config.preloaded_dir))})
    save_resolved_config(config, config.stage_dir("predict"))
    return PredictResult(out_dir, count)


def predict_image(model, array: np.ndarray, num_channels: int, preprocessing: dict, batch_size: int) -> np.ndarray:
    """Label map at the input's own size for a 2D image or, slice by slice, a 3D volume (channels last if several)."""
    channels = [NormalizationConfig.model_validate(item) for item in
                (preprocessing["normalization"] if isinstance(preprocessing["normalization"], list)
                 else [preprocessing["normalization"]] * num_channels)]
    expected = len(preprocessing.get("channels", ["image"]))
    if num_channels != expected:
        raise InputError(None, f"the model takes {expected} channels {preprocessing.get('channels')}, "
                               f"the image has {num_channels}")
    size = tuple(preprocessing["image_size"])
    array = array.reshape(*array.shape[:array.ndim - (num_channels > 1)], num_channels)  # channels last
    if array.ndim == 3:
        slices = [array]
    else:
        axis = preprocessing.get("slice_axis", 2)
        slices = [np.take(array, i, axis=axis) for i in range(array.shape[axis])]
    batch = np.stack([prepare_image(s, channels, size)[1] for s in slices])
    probabilities = predict_probabilities(model, batch, batch_size)
    labels = [labels_at_size(p, s.shape[:2]) for p, s in zip(probabilities, slices)]
    return labels[0] if array.ndim == 3 else np.stack(labels, axis=preprocessing.get("slice_axis", 2))


def labels_at_size(probabilities: np.ndarray, shape: Optional[tuple]) -> np.ndarray:
    """The label map (uint8) of one slice's (H, W, classes) probabilities, resized to ``shape`` (None: as is).

    Probabilities, not labels, are resized, then the argmax is taken: nearest-neighbour on labels would
    give blocky borders when the model ran at a lower resolution.
    """
    if shape is not None and tuple(shape) != probabilities.shape[:-1]:
        probabilities = resize(probabilities, (*shape, probabilities.shape[-1]), order=1, preserve_range=True)
    return probabilities.argmax(-1).astype(np.uint8)


@locks.locked("predict", reads_dataset=False)
def predict_folder(config: Config, input_dir: Path, output_dir: Optional[Path] = None,
                   dicom_seg: bool = False) -> PredictResult:
    """Segment every image (or case of channel files) in ``input_dir``; one mask per case, under its name.

    ``dicom_seg``: also write ``<case>.seg.dcm`` for every DICOM series input (see :func:`predict_cases`).
    """
    input_dir = Path(input_dir).resolve()
    model, preprocessing = load_trained_model(config)
    cases = io.list_image_cases(input_dir, len(preprocessing.get("channels", ["image"])))
    test_predictions = layout.test_predictions_dir(config.stage_dir("predict"))
    if output_dir is None:
        # predict/<input folder name>, never predict/test itself, which holds the test-set predictions.
        name = input_dir.name if input_dir.name != layout.TEST_PREDICTIONS else "test_input"
        output_dir = config.stage_dir("predict") / name
    check_replaceable_folder(output_dir, [input_dir, test_predictions], [layout.PREDICTIONS_RECORD], "--output")
    count = predict_cases(model, preprocessing, cases, output_dir,
                          lambda case_id, paths, ndim: output_suffix(paths[0], ndim), config.predict.batch_size,
                          {"input": str(input_dir), "model": str(layout.model_path(config.stage_dir("train")))},
                          dicom_seg=dicom_seg, previews=True)
    print(f"Previews: {Path(output_dir) / layout.PREVIEW_DIR / layout.PREVIEW_INDEX}")
    return PredictResult(output_dir, count)
