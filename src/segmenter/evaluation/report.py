"""The evaluation report: one self-contained HTML page per run.

The page needs nothing beside it: figures are embedded as base64 ``data:`` URIs, the style sheet is
inline, and there is no JavaScript (collapsible parts use ``<details>``), so it can be mailed, archived
or opened on a hospital workstation without network access. Every piece of text taken from the run is
passed through ``html.escape``.

Sections, in reading order for a clinician (results first, provenance last): overview, results per
class with definitions, figures (in the order given, e.g. training curves, examples, distributions),
tuning results, any extra tables, per-image metrics, data, configuration. ``write_comparison_report``
writes the page comparing runs (means side by side, paired tests, paired plots) in the same style.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from segmenter.artifacts import write_text_atomic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FigureEntry = Union[Path, str, tuple[Union[Path, str], str]]

_METRIC_TITLES = {
    "dice": "Dice",
    "iou": "IoU (Jaccard)",
    "hd": "Hausdorff distance",
    "hd95": "HD95",
    "assd": "ASSD",
    "nsd": "NSD",
}
_DISTANCE_METRICS = ("hd", "hd95", "assd")
_CASE_TITLES = {
    "both_present": "Present and predicted",
    "both_empty": "Absent and not predicted",
    "missed": "Missed (present, not predicted)",
    "false_positive": "False positive (absent, predicted)",
}
_UNIT_TEXT = {"mm": "mm", "pixels": "pixels", "cm2": "cm²", "cm3": "cm³"}

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1.5em; color: #1d2630; line-height: 1.45; }
h1 { border-bottom: 3px solid #0b3c5d; padding-bottom: .3em; }
h2 { color: #0b3c5d; border-bottom: 1px solid #c9d6e2; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #c9d6e2; padding: .3em .6em; text-align: right; }
th { background: #eaf1f7; }
td:first-child, th:first-child, td.text { text-align: left; }
tbody tr:nth-child(even) { background: #f7f9fb; }
.scroll { max-height: 32em; overflow: auto; border: 1px solid #c9d6e2; }
.scroll table { margin: 0; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #c9d6e2; }
figcaption { font-size: .9em; color: #44525f; }
dt { font-weight: bold; } dd { margin: 0 0 .5em 1.5em; }
pre { background: #f4f6f8; padding: 1em; overflow: auto; font-size: .85em; }
nav ul { columns: 2; }
.note { color: #44525f; font-size: .9em; }
"""


