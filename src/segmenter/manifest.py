"""The preloaded dataset's manifest: one typed, versioned model, read and written only here.

A *case* is the unit of data: one 2D image or one 3D volume (one or more channels) with its label map.
The manifest lists every case with its properties (:class:`CaseRecord`) and says which are in the training
and the test split. The training split also lists its *samples*: for a 2D model the fixed-size 2D slices cut from its
cases and stored in shards (see :mod:`segmenter.dataset`), for a 3D model (``spatial_dims`` 3) its whole
volumes, resampled and normalised, one file each, from which training draws patches (:class:`VolumePlan`
says how; see :mod:`segmenter.volume_dataset`); the test split holds whole cases, stored at
their original geometry in ``test/images`` and ``test/labels`` (see :mod:`segmenter.layout`), never
filtered by their labels.

``preloaded_dataset/<experiment>/manifest.json`` is written by the preload stage through
:func:`write_manifest` and read by every later stage through :func:`read_manifest`; a manifest of another
version is refused with one line that says to run the preload stage again (preload itself redoes it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from segmenter import layout
from segmenter.artifacts import read_json, write_json_atomic
from segmenter.config import ConfigError

#: Bumped whenever what preload writes changes, so an older preloaded dataset is redone, not reused.
MANIFEST_VERSION = 5


class ManifestError(FileNotFoundError):
    """A preloaded dataset that is missing, of another manifest version, or unreadable: run preload again."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CaseRecord(_Model):
    """One case: its provenance and geometry, the labels it holds and where each class occurs."""

    id: str
    #: The patient or volume group (``preload.group_pattern``); no group is in both splits.
    group: str
    #: Source image files, one per channel, and the source label file.
    images: list[str]
    mask: str
    #: Array shape without channels: (rows, columns) or (rows, columns, planes) as :mod:`segmenter.io` reads it.
    shape: list[int]
    #: Voxel size in mm per array axis; None when the format carries none and the config gives none.
    spacing: Optional[list[float]] = None
    #: 4 x 4 voxel index -> RAS+ mm; None for 2D files without one.
    affine: Optional[list[list[float]]] = None
    #: Classes present in the (remapped) label map.
    labels: list[int]
    #: Voxels of each foreground class present, and its bounding box ([first, last] index per axis).
    class_voxels: dict[int, int] = {}
    class_boxes: dict[int, list[list[int]]] = {}
    #: For a case cut from a single volume (see :mod:`segmenter.preload.split`): [first, stop) along the slice axis.
    slab: Optional[list[int]] = None
    #: Suffix the predict stage writes this case's label map with (the source's own format, NIfTI for volumes).
    output_suffix: str


class SampleRecord(_Model):
    """One training sample: a 2D slice of a case at ``Manifest.sample_size``, stored in the shards; for a 3D
    dataset a whole training volume, resampled (``original_shape`` is then its shape after resampling)."""

    id: str
    case: str
    #: Index along ``preload.slice_axis`` for slices of volumes, -1 for 2D cases.
    slice_index: int
    labels: list[int]
    original_shape: list[int]
    #: Pixel spacing (row, column) after resizing to the sample size (3D: the target spacing); None when unknown.
    spacing: Optional[list[float]] = None


class VolumePlan(_Model):
    """How a 3D dataset (``preload.spatial_dims`` 3) was prepared and what the model is planned for.

    Training volumes are cropped (``crop_to_nonzero``), resampled to ``target_spacing`` and normalised;
    prediction prepares a new volume the same way and undoes it on the output.
    """

    target_spacing: list[float]
    #: Median shape of the training volumes after resampling.
    median_shape: list[int]
    patch_size: list[int]
    batch_size: int
    depth: int
    #: Estimated memory of one training step at that batch size, in MB (see segmenter.preprocessing.planner).
    estimated_mb: float
    crop_to_nonzero: bool
    #: Per channel: foreground intensity statistics over the training set (nnunet_ct normalisation), else None.
    intensity_statistics: list[Optional[dict[str, float]]]
    #: The resampling (preload's settings of the same names). The defaults are those of plans written before
    #: they existed, so that a model trained then still has its volumes prepared as they were.
    image_interpolation: Literal["cubic", "linear"] = "cubic"
    label_interpolation: Literal["linear", "nearest"] = "linear"
    anisotropy_threshold: Optional[float] = None


