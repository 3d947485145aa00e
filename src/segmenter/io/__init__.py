"""Reading images and label maps, finding cases, writing label maps.

Formats: CSV, PNG, NPY, NIfTI (``.nii``, ``.nii.gz``), DICOM (one file, or a folder = one series).
Conventions (axis order, spacing, RAS+ affines) are set out in :mod:`segmenter.io.image`.
"""
from segmenter.io.cases import case_id, list_cases, list_image_cases, unsupported_files
from segmenter.io.image import LPS_TO_RAS, LoadedImage
from segmenter.io.readers import READERS, SUPPORTED_SUFFIXES, format_suffix, read_channels, read_image, read_mask
from segmenter.io.writers import WRITERS, write_mask

__all__ = [
    "LPS_TO_RAS",
    "READERS",
    "SUPPORTED_SUFFIXES",
    "WRITERS",
    "LoadedImage",
    "case_id",
    "format_suffix",
    "list_cases",
    "list_image_cases",
    "read_channels",
    "read_image",
    "read_mask",
    "unsupported_files",
    "write_mask",
]