def write_report(
    path: Path,
    *,
    title: str,
    config: Mapping[str, Any],
    manifest_summary: Optional[Mapping[str, Any]],
    summary: Mapping[str, Any],
    table: pd.DataFrame,
    figures: Mapping[str, Sequence[FigureEntry]],
    tuning_table: Optional[pd.DataFrame] = None,
    extra_tables: Optional[Mapping[str, pd.DataFrame]] = None,
) -> Path:
    """Write the evaluation report as one self-contained HTML file.

    Parameters
    ----------
    path : Path
        The HTML file to write (atomically).
    title : str
        Page title.
    config : mapping
        The run's resolved configuration, shown as JSON in a collapsible block.
    manifest_summary : mapping or None
        A short description of the data (counts per split, spacing, ...), shown as a key/value table.
    summary : mapping
        Output of :func:`segmenter.evaluation.tables.summarize`.
    table : pandas.DataFrame
        Output of :func:`segmenter.evaluation.tables.metrics_table`.
    figures : mapping of str to sequence of Path or (Path, caption)
        Section title -> PNG files, in display order. A bare path is captioned from its file name.
    tuning_table : pandas.DataFrame or None
        Hyperparameter search results, one row per trial.
    extra_tables : mapping of str to pandas.DataFrame or None
        Further tables, each under its own heading.

    Returns
    -------
    path : Path
    """
    distance = _UNIT_TEXT.get(summary.get("distance_unit", "pixels"), summary.get("distance_unit", ""))
    area = _UNIT_TEXT.get(summary.get("area_unit", "pixels"), summary.get("area_unit", ""))
    tolerance = _find_key(config, "nsd_tolerance")
    hd95 = _find_key(config, "hd95") or "max_directed"
    sections: list[tuple[str, str]] = []  # (heading, body html)

    sections.append(("Results per class", _results_section(summary, distance, tolerance, hd95)))
    for heading, entries in figures.items():
        sections.append((heading, _figures_html(heading, entries)))
    if tuning_table is not None:
        sections.append(("Hyperparameter search: every trial", _scroll(_table_html(tuning_table))))
    for heading, frame in (extra_tables or {}).items():
        sections.append((heading, _scroll(_table_html(frame))))
    sections.append(("Per-image metrics", _per_image_section(table, distance, area)))
    if manifest_summary is not None:
        sections.append(("Data", _mapping_table(manifest_summary)))
    config_json = json.dumps(config, indent=2, default=str)
    sections.append((
        "Configuration",
        "<p>The resolved configuration of this run: every setting, so the results can be reproduced.</p>"
        f"<details><summary>Show configuration (JSON)</summary><pre>{_e(config_json)}</pre></details>",
    ))

    n_images = summary.get("n_images", table["image_id"].nunique() if "image_id" in table else 0)
    cases = "volumes" if summary.get("area_unit") == "cm3" else "cases"
    sizes = "volumes" if summary.get("area_unit") == "cm3" else "areas"
    overview = (f"<p>{_e(n_images)} test {cases}. Distances in <b>{_e(distance)}</b>, {sizes} in "
                f"<b>{_e(area)}</b>")
    if tolerance is not None:
        overview += f", normalised surface Dice at a tolerance of <b>{_e(_number(tolerance))} {_e(distance)}</b>"
    overview += "."
    overview += "</p>"
    return write_text_atomic(_page(title, overview, sections), Path(path))


def write_comparison_report(
    path: Path,
    *,
    title: str,
    runs: Mapping[str, Any],
    means: pd.DataFrame,
    tests: pd.DataFrame,
    figures: Mapping[str, Sequence[FigureEntry]],
    notes: Sequence[str] = (),
    method: str = "",
) -> Path:
    """Write the report comparing evaluation runs as one self-contained HTML file.

    Parameters
    ----------
    path : Path
        The HTML file to write (atomically).
    title : str
        Page title.
    runs : mapping
        Run name -> a short description (its folder, image count, units), shown as a key/value table.
    means : pandas.DataFrame
        Per-class means side by side, one column per run (already formatted or numeric).
    tests : pandas.DataFrame
        The paired tests, one row per class and pair of runs.
    figures : mapping of str to sequence of Path or (Path, caption)
        Section title -> PNG files, in display order.
    notes : sequence of str
        Remarks shown under the overview (e.g. images not shared by every run).
    method : str
        One paragraph saying how the runs were compared, shown above the tests.
    """
    overview = (f"<p>{_e(len(runs))} runs compared on the images they share, matched by image id and class.</p>"
                + "".join(f'<p class="note">{_e(note)}</p>' for note in notes))
    sections = [
        ("Mean per class, side by side", _scroll(_table_html(means))),
        ("Paired tests", (f"<p>{_e(method)}</p>" if method else "") + _scroll(_table_html(tests))),
        *((heading, _figures_html(heading, entries)) for heading, entries in figures.items()),
        ("Runs", _mapping_table(runs)),
    ]
    return write_text_atomic(_page(title, overview, sections), Path(path))


