"""The evaluate stage of an experiment: the folder evaluation of the test truth against the predictions.

An experiment is scored exactly as two folders are (:func:`segmenter.evaluation.folders.evaluate_folders`):
the truth is the preloaded ``test/labels`` (whole cases at their original geometry), the predictions are
``experiments/<experiment>/predict/test``, and the images ``test/images`` give the mean intensity inside
each mask and the figures. ``segmenter evaluate --truth --pred --images`` on the same folders gives the same
rows. The experiment adds the training curves, the search results and the dataset's description to the
report. Writes ``experiments/<experiment>/evaluate/`` (``metrics.csv``, ``summary.json``, ``pairs.json``,
``figures/``, ``report.html``) as one folder that replaces an earlier one only when everything succeeded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from segmenter import consistency, io, layout, locks
from segmenter.artifacts import save_resolved_config
from segmenter.config import Config
from segmenter.evaluation import figures
from segmenter.evaluation.folders import FolderEvaluation, ReportContext, evaluate_folders
from segmenter.manifest import Manifest, check_classes, read_manifest


def _tuning_results(config: Config) -> tuple[Optional[pd.DataFrame], list]:
    tune_dir = config.stage_dir("tune")
    trials = tune_dir / layout.TRIALS
    if not trials.is_file():
        return None, []
    figure = tune_dir / layout.TUNING_FIGURE
    return pd.read_csv(trials), ([(figure, "Search objective against each hyperparameter")] if figure.is_file() else [])


def dataset_summary(manifest: Manifest) -> dict:
    """The report's description of the preloaded dataset."""
    return {
        "experiment": manifest.experiment,
        "classes": manifest.classes,
        "channels": manifest.channels,
        "training sample size": manifest.sample_size,
        "scored at": "the original geometry of each test case (whole volumes in 3D)",
        "preprocessing": manifest.preprocessing.get("normalization"),
        "split": manifest.split,
        "training cases": len(manifest.train.cases),
        "training samples": manifest.train.num_samples,
        "test cases": len(manifest.test.cases),
        "skipped cases": len(manifest.skipped),
        "source files": len(manifest.sources),
    }


def _experiment_context(config: Config, manifest: Manifest) -> ReportContext:
    tuning_table, tuning_figures = _tuning_results(config)

    def sections_before(folder: Path) -> dict:
        sections = {"Hyperparameter search": tuning_figures} if tuning_figures else {}
        history = layout.history_path(config.stage_dir("train"))
        if history.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            sections["Training curves"] = [(figures.training_curves_figure(history, folder / layout.TRAINING_CURVES),
                                            "Loss and Dice per training epoch")]
        return sections

    return ReportContext(title=f"Segmentation report: {config.experiment}", config=config.to_jsonable(),
                         data=dataset_summary(manifest), sections_before=sections_before, tuning_table=tuning_table)


@locks.locked("evaluate")
def evaluate_experiment(config: Config) -> FolderEvaluation:
    """Run the evaluate stage for ``config``; see the module docstring."""
    manifest = read_manifest(config.preloaded_dir)
    check_classes(config.classes, manifest.classes, f"the preloaded dataset {config.preloaded_dir}")
    predictions = layout.test_predictions_dir(config.stage_dir("predict"))
    predicted = io.list_cases(predictions, "predicted mask") if predictions.is_dir() else {}
    missing = [case.id for case in manifest.test.cases if case.id not in predicted]
    if missing:
        raise FileNotFoundError(f"{predictions}: no prediction for {len(missing)} of {len(manifest.test.cases)} "
                                f"test cases (e.g. {missing[0]}); run the predict stage first")
    # Predictions of the current model, itself trained on the current preload (else: which stage to run again).
    consistency.check_predictions_current(predictions, config.stage_dir("train"), manifest, config.preloaded_dir)
    normalization = manifest.preprocessing.get("normalization", {})
    first_channel = normalization[0] if isinstance(normalization, list) else normalization
    result = evaluate_folders(
        layout.test_labels_dir(config.preloaded_dir), predictions, config.stage_dir("evaluate"),
        class_names=config.classes, spacing=config.preload.pixel_spacing,
        images_dir=layout.test_images_dir(config.preloaded_dir), display_window=config.evaluate.display_window,
        nsd_tolerance=config.evaluate.nsd_tolerance, hd95=config.evaluate.hd95,
        bootstrap_samples=config.evaluate.bootstrap_samples, seed=config.seed,
        # A CT window means the raw intensities are Hounsfield units.
        intensity_unit="HU" if first_channel.get("method") == "ct_window" else None,
        context=_experiment_context(config, manifest))
    save_resolved_config(config, config.experiment_dir)
    return result
