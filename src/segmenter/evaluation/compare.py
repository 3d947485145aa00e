"""Compare two or more evaluation runs on the images they share.

``segmenter evaluate --compare RUN_DIR RUN_DIR ... [--out DIR]``. A run is any folder holding
``metrics.csv`` and ``summary.json``: an experiment's ``evaluate/`` folder or the ``--out`` folder of
``segmenter evaluate --truth ... --pred ...``. The comparison writes

- ``comparison.csv``: the per-class mean of every metric, one column per run (from each ``summary.json``);
- ``paired_tests.csv``: per class and pair of runs, a paired test of per-image Dice;
- ``comparison.json``: both tables, the runs and the method, for scripts;
- ``figures/paired_dice_<class>.png``: per-image Dice, a line joining each image across the runs;
- ``report.html``: all of it on one self-contained page.

The paired test
---------------
Images are matched by ``image_id`` and ``class``; an image missing from either run of a pair is left out
of that pair (and counted). For runs A and B the differences are ``dice_B - dice_A``, summarised by their
median and tested with the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences
dropped, exact distribution for small samples without ties). The test is chosen over a paired t-test
because per-image Dice is bounded and usually skewed. With more than two runs every pair is tested and
``p_value_holm`` gives the Holm-adjusted p-values over the pairs of each class.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from segmenter import layout
from segmenter.artifacts import atomic_directory, read_json, write_json_atomic, write_text_atomic
from segmenter.errors import InputError
from segmenter.evaluation import figures
from segmenter.evaluation.folders import check_output_folder
from segmenter.evaluation.report import write_comparison_report
from segmenter.evaluation.surface import DISTANCE_METRICS, METRIC_NAMES

METRIC_LABELS = {"dice": "Dice", "iou": "IoU", "hd": "Hausdorff distance", "hd95": "HD95", "assd": "ASSD",
                 "nsd": "NSD"}
METHOD = ("Paired two-sided Wilcoxon signed-rank test of per-image {metric} (scipy.stats.wilcoxon; images "
          "matched by image id and class; zero differences dropped). Difference = second run − first run; "
          "p_value_holm is Holm-adjusted over the pairs of runs within a class.")


@dataclasses.dataclass
class Run:
    """One evaluation run read from disk."""

    name: str
    folder: Path
    table: pd.DataFrame
    summary: dict


@dataclasses.dataclass
class Comparison:
    """The result of :func:`compare_runs`; ``str()`` is what the command prints."""

    output_dir: Path
    means: pd.DataFrame
    tests: pd.DataFrame
    metric: str = "dice"

    def __str__(self) -> str:
        lines = [f"Compared {self.means.columns.size - 2} runs ({self.output_dir}):"]
        for row in self.tests.to_dict(orient="records"):
            p_value = "n/a" if math.isnan(row["p_value"]) else f"{row['p_value']:.3g}"
            median = "n/a" if math.isnan(row["median_difference"]) else f"{row['median_difference']:+.3f}"
            lines.append(f"  {row['class']}: {row['second']} − {row['first']}: median {self.metric} difference "
                         f"{median} (n={row['n']}), Wilcoxon p = {p_value}")
        lines.append(str(self.output_dir / layout.REPORT))
        return "\n".join(lines)


def load_run(folder: Path, name: Optional[str] = None) -> Run:
    """Read ``metrics.csv`` and ``summary.json`` of an evaluation output folder.

    Raises
    ------
    InputError
        If a file is missing or ``metrics.csv`` lacks the image_id, class or dice column.
    """
    folder = Path(folder)
    for required in (layout.METRICS, layout.SUMMARY):
        if not (folder / required).is_file():
            raise InputError(folder, f"no {required}: not an evaluation output (expected an experiment's "
                                     "evaluate/ folder or the --out folder of segmenter evaluate --truth/--pred)")
    table = pd.read_csv(folder / layout.METRICS, dtype={"image_id": str, "class": str})
    missing = [column for column in ("image_id", "class", "dice") if column not in table.columns]
    if missing:
        raise InputError(folder / layout.METRICS, f"missing column(s) {', '.join(missing)}")
    return Run(name or run_names([folder])[0], folder, table, read_json(folder / layout.SUMMARY))


def run_names(folders: Sequence[Path]) -> list[str]:
    """Short distinct names for run folders.

    An experiment's ``evaluate/`` folder is named after its experiment, any other folder after itself;
    names that would clash take on parent folders until they differ, and a number as a last resort.

    >>> run_names([Path("experiments/unet/evaluate"), Path("out/nnunet")])
    ['unet', 'nnunet']
    >>> run_names([Path("a/x"), Path("b/x")])
    ['a/x', 'b/x']
    """
    parts = []
    for folder in folders:
        folder_parts = list(Path(folder).resolve().parts[1:])  # without the root
        if len(folder_parts) > 1 and folder_parts[-1] == "evaluate":
            folder_parts = folder_parts[:-1]
        parts.append(folder_parts or [str(folder)])
    depth = 1
    while True:
        names = ["/".join(folder_parts[-depth:]) for folder_parts in parts]
        if len(set(names)) == len(names):
            return names
        if depth >= max(len(folder_parts) for folder_parts in parts):
            return [f"{name} ({index + 1})" for index, name in enumerate(names)]
        depth += 1


def means_table(runs: Sequence[Run]) -> pd.DataFrame:
    """The per-class mean of every metric from each run's summary: columns class, metric, one per run."""
    class_order = list(dict.fromkeys(name for run in runs for name in run.summary.get("classes", {})))
    rows = []
    for class_name in class_order:
        for metric in METRIC_NAMES:
            row = {"class": class_name, "metric": metric}
            for run in runs:
                value = run.summary.get("classes", {}).get(class_name, {}).get(f"{metric}_mean")
                row[run.name] = np.nan if value is None else float(value)
            rows.append(row)
    return pd.DataFrame(rows, columns=["class", "metric", *(run.name for run in runs)])