def _page(title: str, overview: str, sections: Sequence[tuple[str, str]]) -> str:
    """The whole HTML page: title, overview, a table of contents and one <section> per (heading, body)."""
    anchors = [_anchor(heading, index) for index, (heading, _) in enumerate(sections)]
    navigation = "<nav><ul>" + "".join(
        f'<li><a href="#{anchor}">{_e(heading)}</a></li>' for anchor, (heading, _) in zip(anchors, sections)
    ) + "</ul></nav>"
    body = "".join(
        f'<section id="{anchor}"><h2>{_e(heading)}</h2>{content}</section>'
        for anchor, (heading, content) in zip(anchors, sections)
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1>{overview}{navigation}{body}</body></html>\n"
    )


_HD95_TEXT = {
    "max_directed": "The larger of the two directed 95th percentiles (true outline to predicted, predicted to true) "
                    "of the distances between the two outlines, as MONAI and DeepMind's surface-distance compute it: "
                    "the worst boundary error once the 5% most extreme points of each direction are ignored.",
    "pooled": "The 95th percentile of all distances between the two outlines, both directions pooled (medpy): the "
              "worst boundary error once the 5% most extreme points are ignored.",
}


def _results_section(summary: Mapping[str, Any], distance: str, tolerance: Optional[float],
                     hd95: str = "max_directed") -> str:
    rows = []
    count_rows = []
    for class_name, stats in summary.get("classes", {}).items():
        cases = stats.get("cases", {})
        all_images = sum(cases.values())
        with_distances = cases.get("both_present", 0) + cases.get("both_empty", 0)
        for metric, label in _METRIC_TITLES.items():
            digits = 2 if metric in _DISTANCE_METRICS else 3
            unit = f" ({distance})" if metric in _DISTANCE_METRICS else ""
            mean, std = stats.get(f"{metric}_mean"), stats.get(f"{metric}_std")
            interval = stats.get(f"{metric}_mean_ci95")
            rows.append([
                class_name,
                label + unit,
                _number(mean, digits) + ("" if std is None else f" ± {_number(std, digits)}"),
                _number(stats.get(f"{metric}_median"), digits),
                _range(stats.get(f"{metric}_p2.5"), stats.get(f"{metric}_p97.5"), digits),
                _range(*interval, digits) if interval else "—",
                str(with_distances if metric in _DISTANCE_METRICS else all_images),
            ])
        count_rows.append([class_name, *(str(cases.get(case, 0)) for case in _CASE_TITLES)])
    headers = ["Class", "Measure", "Mean ± SD", "Median", "Middle 95% of images (2.5th–97.5th percentile)",
               "95% CI of the mean (bootstrap)", "Images included"]
    tolerance_text = f"{_number(tolerance)} {distance}" if tolerance is not None else "the configured tolerance"
    definitions = f"""
<dl>
<dt>Dice</dt><dd>Overlap: 2 × shared area / (true area + predicted area). 1 = perfect, 0 = no overlap.</dd>
<dt>IoU (Jaccard)</dt><dd>Shared area / combined area; always ≤ Dice.</dd>
<dt>Hausdorff distance ({_e(distance)})</dt><dd>The largest distance between the true and the predicted
outline: the single worst boundary error.</dd>
<dt>HD95 ({_e(distance)})</dt><dd>{_HD95_TEXT[hd95]}</dd>
<dt>ASSD ({_e(distance)})</dt><dd>Average symmetric surface distance: the mean distance between the two
outlines.</dd>
<dt>NSD</dt><dd>Normalised surface Dice: the fraction of both outlines lying within {_e(tolerance_text)} of the
other outline. 1 = every boundary point within tolerance.</dd>
</dl>
<p class="note">Empty masks: when a structure is absent and nothing is predicted, Dice, IoU and NSD are 1 and
distances 0. When only one of the two is empty, Dice, IoU and NSD are 0 and the distances are undefined; such
images are left out of the distance statistics and counted in the table above ("Images included" says how
many images each statistic covers).</p>"""
    return (
        _rows_table(headers, rows)
        + "<h3>Images by presence of the structure</h3>"
        + _rows_table(["Class", *_CASE_TITLES.values()], count_rows)
        + "<h3>Definitions</h3>"
        + definitions
    )


