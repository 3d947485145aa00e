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
from segmenter.config import Config, ConfigError, NormalizationConfig, PredictConfig
from segmenter.errors import InputError
from segmenter.io.writers import output_suffix
from segmenter.manifest import check_classes, read_manifest
from segmenter.models import precision
from segmenter.positions import input_channels
from segmenter.preprocessing import prepare_image


@dataclasses.dataclass
class PredictResult:
    output_dir: Path
    num_masks: int

    def __str__(self) -> str:
        return f"Wrote {self.num_masks} masks\n{self.output_dir}"


class ModelEnsemble:
    """Models of one input and output whose class probabilities are averaged: the k fold models of a k-fold
    training, as nnU-Net ensembles its folds. Offers what prediction uses of a Keras model."""

    def __init__(self, models: list):
        self.models = models
        self.input_shape, self.output_shape = models[0].input_shape, models[0].output_shape

    def predict_on_batch(self, batch) -> np.ndarray:
        return np.mean([np.asarray(m.predict_on_batch(batch), dtype=np.float32) for m in self.models], axis=0)


def model_dirs(config: Config) -> list[Path]:
    """The train folders whose ``model/`` predict uses: the k fold folders (``predict.folds``) or ``train/``."""
    train_dir = config.stage_dir("train")
    folds = [layout.fold_dir(train_dir, k) for k in range(config.train.folds)]
    have_folds = all(layout.model_path(folder).is_file() for folder in folds)
    if config.predict.folds or (config.predict.folds is None and have_folds):
        if not have_folds:
            missing = next(folder for folder in folds if not layout.model_path(folder).is_file())
            raise FileNotFoundError(f"{layout.model_path(missing)}: no model of this fold (predict.folds needs all "
                                    f"{config.train.folds}); run segmenter train --fold all")
        return folds
    return [train_dir]


def trained_models(config: Config):
    """(model or fold ensemble, preprocessing, model files): what predict uses, checked against the config."""
    folders = model_dirs(config)
    models, preprocessing = [], None
    for folder in folders:
        model_path = layout.model_path(folder)
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: no trained model; run the train stage first")
        preprocessing = read_json(layout.preprocessing_path(folder))
        check_classes(config.classes, preprocessing["classes"], f"the model in {folder}")
        # Batch norm folded into the convolutions: the same predictions, a fifth faster (models.folding).
        model = segmenter.models.fold_batch_normalization(
            segmenter.models.inference_model(keras.models.load_model(model_path, compile=False)))
        model = segmenter.models.with_precision(model, config.predict.precision)
        outputs = model.output_shape[-1]
        if outputs != len(config.classes):
            raise ConfigError(f"{model_path}: the model has {outputs} output channels but the config names "
                              f"{len(config.classes)} classes {config.classes}; run the train stage again")
        consistency.check_model_input(model.input_shape, preprocessing["image_size"],
                                      model_input_channels(model, len(preprocessing.get("channels", ["image"]))),
                                      model_path, layout.preprocessing_path(folder))
        models.append(model)
    notice = precision.emulation_notice(config.predict.precision)
    if notice:
        print(notice)
    paths = [layout.model_path(folder) for folder in folders]
    return (models[0] if len(models) == 1 else ModelEnsemble(models)), preprocessing, paths


def model_input_channels(model, num_channels: int) -> int:
    """The input channels ``model`` should have for images of ``num_channels``: 3 more for a position-conditioned
    model (the positions of its patches, :mod:`segmenter.positions`)."""
    return input_channels(num_channels, segmenter.models.takes_positions(model))


def load_trained_model(config: Config) -> tuple[keras.Model, dict]:
    """The trained model (or fold ensemble) and its preprocessing, checked against the config's classes."""
    model, preprocessing, _ = trained_models(config)
    return model, preprocessing