class TrainSplit(_Model):
    cases: list[CaseRecord]
    samples: list[SampleRecord]
    #: 2D: the shard files of the samples. 3D: one file per training volume, in the samples' order.
    shards: list[str]
    #: Samples that show each label, by label.
    samples_with_label: dict[int, int]

    @property
    def num_samples(self) -> int:
        return len(self.samples)


class TestSplit(_Model):
    cases: list[CaseRecord]


class Manifest(_Model):
    version: int
    fingerprint: str
    experiment: str
    classes: list[str]
    #: Channel names, in the order of the model's input channels.
    channels: list[str]
    #: (rows, columns) of the 2D training samples; the patch size for 3D.
    sample_size: list[int]
    #: 2 or 3: what the model sees (``preload.spatial_dims``); 3D datasets carry their plan.
    spatial_dims: Literal[2, 3] = 2
    plan: Optional[VolumePlan] = None
    slice_axis: int
    #: The preload settings the data were prepared with (normalisation per channel and the rest).
    preprocessing: dict[str, Any]
    #: Source file -> sha256.
    sources: dict[str, str]
    skipped: list[dict[str, str]]
    #: "random" (grouped, seeded), "fixed" (preload.test_cases / preload.test_dir) or "slab" (one volume).
    split: Literal["random", "fixed", "slab"]
    train: TrainSplit
    test: TestSplit
    config: dict[str, Any]

    def inference_preprocessing(self) -> dict[str, Any]:
        """What inference needs to prepare new images exactly as the training samples were prepared (the
        train stage writes it beside the model as ``preprocessing.json``)."""
        return {**self.preprocessing, "classes": self.classes, "channels": self.channels,
                "image_size": self.sample_size, "spatial_dims": self.spatial_dims,
                "plan": None if self.plan is None else self.plan.model_dump(mode="json"),
                "preload_fingerprint": self.fingerprint}

    def test_case(self, case_id: str) -> CaseRecord:
        for case in self.test.cases:
            if case.id == case_id:
                return case
        raise KeyError(case_id)


def read_manifest(preloaded_dir: Path) -> Manifest:
    """The manifest of ``preloaded_dir``; ManifestError (one line, what to run) when missing, old or unreadable."""
    path = layout.manifest_path(preloaded_dir)
    if not path.is_file():
        raise ManifestError(f"{path}: no preloaded dataset here; run the preload stage first")
    try:
        raw = read_json(path)
    except ValueError as error:  # not JSON (a file edited or damaged by hand): the same advice as below
        raise ManifestError(f"{path}: damaged manifest (not JSON: {error}); run the preload stage again") from None
    version = raw.get("version") if isinstance(raw, dict) else None
    if version != MANIFEST_VERSION:
        raise ManifestError(f"{path}: written by an older segmenter (manifest version {version}, now "
                            f"{MANIFEST_VERSION}); run the preload stage again")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ManifestError(f"{path}: damaged manifest ({where}: {first['msg']}); run the preload stage again") from None


def read_manifest_version(preloaded_dir: Path) -> Optional[int]:
    """The version of an existing manifest (None when there is none or it is unreadable), for preload's notice."""
    try:
        raw = read_json(layout.manifest_path(preloaded_dir))
    except (OSError, ValueError):
        return None
    return raw.get("version") if isinstance(raw, dict) else None


def write_manifest(manifest: Manifest, preloaded_dir: Path) -> Path:
    return write_json_atomic(manifest.model_dump(mode="json"), layout.manifest_path(preloaded_dir))


def check_classes(config_classes: list[str], other_classes: list[str], what: str) -> None:
    """ConfigError (one line naming both lists) when the config's classes differ from those of ``what``."""
    if list(config_classes) != list(other_classes):
        raise ConfigError(f"classes: the config names {len(config_classes)} classes {list(config_classes)}, "
                          f"but {what} has {len(other_classes)}: {list(other_classes)}")
