"""Evaluate any two folders of masks: the truth and a prediction, e.g. another tool's output.

``segmenter evaluate --truth DIR --pred DIR --out DIR`` pairs the files of the two folders by name
without the format suffix (``case7.png`` with ``case7.npy``; PNG, NPY, CSV, NIfTI and DICOM through
:mod:`segmenter.io`), scores every pair and writes the same ``metrics.csv``, ``summary.json``,
``figures/`` and ``report.html`` as the evaluate stage of an experiment, plus ``pairs.json`` (which files
were paired, which were not) and ``config.resolved.json`` (the settings used).

Pixel spacing comes from the files' headers where they have one (NIfTI, DICOM), else from ``spacing``,
else distances are in pixels; a run never mixes mm and pixels (see :mod:`segmenter.evaluation.tables`).
Masks of one slice stored as a 3D array with a single plane are scored as 2D. Masks holding only 0 and
255 (8-bit binary images) are read as background and class 1.

The folders are read twice, once to check every pair and find the labels and spacings, once to score,
so memory holds one pair at a time however large the volumes are.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
from nibabel import orientations

from segmenter import layout
from segmenter.artifacts import atomic_directory, check_replaceable_folder, write_json_atomic, write_text_atomic
from segmenter.errors import InputError
from segmenter.evaluation import figures
from segmenter.evaluation.report import write_report
from segmenter.evaluation.tables import distance_unit, metrics_table, summarize, summary_lines
from segmenter.io import LoadedImage, list_cases, read_image, read_mask
from segmenter.io.grid import map_labels_to_grid

#: Files whose presence marks a folder as an earlier evaluation output, safe to replace.
OUTPUT_MARKERS = (layout.REPORT, layout.METRICS, layout.SUMMARY, layout.COMPARISON)


@dataclasses.dataclass
class ReportContext:
    """What an experiment's evaluation adds to the report of its two folders (see evaluation.pipeline)."""

    title: str
    #: The settings written as config.resolved.json and shown in the report.
    config: dict
    #: Rows added to the report's data table.
    data: dict
    #: Draws the figure sections that come first (training curves, search), given the figures folder.
    sections_before: Callable[[Path], dict]
    tuning_table: Optional[pd.DataFrame] = None


@dataclasses.dataclass
class MaskPairs:
    """Files of a truth and a prediction folder, paired by case id (the name without its suffix)."""

    matched: dict[str, tuple[Path, Path]]
    truth_only: list[Path]
    pred_only: list[Path]
    #: case id -> image file, when an images folder was given (every matched case has one).
    images: dict[str, Path] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FolderEvaluation:
    """The result of :func:`evaluate_folders`; ``str()`` is what the command prints."""

    output_dir: Path
    summary: dict
    pairs: MaskPairs
    notes: list[str]

    def __str__(self) -> str:
        what = "volumes" if self.summary.get("area_unit") == "cm3" else "cases"
        lines = [f"Evaluated {self.summary['n_images']} {what} ({self.output_dir}):", *summary_lines(self.summary)]
        lines.extend(f"Note: {note}" for note in self.notes)
        lines.append(str(self.output_dir / layout.REPORT))
        return "\n".join(lines)