def paired_values(runs: Sequence[Run], class_name: str, metric: str = "dice") -> pd.DataFrame:
    """Per-image ``metric`` of one class: one row per image id (in any run), one column per run."""
    columns = []
    for run in runs:
        rows = run.table[run.table["class"] == class_name]
        if rows["image_id"].duplicated().any():
            duplicate = rows.loc[rows["image_id"].duplicated(), "image_id"].iloc[0]
            raise InputError(run.folder / layout.METRICS, f"image {duplicate!r} appears twice for class {class_name!r}")
        columns.append(rows.set_index("image_id")[metric].astype(float).rename(run.name))
    return pd.concat(columns, axis=1, join="outer")


def paired_tests(runs: Sequence[Run], metric: str = "dice") -> pd.DataFrame:
    """Wilcoxon signed-rank test of ``metric`` for every class and pair of runs (see the module docstring).

    Returns
    -------
    tests : pandas.DataFrame
        Columns ``class, first, second, n, left_out, mean_first, mean_second, median_difference,
        second_better, first_better, ties, statistic, p_value, p_value_holm``; ``n`` counts the images
        both runs scored, ``left_out`` those only one of them did. NaN p-value when n is 0.
    """
    class_order = list(dict.fromkeys(name for run in runs for name in run.table["class"]))
    rows = []
    for class_name in class_order:
        values = paired_values(runs, class_name, metric)
        class_rows = []
        for first, second in itertools.combinations(runs, 2):
            pair = values[[first.name, second.name]]
            both = pair.dropna()
            difference = (both[second.name] - both[first.name]).to_numpy()
            statistic, p_value = _wilcoxon(difference)
            class_rows.append({
                "class": class_name, "first": first.name, "second": second.name, "n": int(len(both)),
                "left_out": int(pair.notna().any(axis=1).sum() - len(both)),
                "mean_first": float(both[first.name].mean()) if len(both) else np.nan,
                "mean_second": float(both[second.name].mean()) if len(both) else np.nan,
                "median_difference": float(np.median(difference)) if difference.size else np.nan,
                "second_better": int((difference > 0).sum()), "first_better": int((difference < 0).sum()),
                "ties": int((difference == 0).sum()), "statistic": statistic, "p_value": p_value,
            })
        for row, adjusted in zip(class_rows, _holm([row["p_value"] for row in class_rows])):
            row["p_value_holm"] = adjusted
        rows.extend(class_rows)
    return pd.DataFrame(rows)


def compare_runs(folders: Sequence[Path], out_dir: Path, *, metric: str = "dice") -> Comparison:
    """Compare evaluation runs and write the tables, figures and report into ``out_dir``.

    Parameters
    ----------
    folders : sequence of Path
        Two or more evaluation output folders (each with ``metrics.csv`` and ``summary.json``).
    out_dir : Path
        Output folder, replaced whole when everything succeeded; it may not be or hold a run folder.
    metric : str
        The per-image metric plotted and tested; Dice by default.

    Raises
    ------
    InputError
        For fewer than two runs, a folder that is not an evaluation output, or runs sharing no image.
    """
    folders = [Path(folder) for folder in folders]
    if len(folders) < 2:
        raise InputError(None, "comparing needs two or more run folders")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, folders)
    runs = [load_run(folder, name) for folder, name in zip(folders, run_names(folders))]
    means = means_table(runs)
    tests = paired_tests(runs, metric)
    if tests.empty or tests["n"].max() == 0:
        raise InputError(None, f"the runs share no image: no (image_id, class) of {runs[0].folder} is in "
                               f"{runs[1].folder}")
    units = {run.name: run.summary.get("distance_unit", "pixels") for run in runs}
    notes = []
    if len(set(units.values())) > 1:
        notes.append("The runs measure distances in different units ("
                     + ", ".join(f"{name}: {unit}" for name, unit in units.items())
                     + "); their HD, HD95 and ASSD means are not comparable.")
    if tests["left_out"].any():
        notes.append(f"{int(tests['left_out'].max())} image(s) are not in every run and are left out of the "
                     "pairs that lack them (column left_out).")
    label = METRIC_LABELS.get(metric, metric)
    method = METHOD.format(metric=label)
    document = {
        "runs": [{"name": run.name, "folder": str(run.folder.resolve()), "n_images": run.summary.get("n_images"),
                  "distance_unit": units[run.name]} for run in runs],
        "metric": metric,
        "method": method,
        "means": _records(means),
        "tests": _records(tests),
        "notes": notes,
    }
    with atomic_directory(out_dir) as tmp_dir:
        write_text_atomic(means.to_csv(index=False), tmp_dir / layout.COMPARISON_MEANS)
        write_text_atomic(tests.to_csv(index=False), tmp_dir / layout.PAIRED_TESTS)
        write_json_atomic(document, tmp_dir / layout.COMPARISON)
        paired_figures = []
        for class_name in dict.fromkeys(tests["class"]):
            values = paired_values(runs, class_name, metric).dropna(how="all")
            path = figures.paired_metric_figure(
                values, metric, tmp_dir / layout.FIGURES / f"paired_{metric}_{_file_safe(class_name)}.png",
                title=f"{class_name}: per-image {label}")
            paired_figures.append((path, f"{class_name}: per-image {label} in each run; a line joins the same "
                                         "image, the diamonds mark each run's median"))
        write_comparison_report(
            tmp_dir / layout.REPORT, title="Comparison: " + " vs ".join(run.name for run in runs),
            runs={run.name: f"{run.folder.resolve()} ({run.summary.get('n_images')} images, distances in "
                            f"{units[run.name]})" for run in runs},
            means=_display_means(means, runs, units), tests=_display_tests(tests),
            figures={f"Per-image {label}": paired_figures}, notes=notes, method=method)
    return Comparison(out_dir, means, tests, metric)


