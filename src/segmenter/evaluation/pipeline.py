"""The evaluate stage: score predictions against the truth, draw the figures and write the report.

Reads the preloaded test split and ``experiments/<experiment>/predict/test/``; writes
``experiments/<experiment>/evaluate/`` (``metrics.csv``, ``summary.json``, ``figures/``, ``report.html``)
as one folder that replaces an earlier one only when everything succeeded.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from segmenter.artifacts import atomic_directory, save_resolved_config, write_json_atomic, write_text_atomic
from segmenter.config import Config
from segmenter.dataset import SliceSet, load_split, read_manifest
from segmenter.evaluation import figures
from segmenter.evaluation.report import write_report
from segmenter.evaluation.tables import distance_unit, known_spacing, metrics_table, summarize, summary_lines

DISTRIBUTION_METRICS = ("dice", "iou", "hd95", "assd", "nsd")


@dataclasses.dataclass
class EvaluateResult:
    output_dir: Path
    summary: dict

    def __str__(self) -> str:
        lines = [f"Evaluated {self.summary['n_images']} test images ({self.output_dir}):", *summary_lines(self.summary)]
        return "\n".join([*lines, str(self.output_dir / "report.html")])


def load_predictions(prediction_dir: Path, ids) -> np.ndarray:
    missing = [i for i in ids if not (prediction_dir / f"{i}.npy").is_file()]
    if missing:
        raise FileNotFoundError(f"{prediction_dir}: no prediction for {len(missing)} test slices "
                                f"(e.g. {missing[0]}); run the predict stage first")
    return np.stack([np.load(prediction_dir / f"{i}.npy") for i in ids])


def _draw_figures(folder: Path, test: SliceSet, preds: np.ndarray, table: pd.DataFrame, config: Config,
                  unit: str) -> dict[str, list]:
    folder.mkdir(parents=True, exist_ok=True)
    window = config.evaluate.display_window
    display = test.hu_images if test.hu_images is not None else test.images[..., 0]
    index_of = {slice_id: i for i, slice_id in enumerate(test.ids)}
    sections: dict[str, list] = {}

    train_curves = config.stage_dir("train") / "history.csv"
    if train_curves.is_file():
        sections["Training curves"] = [(figures.training_curves_figure(train_curves, folder / "training_curves.png"),
                                        "Loss and Dice per training epoch")]

    comparisons = []
    for class_id, class_name in enumerate(config.classes[1:], start=1):
        for rank, slice_id in figures.select_cases(table, class_name).items():
            i = index_of[slice_id]
            row = table[(table.image_id == slice_id) & (table["class"] == class_name)].iloc[0]
            path = figures.comparison_figure(
                display[i], test.masks[i], preds[i], class_id, class_name,
                f"{class_name}, {rank} case: {slice_id}", folder / f"compare_{class_name}_{rank}.png", window,
                spacing=known_spacing(test.spacing[i]))
            comparisons.append((path, f"{class_name}: {rank} case by Dice ({slice_id}, Dice {row.dice:.3f})"))
    sections["Best, median and worst cases"] = comparisons
    sections["All test cases"] = [(figures.case_grid_figure(list(display), list(test.masks), list(preds),
                                                            list(test.ids), folder / "all_cases.png", window),
                                   "Every test case: agreement (green), missed (vermilion) and extra (yellow) pixels")]
    sections["Metric distributions"] = [
        (figures.distribution_figure(table, metric, folder / f"distribution_{metric}.png",
                                     unit=unit if metric in ("hd", "hd95", "assd") else None), f"{metric} per class")
        for metric in DISTRIBUTION_METRICS]
    clinical = []
    for quantity in ("area", "mean_intensity"):
        if table[f"{quantity}_true"].notna().any():
            clinical.append((figures.bland_altman_figure(table, quantity, folder / f"bland_altman_{quantity}.png"),
                             f"Bland-Altman plot of {quantity.replace('_', ' ')}, predicted against true"))
            clinical.append((figures.correlation_figure(table, quantity, folder / f"correlation_{quantity}.png"),
                             f"Predicted against true {quantity.replace('_', ' ')}"))
    sections["Clinical measures"] = clinical
    return sections


def _tuning_results(config: Config) -> tuple[Optional[pd.DataFrame], list]:
    tune_dir = config.stage_dir("tune")
    trials = tune_dir / "trials.csv"
    if not trials.is_file():
        return None, []
    figure = tune_dir / "objective_vs_hyperparameters.png"
    return pd.read_csv(trials), ([(figure, "Search objective against each hyperparameter")] if figure.is_file() else [])


def manifest_summary(manifest: dict) -> dict:
    return {
        "experiment": manifest.get("experiment"),
        "classes": manifest.get("classes"),
        "image_size": manifest.get("image_size"),
        "preprocessing": manifest.get("preprocessing", {}).get("normalization"),
        "train slices": manifest["splits"]["train"]["num_slices"],
        "test slices": manifest["splits"]["test"]["num_slices"],
        "skipped pairs": len(manifest.get("skipped", [])),
        "source files": len(manifest.get("sources", {})),
    }


def evaluate_experiment(config: Config) -> EvaluateResult:
    """Run the evaluate stage for ``config``; see the module docstring."""
    manifest = read_manifest(config.preloaded_dir)
    test = load_split(config.preloaded_dir, "test")
    preds = load_predictions(config.stage_dir("predict") / "test", test.ids)
    spacings = [known_spacing(s) for s in test.spacing]
    if distance_unit(spacings) == "pixels":
        # Some slices without a spacing (e.g. PNG mixed with DICOM): one unit for all, pixels.
        spacings = [None] * len(spacings)
    intensities = test.hu_images if test.hu_images is not None else [None] * len(test)
    table = metrics_table(zip(test.ids, test.masks, preds, spacings, intensities), config.classes,
                          config.evaluate.nsd_tolerance)
    unit = distance_unit(spacings)
    summary = summarize(table, config.classes, unit, config.evaluate.bootstrap_samples, config.seed)

    out_dir = config.stage_dir("evaluate")
    with atomic_directory(out_dir) as tmp_dir:
        write_text_atomic(table.to_csv(index=False), tmp_dir / "metrics.csv")
        write_json_atomic(summary, tmp_dir / "summary.json")
        sections = _draw_figures(tmp_dir / "figures", test, preds, table, config, unit)
        tuning_table, tuning_figures = _tuning_results(config)
        if tuning_figures:
            sections = {"Hyperparameter search": tuning_figures, **sections}
        save_resolved_config(config, tmp_dir)
        write_report(tmp_dir / "report.html", title=f"Segmentation report: {config.experiment}",
                     config=config.to_jsonable(), manifest_summary=manifest_summary(manifest), summary=summary,
                     table=table, figures=sections, tuning_table=tuning_table)
    save_resolved_config(config, config.experiment_dir)
    return EvaluateResult(out_dir, summary)