def pair_mask_files(truth_dir: Path, pred_dir: Path, images_dir: Optional[Path] = None) -> MaskPairs:
    """Pair the mask files of two folders by case id, and each pair with its image when ``images_dir`` is given.

    Raises
    ------
    InputError
        If a folder is missing or holds no mask file, no file of one folder matches a file of the other
        (the message gives an example name from each), or a scored pair has no image of its name.
    """
    truth_cases = list_cases(Path(truth_dir), "truth mask")
    pred_cases = list_cases(Path(pred_dir), "predicted mask")
    matched = {case: (path, pred_cases[case]) for case, path in truth_cases.items() if case in pred_cases}
    if not matched:
        raise InputError(pred_dir, f"no predicted mask matches a truth mask of {truth_dir} by name (e.g. truth "
                                   f"{next(iter(truth_cases.values())).name}, prediction "
                                   f"{next(iter(pred_cases.values())).name}); files are paired by name "
                                   "without the suffix")
    images = {}
    if images_dir is not None:
        image_cases = list_cases(Path(images_dir), "image")
        # Cases of several channels are named <case>_0000, <case>_0001, ... (nnU-Net): the first is shown.
        image_cases.update({case: image_cases[f"{case}_0000"] for case in matched
                            if case not in image_cases and f"{case}_0000" in image_cases})
        without = [case for case in matched if case not in image_cases]
        if without:
            raise InputError(matched[without[0]][0], f"no image of this name in {images_dir} (--images); "
                                                     f"{len(without)} of {len(matched)} pairs have none")
        images = {case: image_cases[case] for case in matched}
    return MaskPairs(
        matched=matched,
        truth_only=[path for case, path in truth_cases.items() if case not in pred_cases],
        pred_only=[path for case, path in pred_cases.items() if case not in truth_cases],
        images=images,
    )