def _wilcoxon(difference: np.ndarray) -> tuple[float, float]:
    """(statistic, two-sided p) of the signed-rank test; p = 1 when every difference is zero, NaN for none."""
    if difference.size == 0:
        return np.nan, np.nan
    if not np.any(difference != 0):
        return 0.0, 1.0
    with warnings.catch_warnings():
        # Few non-zero differences make scipy warn that the normal approximation is rough; the p-value
        # it returns is still the right one to report, with n beside it.
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=RuntimeWarning)
        result = stats.wilcoxon(difference, zero_method="wilcox", alternative="two-sided")
    return float(result.statistic), float(result.pvalue)


def _holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN and does not count)."""
    p = np.asarray(p_values, dtype=float)
    defined = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(p.shape, np.nan)
    order = defined[np.argsort(p[defined], kind="mergesort")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def _display_means(means: pd.DataFrame, runs: Sequence[Run], units: dict) -> pd.DataFrame:
    """Means with readable measure names, units, and each run's ± SD from its summary."""
    names = METRIC_LABELS
    unit_values = sorted(set(units.values()))
    distance = unit_values[0] if len(unit_values) == 1 else "units differ"
    rows = []
    for class_name, metric in zip(means["class"], means["metric"]):
        label = names.get(metric, metric) + (f" ({distance})" if metric in DISTANCE_METRICS else "")
        cells = {"Class": class_name, "Measure": label}
        digits = 2 if metric in DISTANCE_METRICS else 3
        for run in runs:
            class_stats = run.summary.get("classes", {}).get(class_name, {})
            mean, std = class_stats.get(f"{metric}_mean"), class_stats.get(f"{metric}_std")
            spread = "" if std is None else f" ± {std:.{digits}f}"
            cells[run.name] = "—" if mean is None else f"{mean:.{digits}f}{spread}"
        rows.append(cells)
    return pd.DataFrame(rows)


def _display_tests(tests: pd.DataFrame) -> pd.DataFrame:
    """The tests with readable headings and numbers formatted for reading (3 decimals, signed differences)."""
    tests = tests.assign(
        mean_first=[_number(value, "{:.3f}") for value in tests["mean_first"]],
        mean_second=[_number(value, "{:.3f}") for value in tests["mean_second"]],
        median_difference=[_number(value, "{:+.3f}") for value in tests["median_difference"]],
        statistic=[_number(value, "{:g}") for value in tests["statistic"]],
    )
    frame = tests.rename(columns={
        "class": "Class", "first": "First run", "second": "Second run", "n": "Images paired",
        "left_out": "Unpaired images", "mean_first": "Mean, first", "mean_second": "Mean, second",
        "median_difference": "Median difference (second − first)", "second_better": "Second better",
        "first_better": "First better", "ties": "Ties", "statistic": "Wilcoxon W", "p_value": "p-value",
        "p_value_holm": "p-value (Holm)"})
    return frame.astype({column: object for column in ("p-value", "p-value (Holm)")}).assign(**{
        column: [_p_text(value) for value in frame[column]] for column in ("p-value", "p-value (Holm)")})


def _number(value: float, pattern: str) -> str:
    return "—" if value is None or math.isnan(value) else pattern.format(value)


def _p_text(value: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-safe dicts: NaN becomes None."""
    return [{key: (None if isinstance(value, float) and math.isnan(value) else
                   value.item() if isinstance(value, np.generic) else value)
             for key, value in row.items()} for row in frame.to_dict(orient="records")]


def _file_safe(name: str) -> str:
    return "".join(character if character.isalnum() or character in "-_" else "_" for character in name)
