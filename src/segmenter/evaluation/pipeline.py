"""The evaluate stage: score predictions against the truth, draw the figures and write the report.

Reads the preloaded test split (on its original grid when preload resized it, see :class:`TestSlices`)
and ``experiments/<experiment>/predict/test/``; writes
``experiments/<experiment>/evaluate/`` (``metrics.csv``, ``summary.json``, ``figures/``, ``report.html``)
as one folder that replaces an earlier one only when everything succeeded.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd

from segmenter.artifacts import atomic_directory, save_resolved_config, write_json_atomic, write_text_atomic
from segmenter.config import Config
from segmenter.dataset import load_split, open_native_test, read_manifest
from segmenter.errors import InputError
from segmenter.evaluation import figures
from segmenter.evaluation.report import write_report
from segmenter.evaluation.tables import distance_unit, known_spacing, metrics_table, summarize, summary_lines



@dataclasses.dataclass
class EvaluateResult:
    output_dir: Path
    summary: dict

    def __str__(self) -> str:
        lines = [f"Evaluated {self.summary['n_images']} test images ({self.output_dir}):", *summary_lines(self.summary)]
        return "\n".join([*lines, str(self.output_dir / "report.html")])


@dataclasses.dataclass
class ScoredSlice:
    """One test slice as evaluate scores it: truth, prediction, intensities (HU for CT) and pixel spacing.

    ``intensity`` (for the mean inside each mask) is None when the shards hold no raw intensities;
    ``display`` is what the figures show: the intensities, else the normalised image.
    """

    slice_id: str
    truth: np.ndarray
    pred: np.ndarray
    intensity: Optional[np.ndarray]
    display: np.ndarray
    spacing: Optional[tuple[float, ...]]


class TestSlices:
    """The test split and its predictions, read slice by slice.

    On each slice's original grid when preload resized the test split (``test-native/``), so that
    Dice, distances, areas and mean HU describe the masks as they were annotated (nnU-Net, too, scores on
    the original spacing); otherwise at the preloaded size, which is then the original size.
    """

    def __init__(self, config: Config, manifest: dict):
        self.preloaded = load_split(config.preloaded_dir, "test")
        self.native = open_native_test(config.preloaded_dir, manifest)
        self.ids = [str(slice_id) for slice_id in self.preloaded.ids]
        self.prediction_dir = config.stage_dir("predict") / "test"
        missing = [i for i in self.ids if not (self.prediction_dir / f"{i}.npy").is_file()]
        if missing:
            raise FileNotFoundError(f"{self.prediction_dir}: no prediction for {len(missing)} test slices "
                                    f"(e.g. {missing[0]}); run the predict stage first")
        if self.native:
            records = {r["id"]: r for r in manifest["splits"]["test"]["slices"]}
            spacings = [known_spacing(records[i]["original_spacing"]) for i in self.ids]
        else:
            spacings = [known_spacing(s) for s in self.preloaded.spacing]
        # Some slices without a spacing (e.g. PNG mixed with DICOM): one unit for all, pixels.
        self.unit = distance_unit(spacings)
        self.resolution = "original" if self.native else "preloaded"

    def __len__(self) -> int:
        return len(self.ids)

    def _truth(self, i: int):
        if self.native is not None:
            native = self.native[self.ids[i]]
            return native.mask, native.intensity, native.intensity, known_spacing(native.spacing)
        test = self.preloaded
        intensity = test.hu_images[i] if test.hu_images is not None else None
        display = intensity if intensity is not None else test.images[i, ..., 0]
        return test.masks[i], intensity, display, known_spacing(test.spacing[i])

    def __getitem__(self, i: int) -> ScoredSlice:
        truth, intensity, display, spacing = self._truth(i)
        path = self.prediction_dir / f"{self.ids[i]}.npy"
        pred = np.load(path)
        if pred.shape != truth.shape:
            raise InputError(path, f"prediction of shape {pred.shape}, but the test slice is {truth.shape} "
                                   f"at the {self.resolution} size; run the predict stage again")
        return ScoredSlice(self.ids[i], truth, pred, intensity, display, spacing if self.unit == "mm" else None)

    def __iter__(self) -> Iterator[ScoredSlice]:
        return (self[i] for i in range(len(self)))


def _draw_figures(folder: Path, test: TestSlices, table: pd.DataFrame, config: Config,
                  unit: str) -> dict[str, list]:
    folder.mkdir(parents=True, exist_ok=True)
    window = config.evaluate.display_window
    index_of = {slice_id: i for i, slice_id in enumerate(test.ids)}
    sections: dict[str, list] = {}

    train_curves = config.stage_dir("train") / "history.csv"
    if train_curves.is_file():
        sections["Training curves"] = [(figures.training_curves_figure(train_curves, folder / "training_curves.png"),
                                        "Loss and Dice per training epoch")]

    comparisons = []
    for class_id, class_name in enumerate(config.classes[1:], start=1):
        for rank, slice_id in figures.select_cases(table, class_name).items():
            case = test[index_of[slice_id]]
            row = table[(table.image_id == slice_id) & (table["class"] == class_name)].iloc[0]
            path = figures.comparison_figure(
                case.display, case.truth, case.pred, class_id, class_name,
                f"{class_name}, {rank} case: {slice_id}", folder / f"compare_{class_name}_{rank}.png", window,
                spacing=case.spacing)
            comparisons.append((path, f"{class_name}: {rank} case by Dice ({slice_id}, Dice {row.dice:.3f})"))
    sections["Best, median and worst cases"] = comparisons
    shown = [test[i] for i in figures.grid_indices(len(test))]
    sections["All test cases"] = [(figures.case_grid_figure([c.display for c in shown], [c.truth for c in shown],
                                                            [c.pred for c in shown], [c.slice_id for c in shown],
                                                            folder / "all_cases.png", window, total=len(test)),
                                   "Every test case: agreement (green), missed (vermilion) and extra (yellow) pixels")]
    # A CT window means the raw intensities are Hounsfield units.
    ct = config.preload.normalization.method == "ct_window"
    sections.update(figures.metric_and_clinical_sections(table, folder, unit, "HU" if ct else None))
    return sections


def _tuning_results(config: Config) -> tuple[Optional[pd.DataFrame], list]:
    tune_dir = config.stage_dir("tune")
    trials = tune_dir / "trials.csv"
    if not trials.is_file():
        return None, []
    figure = tune_dir / "objective_vs_hyperparameters.png"
    return pd.read_csv(trials), ([(figure, "Search objective against each hyperparameter")] if figure.is_file() else [])


def manifest_summary(manifest: dict, resolution: str) -> dict:
    return {
        "experiment": manifest.get("experiment"),
        "classes": manifest.get("classes"),
        "image_size": manifest.get("image_size"),
        "scored at": f"the {resolution} size of each test slice",
        "preprocessing": manifest.get("preprocessing", {}).get("normalization"),
        "train slices": manifest["splits"]["train"]["num_slices"],
        "test slices": manifest["splits"]["test"]["num_slices"],
        "skipped pairs": len(manifest.get("skipped", [])),
        "source files": len(manifest.get("sources", {})),
    }


def evaluate_experiment(config: Config) -> EvaluateResult:
    """Run the evaluate stage for ``config``; see the module docstring."""
    manifest = read_manifest(config.preloaded_dir)
    test = TestSlices(config, manifest)
    table = metrics_table(((c.slice_id, c.truth, c.pred, c.spacing, c.intensity) for c in test),
                          config.classes, config.evaluate.nsd_tolerance)
    summary = summarize(table, config.classes, test.unit, config.evaluate.bootstrap_samples, config.seed)
    summary["resolution"] = test.resolution

    out_dir = config.stage_dir("evaluate")
    with atomic_directory(out_dir) as tmp_dir:
        write_text_atomic(table.to_csv(index=False), tmp_dir / "metrics.csv")
        write_json_atomic(summary, tmp_dir / "summary.json")
        sections = _draw_figures(tmp_dir / "figures", test, table, config, test.unit)
        tuning_table, tuning_figures = _tuning_results(config)
        if tuning_figures:
            sections = {"Hyperparameter search": tuning_figures, **sections}
        save_resolved_config(config, tmp_dir)
        write_report(tmp_dir / "report.html", title=f"Segmentation report: {config.experiment}",
                     config=config.to_jsonable(), manifest_summary=manifest_summary(manifest, test.resolution),
                     summary=summary, table=table, figures=sections, tuning_table=tuning_table)
    save_resolved_config(config, config.experiment_dir)
    return EvaluateResult(out_dir, summary)