def evaluate_folders(
    truth_dir: Path,
    pred_dir: Path,
    out_dir: Path,
    *,
    class_names: Optional[Sequence[str]] = None,
    spacing: Optional[Sequence[float]] = None,
    images_dir: Optional[Path] = None,
    display_window: Optional[Sequence[float]] = None,
    nsd_tolerance: float = 2.0,
    hd95: str = "max_directed",
    bootstrap_samples: int = 1000,
    seed: int = 42,
    intensity_unit: Optional[str] = None,
    context: Optional["ReportContext"] = None,
) -> FolderEvaluation:
    """Score the masks of ``pred_dir`` against those of ``truth_dir``; write the results to ``out_dir``.

    Parameters
    ----------
    truth_dir, pred_dir : Path
        Folders of label maps (class indices), paired by file name without the suffix.
    out_dir : Path
        Output folder, replaced whole when everything succeeded. It may not hold the inputs, and an
        existing folder must be an earlier evaluation output (it is never another folder's contents).
    class_names : sequence of str or None
        All class names, background first. None: ``background, class_1, ...`` up to the largest label.
    spacing : sequence of float or None
        Pixel size in mm per array axis, for files whose format has no spacing (PNG, NPY, CSV).
    images_dir : Path or None
        Folder of the images, named as the masks: gives the mean intensity inside each mask (HU for CT)
        and draws the figures on the image. The masks are then scored on each image's grid (mapped
        through the affines when both carry one, as preload does), with the image's spacing.
    display_window : (float, float) or None
        Intensity range shown black to white in the figures (e.g. -200, 200 HU); None: each image's
        1st-99th percentile.
    nsd_tolerance : float
        Normalised surface Dice tolerance, in mm (pixels when the spacing is unknown).
    hd95 : {"max_directed", "pooled"}
        Definition of HD95 (see :mod:`segmenter.evaluation.surface`).
    bootstrap_samples, seed : int
        Bootstrap of the confidence interval of the mean Dice (see :func:`tables.summarize`).
    intensity_unit : str or None
        Unit of the images' intensities in the clinical figures (e.g. "HU"); None: "image units".
    context : ReportContext or None
        What an experiment adds to the report (see :mod:`segmenter.evaluation.pipeline`); None for two folders.

    Returns
    -------
    result : FolderEvaluation

    Raises
    ------
    InputError
        For a missing or empty folder, no matching names, an unreadable mask, a pair differing in shape,
        labels outside the given classes or a spacing of the wrong length (one line, naming the file).
    """
    truth_dir, pred_dir, out_dir = Path(truth_dir), Path(pred_dir), Path(out_dir)
    check_output_folder(out_dir, [truth_dir, pred_dir, *([Path(images_dir)] if images_dir is not None else [])])
    if class_names is not None and len(class_names) < 2:
        raise InputError(None, "--classes needs the background and at least one foreground class")
    pairs = pair_mask_files(truth_dir, pred_dir, images_dir)

    # First pass: every pair readable and of one shape; the labels present; the spacing each file has.
    labels: set[int] = set()
    header_spacings: dict[str, Optional[tuple[float, ...]]] = {}
    dimensions: dict[str, int] = {}
    for case, (truth, pred, image) in _read_pairs(pairs):
        labels.update(np.unique(truth.array).tolist())
        labels.update(np.unique(pred.array).tolist())
        header_spacings[case] = next((item.spacing for item in (image, truth, pred)
                                      if item is not None and item.spacing is not None), None)
        dimensions[case] = truth.array.ndim
    notes: list[str] = []
    relabel_255 = labels <= {0, 255} and 255 in labels
    if relabel_255:
        notes.append("the masks hold only 0 and 255; 255 was read as class 1")
        labels = {1 if label == 255 else label for label in labels}
    if min(labels) < 0:
        raise InputError(truth_dir, f"negative label {min(labels)} in the masks; labels must be class indices >= 0")
    if class_names is None:
        class_names = ["background", *(f"class_{label}" for label in range(1, max(max(labels), 1) + 1))]
    elif max(labels) >= len(class_names):
        offender = next(path for case, (truth, pred, _) in _read_pairs(pairs) for path, array in
                        ((truth.source, truth.array), (pred.source, pred.array)) if array.max() >= len(class_names))
        raise InputError(offender, f"holds label {max(labels)} but --classes names only {len(class_names)} "
                                   f"classes (labels 0..{len(class_names) - 1})")
    spacings, spacing_source = _choose_spacings(header_spacings, dimensions, spacing, notes)

    def cases() -> Iterator[tuple]:
        for case, (truth, pred, image) in _read_pairs(pairs):
            truth_array, pred_array = truth.array, pred.array
            if relabel_255:
                truth_array, pred_array = (np.where(a == 255, 1, a) for a in (truth_array, pred_array))
            yield case, truth_array, pred_array, spacings[case], None if image is None else image.array

    thumbnails: dict[str, tuple] = {}
    all_ids = list(pairs.matched)
    grid_ids = {all_ids[index] for index in figures.grid_indices(len(all_ids))}

    def keeping_thumbnails(stream):
        for case, truth_array, pred_array, case_spacing, intensity in stream:
            if case in grid_ids:
                # Copies: a plane of a volume would otherwise keep the whole volume in memory.
                thumbnails[case] = tuple(None if view is None else view.copy()
                                         for view in _display_slice(truth_array, pred_array, intensity)[:3])
            yield case, truth_array, pred_array, case_spacing, intensity

    try:
        table = metrics_table(keeping_thumbnails(cases()), list(class_names), nsd_tolerance, hd95)
    except ValueError as error:  # InputError is a ValueError too and already names its file
        raise error if isinstance(error, InputError) else InputError(pred_dir, str(error)) from error
    unit = distance_unit(list(spacings.values()))
    summary = summarize(table, list(class_names), unit, bootstrap_samples, seed)
    settings = {
        "truth_dir": str(truth_dir.resolve()), "pred_dir": str(pred_dir.resolve()),
        "out_dir": str(out_dir.resolve()), "classes": list(class_names),
        "spacing": None if spacing is None else [float(value) for value in spacing],
        "spacing_source": spacing_source,
        "images_dir": None if images_dir is None else str(Path(images_dir).resolve()),
        "display_window": None if display_window is None else [float(value) for value in display_window],
        "evaluate": {"nsd_tolerance": float(nsd_tolerance), "hd95": hd95,
                     "bootstrap_samples": int(bootstrap_samples), "seed": int(seed)},
    }
    pairs_record = {
        "matched": {case: [str(truth), str(pred)] for case, (truth, pred) in pairs.matched.items()},
        "truth_without_prediction": [str(path) for path in pairs.truth_only],
        "prediction_without_truth": [str(path) for path in pairs.pred_only],
    }
    if pairs.truth_only or pairs.pred_only:
        notes.insert(0, _unmatched_text(pairs))

    with atomic_directory(out_dir) as tmp_dir:
        write_text_atomic(table.to_csv(index=False), tmp_dir / layout.METRICS)
        write_json_atomic(summary, tmp_dir / layout.SUMMARY)
        write_json_atomic(pairs_record, tmp_dir / layout.PAIRS)
        write_json_atomic(context.config if context else settings, tmp_dir / layout.RESOLVED_CONFIG)
        sections = _draw_figures(tmp_dir / layout.FIGURES, pairs, table, list(class_names), spacings, thumbnails,
                                 relabel_255, unit, display_window, intensity_unit)
        if context is not None:
            sections = {**context.sections_before(tmp_dir / layout.FIGURES), **sections}
        unmatched = pd.DataFrame(
            [("truth", path.name, "no prediction of this name") for path in pairs.truth_only]
            + [("prediction", path.name, "no truth of this name") for path in pairs.pred_only],
            columns=["folder", "file", "problem"])
        data = {
            "truth folder": str(truth_dir), "prediction folder": str(pred_dir),
            "images folder": str(images_dir) if images_dir is not None else "none (no mean intensity)",
            "pairs scored": len(pairs.matched), "truth files without a prediction": len(pairs.truth_only),
            "predictions without a truth file": len(pairs.pred_only), "classes": list(class_names),
            "pixel spacing": spacing_source, **({"notes": notes} if notes else {}),
        }
        write_report(tmp_dir / layout.REPORT,
                     title=context.title if context else f"Segmentation report: {pred_dir.name} against {truth_dir.name}",
                     config=context.config if context else settings,
                     manifest_summary={**data, **context.data} if context else data, summary=summary, table=table,
                     figures=sections, tuning_table=context.tuning_table if context else None,
                     extra_tables={"Unmatched files": unmatched} if len(unmatched) else None)
    return FolderEvaluation(out_dir, summary, pairs, notes)