def predict_probabilities(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Softmax probabilities (N, H, W, C) for normalised images (N, H, W, channels)."""
    # predict_on_batch, batch by batch: model.predict builds a tf.data pipeline on every call, which cost
    # about a fifth of the time of 32 images of 256 x 256 on 2 CPU cores (a first run of train_bench.py).
    return np.concatenate([np.asarray(model.predict_on_batch(images[start:start + batch_size]), dtype=np.float32)
                           for start in range(0, len(images), batch_size)])


def predict_cases(model: keras.Model, preprocessing: dict, cases: dict[str, list[Path]], output_dir: Path,
                  suffix_of: Callable[[str, list[Path], int], str], batch_size: int, record: dict,
                  dicom_seg: bool = False, previews: bool = False, options: Optional[PredictConfig] = None) -> int:
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
            label_map, probabilities = predict_image(model, image.array, len(paths), preprocessing, batch_size,
                                                     spacing=image.spacing, options=options, with_probabilities=True)
            reference = io.LoadedImage(label_map, image.spacing, image.affine, image.source)
            mask_name = f"{case_id}{suffix_of(case_id, paths, spatial_ndim)}"
            io.write_mask(label_map, tmp_dir / mask_name, reference=reference)
            if probabilities is not None:
                from segmenter.io.nifti import write_nifti_image

                (tmp_dir / layout.PROBABILITIES_DIR).mkdir(exist_ok=True)
                write_nifti_image(probabilities, tmp_dir / layout.PROBABILITIES_DIR / f"{case_id}.nii.gz",
                                  reference.affine if reference.affine is not None
                                  else np.diag([*(image.spacing or (1.0,) * 3), 1.0]))
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
    model, preprocessing, model_files = trained_models(config)
    for folder in model_dirs(config):
        consistency.check_model_data(read_json(layout.preprocessing_path(folder)), manifest, folder,
                                     config.preloaded_dir)
    consistency.check_model_input(model.input_shape, manifest.sample_size,
                                  model_input_channels(model, len(manifest.channels)), model_files[0],
                                  f"the preloaded dataset {config.preloaded_dir}")
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
                          {"model": str(model_files[0]) if len(model_files) == 1 else "fold ensemble",
                           "model_files": [str(path) for path in model_files],
                           # evaluate checks these: predictions of the current model(s) and preload
                           "model_sha256": consistency.models_digest(model_files),
                           "preload_fingerprint": manifest.fingerprint,
                           "input": str(layout.test_images_dir(config.preloaded_dir)),
                           "precision": config.predict.precision}, options=config.predict)
    save_resolved_config(config, config.stage_dir("predict"))
    return PredictResult(out_dir, count)


def predict_image(model, array: np.ndarray, num_channels: int, preprocessing: dict, batch_size: int, *,
                  spacing=None, options: Optional[PredictConfig] = None, with_probabilities: bool = False):
    """Label map at the input's own size for a 2D image or a 3D volume (channels last if several).

    A 2D model segments a volume slice by slice; a 3D model (``preprocessing["spatial_dims"]`` 3) segments it
    whole, patch by patch (:func:`predict_volume`). ``options.keep_largest_component`` applies to both.
    ``with_probabilities``: returns (labels, probabilities), the latter (*shape, K) float32 for a 3D model when
    ``options.save_probabilities`` is on, else None.
    """
    options = options or PredictConfig()
    labels, probabilities = _predict_image(model, array, num_channels, preprocessing, batch_size, spacing, options)
    if options.keep_largest_component:
        labels = keep_largest_components(labels)
    return (labels, probabilities) if with_probabilities else labels


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Each class reduced to its largest connected component (faces, edges and corners connect), the rest
    background: nnU-Net's "remove all but the largest component" post-processing."""
    from scipy import ndimage

    kept = labels.copy()
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for label in np.unique(labels):
        if label == 0:
            continue
        components, count = ndimage.label(labels == label, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            kept[(components != 0) & (components != sizes.argmax())] = 0
    return kept


def _predict_image(model, array, num_channels, preprocessing, batch_size, spacing, options: PredictConfig):
    channels = [NormalizationConfig.model_validate(item) for item in
                (preprocessing["normalization"] if isinstance(preprocessing["normalization"], list)
                 else [preprocessing["normalization"]] * num_channels)]
    expected = len(preprocessing.get("channels", ["image"]))
    if num_channels != expected:
        raise InputError(None, f"the model takes {expected} channels {preprocessing.get('channels')}, "
                               f"the image has {num_channels}")
    size = tuple(preprocessing["image_size"])
    array = array.reshape(*array.shape[:array.ndim - (num_channels > 1)], num_channels)  # channels last
    if preprocessing.get("spatial_dims", 2) == 3:
        if array.ndim != 4:
            raise InputError(None, f"the model is a 3D model; the image is 2D (shape {array.shape[:-1]})")
        return predict_volume(model, array, spacing, channels, preprocessing, batch_size, options,
                              with_probabilities=options.save_probabilities)
    if array.ndim == 3:
        slices = [array]
    else:
        axis = preprocessing.get("slice_axis", 2)
        slices = [np.take(array, i, axis=axis) for i in range(array.shape[axis])]
    batch = np.stack([prepare_image(s, channels, size)[1] for s in slices])
    probabilities = predict_probabilities(model, batch, batch_size)
    labels = [labels_at_size(p, s.shape[:2]) for p, s in zip(probabilities, slices)]
    return (labels[0] if array.ndim == 3 else np.stack(labels, axis=preprocessing.get("slice_axis", 2))), None


def mirroring_on(options: PredictConfig) -> bool:
    """Mirroring test-time augmentation: as set, else on where TensorFlow sees a GPU (8x the work on a CPU)."""
    if options.mirror is not None:
        return options.mirror
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def predict_volume(model, array: np.ndarray, spacing, normalizations, preprocessing: dict, batch_size: int,
                   options: PredictConfig, with_probabilities: bool = False):
    """(label map, probabilities or None) of a volume (*spatial, C) on its own grid, from a 3D model trained on
    patches.

    The volume is prepared as the training volumes were (:func:`segmenter.volumes.prepare_volume`), predicted
    patch by patch with Gaussian-weighted overlap (:func:`segmenter.sliding_window.sliding_window_predict`,
    a float16 accumulator), and its class probabilities are taken back to the original grid class by class
    before the argmax. ``with_probabilities``: also the (*spatial, K) float32 probabilities there.
    """
    from segmenter.manifest import VolumePlan
    from segmenter.volumes import prepare_volume, probabilities_on_original_grid, probabilities_to_labels

    plan = VolumePlan.model_validate(preprocessing["plan"])
    prepared, _, geometry = prepare_volume(array, spacing, plan, normalizations)
    _, probabilities = predict_prepared_volume(model, prepared, plan.patch_size, len(preprocessing["classes"]),
                                               batch_size, options)
    if with_probabilities:
        on_grid = probabilities_on_original_grid(probabilities, geometry)
        return on_grid.argmax(-1).astype(np.uint8), on_grid
    return probabilities_to_labels(probabilities, geometry), None


def predict_prepared_volume(model, volume: np.ndarray, patch_size, num_classes: int, batch_size: int,
                            options: PredictConfig):
    """(labels, float16 probabilities) of a volume prepared as the training volumes were, by sliding window (with
    the tiles' positions for a position-conditioned model)."""
    from segmenter.sliding_window import sliding_window_predict

    return sliding_window_predict(lambda batch: model.predict_on_batch(batch), volume, patch_size,
                                  num_classes=num_classes, overlap=options.overlap, batch_size=batch_size,
                                  mirror_axes=(0, 1, 2) if mirroring_on(options) else (), return_probabilities=True,
                                  position_channels=segmenter.models.takes_positions(model))


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
    model, preprocessing, model_files = trained_models(config)
    cases = io.list_image_cases(input_dir, len(preprocessing.get("channels", ["image"])))
    test_predictions = layout.test_predictions_dir(config.stage_dir("predict"))
    if output_dir is None:
        # predict/<input folder name>, never predict/test itself, which holds the test-set predictions.
        name = input_dir.name if input_dir.name != layout.TEST_PREDICTIONS else "test_input"
        output_dir = config.stage_dir("predict") / name
    check_replaceable_folder(output_dir, [input_dir, test_predictions], [layout.PREDICTIONS_RECORD], "--output")
    count = predict_cases(model, preprocessing, cases, output_dir,
                          lambda case_id, paths, ndim: output_suffix(paths[0], ndim), config.predict.batch_size,
                          {"input": str(input_dir), "model_files": [str(path) for path in model_files],
                           "precision": config.predict.precision},
                          dicom_seg=dicom_seg, previews=True, options=config.predict)
    print(f"Previews: {Path(output_dir) / layout.PREVIEW_DIR / layout.PREVIEW_INDEX}")
    return PredictResult(output_dir, count)
