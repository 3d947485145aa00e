"""Make the README's figures from the demo run: ``python -m segmenter.readme_figures`` after ``make demo``.

Writes into ``readme_figures/``:

- ``comparison.png``: the demo's median muscle case (image, true and predicted mask, overlay), copied
  from ``experiments/demo_l3_ct/evaluate/figures/compare_muscle_median.png``;
- ``report.png``: the top of ``experiments/demo_l3_ct/evaluate/report.html`` as headless Chromium shows it
  (1200 x 1600 CSS pixels), after checking in the same browser that every figure of the report loads and
  no table is empty.

Exit status 1 with one line when the demo run is missing, the report does not display, or Chromium is
not installed.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from segmenter import layout
from segmenter.artifacts import atomic_file
from segmenter.errors import InputError
from segmenter.evaluation import browser

DEMO_EVALUATE_DIR = Path("experiments/demo_l3_ct/evaluate")
COMPARISON_FIGURE = Path(layout.FIGURES) / "compare_muscle_median.png"
WINDOW_SIZE = (1200, 1600)


def make_readme_figures(evaluate_dir: Path = DEMO_EVALUATE_DIR, out_dir: Path = Path("readme_figures"),
                        *, window_size: tuple[int, int] = WINDOW_SIZE) -> list[Path]:
    """Copy the median comparison figure and screenshot the report of ``evaluate_dir`` into ``out_dir``.

    Returns
    -------
    paths : list of Path
        ``[out_dir / "comparison.png", out_dir / "report.png"]``.

    Raises
    ------
    InputError
        If the evaluate folder, its median figure or its report is missing, or the report does not
        display completely in Chromium.
    browser.BrowserError
        If Chromium is missing or fails.
    """
    evaluate_dir, out_dir = Path(evaluate_dir), Path(out_dir)
    figure, report = evaluate_dir / COMPARISON_FIGURE, evaluate_dir / layout.REPORT
    for required in (figure, report):
        if not required.is_file():
            raise InputError(required, "missing; run `make demo` first")
    check = browser.check_report(report)
    if not check.ok:
        raise InputError(report, f"does not display completely in Chromium ({check}; broken images: "
                                 f"{check.broken_images}, empty tables: {check.empty_tables})")
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = out_dir / "comparison.png"
    with atomic_file(comparison) as tmp:
        shutil.copyfile(figure, tmp)
    screenshot = browser.screenshot(report, out_dir / "report.png", window_size=window_size)
    return [comparison, screenshot]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segmenter.readme_figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluate-dir", type=Path, default=DEMO_EVALUATE_DIR,
                        help=f"the demo run's evaluate folder (default: {DEMO_EVALUATE_DIR})")
    parser.add_argument("--out", type=Path, default=Path("readme_figures"), help="default: readme_figures")
    args = parser.parse_args(argv)
    try:
        paths = make_readme_figures(args.evaluate_dir, args.out)
    except (InputError, browser.BrowserError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