def check_output_folder(out_dir: Path, inputs: Sequence[Path]) -> None:
    """Refuse an --out folder that would replace input data or an unrelated folder."""
    check_replaceable_folder(out_dir, inputs, OUTPUT_MARKERS, "--out")


def _read_pairs(pairs: MaskPairs) -> Iterator[tuple[str, tuple]]:
    """Yield (case, (truth, pred, image or None)) for each matched pair in turn (see :func:`_read_pair`)."""
    for case, (truth_path, pred_path) in pairs.matched.items():
        yield case, _read_pair(truth_path, pred_path, pairs.images.get(case))


def _read_pair(truth_path: Path, pred_path: Path,
               image_path: Optional[Path] = None) -> tuple[LoadedImage, LoadedImage, Optional[LoadedImage]]:
    """Read a truth and a predicted mask, on the image's grid when there is an image, else on the truth's.

    When both files carry an affine (NIfTI, DICOM) and their grids differ, a mask is mapped onto the other
    grid through the affines, as the preload stage maps label maps onto images; otherwise the shapes must
    be equal.
    """
    if image_path is not None:
        image = read_image(image_path)
        truth, pred = read_mask(truth_path, reference=image), read_mask(pred_path, reference=image)
        return _in_display_orientation(truth, pred, image)
    truth, pred = read_mask(truth_path), read_mask(pred_path)
    same_grid = truth.array.shape == pred.array.shape and (
        truth.affine is None or pred.affine is None or np.allclose(truth.affine, pred.affine, atol=1e-4))
    if not same_grid and truth.affine is not None and pred.affine is not None \
            and truth.array.ndim == pred.array.ndim:
        array = map_labels_to_grid(pred.array, pred.affine, truth.array.shape, truth.affine, pred_path)
        pred = LoadedImage(np.ascontiguousarray(array), truth.spacing, truth.affine, pred_path)
    elif truth.array.shape != pred.array.shape:
        raise InputError(pred_path, f"mask shape {pred.array.shape} differs from the truth's "
                                    f"{truth.array.shape} ({truth_path.name})")
    return _in_display_orientation(truth, pred, None)


