"""Find the cases of the original dataset: each case's image files (one per channel), label map and group.

Three layouts:

- ``preload.images_subdir`` and ``preload.masks_subdir`` paired by file name without the suffix
  (``images/7.png`` with ``masks/7.npy``); with several ``preload.channels`` the images follow nnU-Net's
  naming (``case_0000.nii.gz``, ``case_0001.nii.gz`` with ``labelsTr/case.nii.gz``);
- ``preload.pairs``: explicit [image, mask] pairs (e.g. a DICOM series folder and a NIfTI label map);
- an nnU-Net / Medical Segmentation Decathlon folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``):
  :func:`dataset_description` gives its classes, channels and subfolders, which the config takes as
  defaults (see :func:`segmenter.config.build_config`).

``preload.test_dir`` (a folder laid out like the input folder) adds cases that form a fixed test set.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

from segmenter import io, layout
from segmenter.config import Config
from segmenter.errors import InputError

DATASET_JSON = "dataset.json"


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """The files of one case, as found; nothing is read yet."""

    case_id: str
    image_paths: tuple[Path, ...]
    mask_path: Path
    group_id: str
    #: True for the cases of preload.test_dir, which are always tested.
    in_test_dir: bool = False

    @property
    def source_paths(self) -> tuple[Path, ...]:
        return (*self.image_paths, self.mask_path)


def group_id(case_id: str, group_pattern: Optional[str]) -> str:
    """The patient or volume group of a case: the first group (or whole match) of the pattern, else the id."""
    if group_pattern:
        match = re.search(group_pattern, case_id)
        if match:
            return match.group(1) if match.groups() else match.group(0)
    return case_id


def find_cases(config: Config, log=print) -> list[CaseFiles]:
    """Every case of ``preload.input_dir`` (and of ``preload.test_dir``), with what did not pair reported."""
    settings = config.preload
    root = Path(settings.input_dir)
    if not root.is_dir():
        raise InputError(root, "input folder not found")
    if settings.pairs:
        cases = []
        for image_name, mask_name in settings.pairs:
            image_path, mask_path = root / image_name, root / mask_name
            for path in (image_path, mask_path):
                if not path.exists():
                    raise InputError(path, "listed in preload.pairs but not found")
            case = io.case_id(image_path)
            if any(earlier.case_id == case for earlier in cases):
                raise InputError(image_path, f"preload.pairs lists two images with the case id {case!r}")
            cases.append(CaseFiles(case, (image_path,), mask_path, group_id(case, settings.group_pattern)))
        found = cases
    else:
        found = _paired_cases(root, config, log, in_test_dir=False)
    if settings.test_dir is not None:
        test_cases = _paired_cases(Path(settings.test_dir), config, log, in_test_dir=True)
        clash = sorted({case.case_id for case in found} & {case.case_id for case in test_cases})
        if clash:
            raise InputError(settings.test_dir, f"case {clash[0]!r} is in both preload.input_dir and "
                                                f"preload.test_dir ({len(clash)} such cases)")
        found = found + test_cases
    for case in found:  # ids become file names: test/images/<case>..., predict/test/<case>...
        layout.safe_name(case.case_id, "case id", case.image_paths[0])
    excluded = set(settings.exclude_cases)
    unknown = sorted(excluded - {case.case_id for case in found})
    if unknown:
        raise InputError(root, f"preload.exclude_cases names {len(unknown)} cases that are not in the dataset "
                               f"(e.g. {unknown[0]!r})")
    if excluded:
        log(f"Left out {len(excluded)} cases (preload.exclude_cases): {', '.join(sorted(excluded))}")
    return [case for case in found if case.case_id not in excluded]


def _paired_cases(root: Path, config: Config, log, in_test_dir: bool) -> list[CaseFiles]:
    settings = config.preload
    if not root.is_dir():
        raise InputError(root, "test folder not found" if in_test_dir else "input folder not found")
    images = io.list_image_cases(root / settings.images_subdir, len(settings.channels), "image")
    masks = io.list_cases(root / settings.masks_subdir, "mask")
    matched = [case for case in images if case in masks]
    images_only = [case for case in images if case not in masks]
    masks_only = [case for case in masks if case not in images]
    where = " in preload.test_dir" if in_test_dir else ""
    log(f"Matched {len(matched)} image/mask pairs{where}; {len(images_only)} images without masks, "
        f"{len(masks_only)} masks without images.")
    if images_only:
        log(f"  images without masks: {', '.join(images_only[:20])}{' ...' if len(images_only) > 20 else ''}")
    if masks_only:
        log(f"  masks without images: {', '.join(masks_only[:20])}{' ...' if len(masks_only) > 20 else ''}")
    if not matched:
        raise InputError(root, f"no image in {settings.images_subdir}/ has a mask of the same name in "
                               f"{settings.masks_subdir}/")
    return [CaseFiles(case, tuple(images[case]), masks[case], group_id(case, settings.group_pattern), in_test_dir)
            for case in matched]


def dataset_description(folder: Path) -> Optional[dict]:
    """The config defaults an nnU-Net v2 or Medical Segmentation Decathlon ``dataset.json`` implies, or None.

    Returns a dict with ``classes`` (names in label order, from ``labels``), ``channels`` (from
    ``channel_names``, or the Decathlon's ``modality``), ``images_subdir`` and ``masks_subdir``
    (``imagesTr``, ``labelsTr``) and ``experiment`` (``name``, else the folder's name, as a folder name).

    Raises InputError when the file is not valid JSON, or its labels are not the classes 0..K-1 (nnU-Net's
    region-based labels, lists of label values, are not supported).
    """
    path = Path(folder) / DATASET_JSON
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
        labels = description["labels"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(path, f"not an nnU-Net/Decathlon dataset.json with 'labels': {error}") from None
    # nnU-Net v2 maps name -> label; the Decathlon maps "label" -> name.
    try:
        if all(isinstance(value, int) for value in labels.values()):
            by_label = {int(value): str(name) for name, value in labels.items()}
        else:
            by_label = {int(key): str(name) for key, name in labels.items()}
    except (ValueError, TypeError, AttributeError):
        raise InputError(path, "labels must map names to label values (nnU-Net) or label values to names "
                               "(Decathlon); region-based labels are not supported") from None
    if sorted(by_label) != list(range(len(by_label))) or len(by_label) < 2:
        raise InputError(path, f"labels {sorted(by_label)} must be 0..K-1 with K >= 2 (0 = background)")
    channel_names = description.get("channel_names") or description.get("modality") or {"0": "image"}
    try:
        channels = [str(channel_names[key]) for key in sorted(channel_names, key=int)]
    except (ValueError, TypeError):
        raise InputError(path, "channel_names must map 0, 1, ... to channel names") from None
    name = str(description.get("name") or Path(folder).resolve().name)
    return {
        "experiment": re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "dataset",
        "classes": [by_label[label] for label in range(len(by_label))],
        "channels": channels,
        "images_subdir": "imagesTr",
        "masks_subdir": "labelsTr",
    }
