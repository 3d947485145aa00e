"""Bad input through the preload command line: one line naming the file and the problem, exit status 1.

Each case breaks one pair (or the folder) of a small PNG/NPY dataset that was preloaded once before; the
earlier preloaded dataset must survive whole, with no temporary folder left beside it. With
--skip-invalid the broken pairs are skipped, listed in the manifest and in a printed summary, exit 0.
(test_preload.py covers an unreadable PNG, differing shapes, labels outside the classes, no matched pairs.)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segmenter.config import build_config
from segmenter.preload import preload
from tests.conftest import run_cli, write_config
from tests.test_io import write_dicom_slice
from tests.test_preload import make_png_npy_set

SIZE = 32  # rows and columns of the generated slices


def grey_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(SIZE, SIZE)).astype(np.float64)


def csv_text(array: np.ndarray) -> str:
    return "".join(",".join(f"{value:g}" for value in row) + "\n" for row in array)


def replace_image(data: Path, case: str, name: str) -> Path:
    """Remove images/<case>.png and return the path of its replacement images/<name>."""
    (data / "images" / f"{case}.png").unlink()
    return data / "images" / name


# ---------------------------------------------------------------------------------------------------
# The cases: each breaks the dataset and returns (text naming the file, text naming the problem)
# ---------------------------------------------------------------------------------------------------
def _truncated_file(data):
    path = data / "masks" / "3.npy"
    path.write_bytes(path.read_bytes()[:200])
    return "3.npy", "cannot read NPY file"


def _non_numeric_csv_cell(data):
    lines = csv_text(grey_image()).splitlines(keepends=True)
    cells = lines[4].split(",")
    cells[6] = "n/a"
    lines[4] = ",".join(cells)
    replace_image(data, "3", "3.csv").write_text("".join(lines))
    return "3.csv", "line 5, column 7: 'n/a' is not a number"


def _ragged_csv_rows(data):
    lines = csv_text(grey_image()).splitlines(keepends=True)
    lines[3] = ",".join(lines[3].split(",")[:-1]) + "\n"
    replace_image(data, "3", "3.csv").write_text("".join(lines))
    return "3.csv", f"line 4 has {SIZE - 1} values, expected {SIZE}"


def _nan_pixel(data):
    image = grey_image()
    image[5, 5] = np.nan
    np.save(replace_image(data, "3", "3.npy"), image)
    return "3.npy", "NaN or infinite"


def _infinite_pixel(data):
    image = grey_image()
    image[7, 2] = np.inf
    replace_image(data, "3", "3.csv").write_text(csv_text(image))
    return "3.csv", "NaN or infinite"


def _non_integer_mask(data):
    mask = np.load(data / "masks" / "3.npy").astype(np.float64)
    mask[0, 0] = 0.5
    np.save(data / "masks" / "3.npy", mask)
    return "3.npy", "non-integer values"


def _duplicate_ids(data):
    np.save(data / "images" / "3.npy", grey_image())
    return "3.png and 3.npy", "share the case id '3'"


def _empty_folder(data):
    for path in (data / "images").iterdir():
        path.unlink()
    return "images", "no image files found"


def _dicom_without_pixel_data(data):
    write_dicom_slice(replace_image(data, "3", "3.dcm"), np.zeros((SIZE, SIZE), np.uint16), (0, 0, 0),
                      with_pixels=False)
    return "3.dcm", "no pixel data"


def _dicom_series_of_different_sizes(data):
    folder = replace_image(data, "3", "3")
    folder.mkdir()
    write_dicom_slice(folder / "a.dcm", np.full((SIZE, SIZE), 1000, np.uint16), (0, 0, 0))
    write_dicom_slice(folder / "b.dcm", np.full((SIZE // 2, SIZE), 1000, np.uint16), (0, 0, 1))
    return "images/3", f"inconsistent slice sizes: a.dcm is {SIZE}x{SIZE} but b.dcm is {SIZE // 2}x{SIZE}"


BAD_INPUTS = {
    "truncated file": _truncated_file,
    "non-numeric CSV cell": _non_numeric_csv_cell,
    "ragged CSV rows": _ragged_csv_rows,
    "NaN pixel": _nan_pixel,
    "infinite pixel": _infinite_pixel,
    "mask with non-integer values": _non_integer_mask,
    "duplicate ids": _duplicate_ids,
    "empty folder": _empty_folder,
    "DICOM without pixel data": _dicom_without_pixel_data,
    "DICOM series of different slice sizes": _dicom_series_of_different_sizes,
}


def raw_config(data: Path, work: Path) -> dict:
    return {"experiment": "t", "classes": ["background", "a", "b"],
            "paths": {"preloaded_root": str(work / "pre"), "experiments_root": str(work / "exp")},
            # ct_window takes any intensity scale: PNG grey levels, CSV numbers and DICOM HU alike.
            "preload": {"input_dir": str(data), "image_size": [16, 16], "workers": 1,
                        "normalization": {"method": "ct_window", "window": [0.0, 255.0]}}}


@pytest.fixture
def preloaded_once(tmp_path):
    """(data folder, config file): a good dataset, preloaded once into tmp_path/pre/t."""
    data = make_png_npy_set(tmp_path / "data", count=10, size=SIZE)
    raw = raw_config(data, tmp_path)
    preload(build_config(raw), log=lambda *_: None)
    return data, write_config(tmp_path, raw)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_with_one_line_naming_file_and_problem(tmp_path, preloaded_once, case):
    data, config_path = preloaded_once
    output = tmp_path / "pre" / "t"
    before = _tree_bytes(output)

    named, problem = BAD_INPUTS[case](data)
    result = run_cli("preload", "--config", str(config_path), "--overwrite")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in named.split(" and "):
        assert name in lines[0], lines[0]
    assert problem in lines[0], lines[0]
    # The earlier dataset survives byte for byte, and no temporary folder is left beside it.
    assert _tree_bytes(output) == before
    assert [path.name for path in (tmp_path / "pre").iterdir()] == ["t"]


SKIPPABLE = ["truncated file", "non-numeric CSV cell", "NaN pixel", "mask with non-integer values",
             "DICOM without pixel data", "DICOM series of different slice sizes"]


def test_skip_invalid_skips_the_bad_pairs_lists_them_and_succeeds(tmp_path):
    data = make_png_npy_set(tmp_path / "data", count=10, size=SIZE)
    # Each case breaks pair "3": give every case a pair of its own by renaming its files afterwards.
    expected = {}
    for number, case in enumerate(SKIPPABLE):
        case_id = f"bad{number}"
        scratch = tmp_path / f"scratch{number}"
        make_png_npy_set(scratch, count=4, size=SIZE)
        named, problem = BAD_INPUTS[case](scratch)
        for kind in ("images", "masks"):
            for path in (scratch / kind).iterdir():
                if path.name.split(".")[0] == "3":
                    shutil.move(path, data / kind / path.name.replace("3", case_id, 1))
        expected[case_id] = problem
    config_path = write_config(tmp_path, raw_config(data, tmp_path))

    result = run_cli("preload", "--config", str(config_path), "--skip-invalid")
    assert result.returncode == 0, result.stderr
    assert f"Skipped {len(SKIPPABLE)} invalid cases" in result.stdout
    assert f"{len(SKIPPABLE)} skipped" in result.stdout.strip().splitlines()[-1]
    manifest = json.loads((tmp_path / "pre" / "t" / "manifest.json").read_text())
    assert [entry["case_id"] for entry in manifest["skipped"]] == sorted(expected)
    for entry in manifest["skipped"]:
        assert expected[entry["case_id"]] in entry["error"] and entry["case_id"] in entry["error"]
        assert entry["error"] in result.stdout
    kept = len(manifest["train"]["cases"]) + len(manifest["test"]["cases"])
    assert kept == 10


# Integer CSV files are parsed by np.fromstring (segmenter.io.tabular), which is lenient; whatever it
# cannot vouch for must go on to np.loadtxt and the reading cell by cell, and read as it did before.
CSV_FILES = [
    ("10,-20\n30,40\n", "int64", [[10, -20], [30, 40]]),
    ("10,-20\n30,40", "int64", [[10, -20], [30, 40]]),
    ("10;-20\n30;40\n", "int64", [[10, -20], [30, 40]]),
    ("1,2\n3,4\n", "uint8", [[1, 2], [3, 4]]),
    ("-0,10\n", "int64", [[0, 10]]),
    (" 10,20\n30,40\n", "int64", [[10, 20], [30, 40]]),
    ("+10,20\n", "int64", [[10, 20]]),
    ("10,20\r\n30,40\r\n", "int64", [[10, 20], [30, 40]]),
    ("10,20\n\n30,40\n", "int64", [[10, 20], [30, 40]]),
    ("10\t20\n30\t40\n", "int64", [[10, 20], [30, 40]]),
    ("10,9223372036854775806,20\n", "int64", [[10, 9223372036854775806, 20]]),  # the line-end mark's value
    ("9223372036854775808,10\n", "float64", [[9223372036854775808.0, 10.0]]),  # beyond int64
    ("10,-,20\n", "error", "CSV file has a header row but no data rows"),
    ("10,20,\n30,40,\n", "error", "line 2, column 3: '' is not a number"),
    ("10,,20\n", "error", "CSV file has a header row but no data rows"),
    ("10,20-30\n", "error", "CSV file has a header row but no data rows"),
    ("10,20\n30\n40,50,60\n", "error", "line 2 has 1 values, expected 2 like line 1 (comma-separated)"),
    ("10,20\n-\n", "error", "line 2 has 1 values, expected 2 like line 1 (comma-separated)"),
]


@pytest.mark.parametrize("text, dtype, expected", CSV_FILES, ids=[repr(text) for text, *_ in CSV_FILES])
def test_integer_csv_files_read_as_np_loadtxt_reads_them(tmp_path, text, dtype, expected):
    from segmenter.errors import InputError
    from segmenter.io.tabular import read_csv

    path = tmp_path / "slice.csv"
    path.write_bytes(text.encode())
    if dtype == "error":
        with pytest.raises(InputError) as error:
            read_csv(path)
        assert str(error.value) == f"{path}: {expected}"
    else:
        array = read_csv(path).array
        assert array.dtype == np.dtype(dtype) and array.tolist() == expected


def _tree_bytes(folder):
    """Every file under ``folder`` (shards, manifest, test/...) by relative path, with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}