def _per_image_section(table: pd.DataFrame, distance: str, area: str) -> str:
    labels = {
        "image_id": "Image", "class": "Class", "dice": "Dice", "iou": "IoU",
        "hd": f"HD ({distance})", "hd95": f"HD95 ({distance})", "assd": f"ASSD ({distance})", "nsd": "NSD",
        "case": "Case", "area_true": f"True area ({area})", "area_pred": f"Predicted area ({area})",
        "volume_true": f"True volume ({area})", "volume_pred": f"Predicted volume ({area})",
        "mean_intensity_true": "Mean intensity in true mask (HU for CT)",
        "mean_intensity_pred": "Mean intensity in predicted mask (HU for CT)",
    }
    digits = {"dice": 3, "iou": 3, "nsd": 3, "hd": 2, "hd95": 2, "assd": 2, "area_true": 2, "area_pred": 2,
              "volume_true": 2, "volume_pred": 2, "mean_intensity_true": 1, "mean_intensity_pred": 1}
    frame = table.assign(case=table["case"].str.replace("_", " ")).rename(columns=labels)
    formats = {labels.get(column, column): places for column, places in digits.items()}
    return (
        f"<p>One row per image and class ({len(table)} rows). “—” marks a value that is undefined "
        "(a distance with one mask empty, or a mean intensity inside an empty mask).</p>"
        + _scroll(_table_html(frame, formats))
    )


def _figures_html(heading: str, entries: Iterable[FigureEntry]) -> str:
    parts = []
    for entry in entries:
        if isinstance(entry, tuple):
            figure_path, caption = Path(entry[0]), str(entry[1])
        else:
            figure_path = Path(entry)
            caption = f"{heading}: {figure_path.stem.replace('_', ' ')}"
        data = figure_path.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            raise ValueError(f"{figure_path}: not a PNG file")
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{encoded}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    return "".join(parts) if parts else "<p>No figures.</p>"


def _mapping_table(mapping: Mapping[str, Any]) -> str:
    rows = []
    for key, value in mapping.items():
        if isinstance(value, (Mapping, list, tuple)):
            text = f"<code>{_e(json.dumps(value, default=str))}</code>"
        else:
            text = _e(value)
        rows.append(f'<tr><th>{_e(key)}</th><td class="text">{text}</td></tr>')
    return "<table><tbody>" + "".join(rows) + "</tbody></table>"


def _table_html(frame: pd.DataFrame, digits: Optional[Mapping[str, int]] = None) -> str:
    """A DataFrame as an escaped HTML table; numbers right-aligned, NaN shown as an em dash."""
    digits = digits or {}
    head = "".join(f"<th>{_e(column)}</th>" for column in frame.columns)
    body = []
    for values in frame.itertuples(index=False, name=None):
        cells = []
        for column, value in zip(frame.columns, values):
            numeric = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            text = _number(value, digits.get(column)) if numeric else _e(value)
            cells.append(f"<td>{text}</td>" if numeric else f'<td class="text">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        body.append(f'<tr><td class="text" colspan="{max(1, len(frame.columns))}">No rows.</td></tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _rows_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table from already-formatted cells (headers and the first column are escaped here)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _scroll(content: str) -> str:
    return f'<div class="scroll">{content}</div>'


def _number(value: Any, digits: Optional[int] = None) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "—"
    return f"{value:.{digits}f}" if digits is not None else f"{value:.4g}"


def _range(low: Any, high: Any, digits: int) -> str:
    if low is None or high is None:
        return "—"
    return f"{_number(low, digits)} to {_number(high, digits)}"


def _find_key(mapping: Any, key: str) -> Any:
    """The first value stored under ``key`` anywhere in a nested mapping, or None."""
    if isinstance(mapping, Mapping):
        if key in mapping:
            return mapping[key]
        for value in mapping.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _anchor(heading: str, index: int) -> str:
    return f"s{index}-" + (re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "section")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