#: Axis codes of volumes once read: rows run anterior to posterior and columns patient-right to
#: patient-left (an axial plane as radiologists view it, and as DICOM stores axial slices), planes inferior
#: to superior. Scores do not depend on it (the spacing is permuted with the axes); the figures do.
DISPLAY_AXES = ("P", "L", "S")


def _in_display_orientation(truth: LoadedImage, pred: LoadedImage, image: Optional[LoadedImage]):
    """The three (on one grid) turned to DISPLAY_AXES when they have an affine, single-plane volumes as 2D.

    A single plane is turned only when it is axial (its missing axis is the inferior-superior one); a
    sagittal or coronal plane keeps its stored order, which is how such planes are usually stored.
    """
    items = (truth, pred, image)
    # All three are on one grid; any of them may be the one whose format carries the affine.
    affine = next((item.affine for item in (image, truth, pred) if item is not None and item.affine is not None),
                  None)
    shape = truth.array.shape
    if truth.array.ndim == 3 and affine is not None:
        transform = orientations.ornt_transform(orientations.io_orientation(affine),
                                                orientations.axcodes2ornt(DISPLAY_AXES))
        single_plane_axis = shape.index(1) if 1 in shape else None
        if single_plane_axis is None or int(transform[single_plane_axis, 0]) == 2:
            new_affine = affine @ orientations.inv_ornt_aff(transform, shape)
            items = tuple(None if item is None else _turned(item, transform, new_affine) for item in items)
    return tuple(None if item is None else _as_2d_if_single_plane(item) for item in items)


def _turned(item: LoadedImage, transform: np.ndarray, affine: np.ndarray) -> LoadedImage:
    """``item`` with its axes permuted and flipped by a nibabel orientation transform, spacing permuted alike."""
    spacing = None
    if item.spacing is not None:
        spacing = [0.0] * 3
        for old_axis, (new_axis, _) in enumerate(transform):
            spacing[int(new_axis)] = item.spacing[old_axis]
    array = np.ascontiguousarray(orientations.apply_orientation(item.array, transform))
    return LoadedImage(array, None if spacing is None else tuple(spacing), affine, item.source)


def _as_2d_if_single_plane(mask: LoadedImage) -> LoadedImage:
    """A 3D mask with one plane as 2D (its spacing without that axis); surface distances need a real 2D."""
    shape = mask.array.shape
    if mask.array.ndim != 3 or 1 not in shape:
        return mask
    axis = shape.index(1)
    spacing = None if mask.spacing is None else tuple(s for i, s in enumerate(mask.spacing) if i != axis)
    return LoadedImage(np.take(mask.array, 0, axis=axis), spacing, mask.affine, mask.source)


def _choose_spacings(header_spacings: dict[str, Optional[tuple[float, ...]]], dimensions: dict[str, int],
                     spacing: Optional[Sequence[float]],
                     notes: list[str]) -> tuple[dict[str, Optional[tuple[float, ...]]], str]:
    """Per case: the header's spacing, else ``spacing``, else None for every case (pixels)."""
    without = [case for case, value in header_spacings.items() if value is None]
    if spacing is not None:
        spacing = tuple(float(value) for value in spacing)
        for case in without:
            if dimensions[case] != len(spacing):
                raise InputError(None, f"--spacing has {len(spacing)} values but the masks of case {case!r} "
                                       f"have {dimensions[case]} axes")
        chosen = {case: value if value is not None else spacing for case, value in header_spacings.items()}
        if not without:
            return chosen, "from the file headers (--spacing not needed)"
        source = "from --spacing" if len(without) == len(chosen) else "from the file headers, else --spacing"
        return chosen, f"{source} ({', '.join(f'{value:g}' for value in spacing)} mm)"
    if not without:
        return dict(header_spacings), "from the file headers (mm)"
    if len(without) < len(header_spacings):
        notes.append(f"{len(without)} of {len(header_spacings)} pairs have no pixel spacing (e.g. {without[0]}), "
                     "so every distance is in pixels; pass --spacing to measure in mm")
    return {case: None for case in header_spacings}, "unknown: distances in pixels (pass --spacing for mm)"


