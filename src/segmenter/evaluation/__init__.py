"""Evaluation: surface-distance metrics, per-image tables and summaries, figures and the HTML report.

Framework-free (NumPy, SciPy, pandas, matplotlib, seaborn): nothing here imports TensorFlow, so results
can be re-scored or re-plotted on any machine.
"""
from segmenter.evaluation.figures import (
    bland_altman_figure,
    case_grid_figure,
    comparison_figure,
    correlation_figure,
    distribution_figure,
    select_cases,
    training_curves_figure,
)
from segmenter.evaluation.report import write_report
from segmenter.evaluation.surface import border, segmentation_metrics
from segmenter.evaluation.tables import area_unit, distance_unit, known_spacing, metrics_table, summarize

__all__ = [
    "area_unit",
    "bland_altman_figure",
    "border",
    "case_grid_figure",
    "comparison_figure",
    "correlation_figure",
    "distance_unit",
    "distribution_figure",
    "known_spacing",
    "metrics_table",
    "segmentation_metrics",
    "select_cases",
    "summarize",
    "training_curves_figure",
    "write_report",
]