def _display_slice(truth: np.ndarray, pred: np.ndarray, image: Optional[np.ndarray] = None):
    """A 2D view of a pair (and its image), for the grid of all cases: itself if 2D, else the plane (last
    axis: axial for volumes with an affine, see DISPLAY_AXES) with the most true foreground.

    Returns (truth2d, pred2d, image2d or None, plane index or None).
    """
    if truth.ndim == 2:
        return truth, pred, image, None
    counts = (truth > 0).sum(axis=(0, 1))
    if not counts.any():
        counts = (pred > 0).sum(axis=(0, 1))
    plane = int(counts.argmax()) if counts.any() else truth.shape[-1] // 2
    return truth[..., plane], pred[..., plane], None if image is None else image[..., plane], plane


def _draw_figures(folder: Path, pairs: MaskPairs, table: pd.DataFrame, class_names: list[str],
                  spacings: dict, thumbnails: dict, relabel_255: bool, unit: str,
                  display_window: Optional[Sequence[float]], intensity_unit: Optional[str]) -> dict[str, list]:
    folder.mkdir(parents=True, exist_ok=True)
    window = None if display_window is None else tuple(display_window)
    sections: dict[str, list] = {}
    comparisons = []
    for class_id, class_name in enumerate(class_names[1:], start=1):
        if not (table["class"] == class_name).any():
            continue
        for rank, case in figures.select_cases(table, class_name).items():
            truth, pred, image = _read_pair(*pairs.matched[case], pairs.images.get(case))
            truth_array, pred_array = truth.array, pred.array
            if relabel_255:
                truth_array, pred_array = (np.where(a == 255, 1, a) for a in (truth_array, pred_array))
            volume = truth_array.ndim == 3
            # A volume with an affine was turned to DISPLAY_AXES, so its planes have anatomical names.
            oriented = any(item is not None and item.affine is not None for item in (truth, pred, image))
            row = table[(table.image_id == case) & (table["class"] == class_name)].iloc[0]
            path = figures.comparison_figure(None if image is None else image.array, truth_array, pred_array,
                                             class_id, class_name, f"{class_name}, {rank} case: {case}",
                                             folder / f"compare_{_file_safe(class_name)}_{rank}.png", window,
                                             spacing=spacings[case], anatomical_planes=oriented,
                                             scores={"dice": row.dice, "hd95": row.hd95, "case": row.case})
            planes = ("axial, coronal and sagittal planes" if oriented else "three orthogonal planes")
            comparisons.append((path, f"{class_name}: {rank} case by Dice ({case}, Dice {row.dice:.3f}"
                                      + (f", whole-volume Dice; the {planes} through the centre of the true and "
                                         "predicted structure are shown)" if volume else ")")))
    sections["Best, median and worst cases"] = comparisons
    ids = [case for case in pairs.matched if case in thumbnails]
    images = [thumbnails[c][2] for c in ids] if pairs.images else None
    sections["All cases"] = [(figures.case_grid_figure(images, [thumbnails[c][0] for c in ids],
                                                       [thumbnails[c][1] for c in ids], ids,
                                                       folder / "all_cases.png", window, total=len(pairs.matched)),
                              "Every case (3D: the plane with the most true foreground): agreement (green), "
                              "missed (vermilion) and extra (yellow) pixels")]
    sections.update(figures.metric_and_clinical_sections(table, folder, unit, intensity_unit))
    return sections


def _unmatched_text(pairs: MaskPairs) -> str:
    parts = []
    for paths, what in ((pairs.truth_only, "truth files without a prediction"),
                        (pairs.pred_only, "predictions without a truth file")):
        if paths:
            names = ", ".join(path.name for path in paths[:5]) + (", ..." if len(paths) > 5 else "")
            parts.append(f"{len(paths)} {what} ({names})")
    return "unmatched, not scored: " + "; ".join(parts)


def _file_safe(name: str) -> str:
    return "".join(character if character.isalnum() or character in "-_" else "_" for character in name)

