"""CSV files: one 2D array, one row of the file per array row.

The delimiter (comma, semicolon or tab) is taken from the first non-blank line: the candidate that
occurs most often there; a line with none of them is a single column. A first row that is not all
numbers is a header and is skipped. Blank lines are ignored. Every other cell must be a number.
"""
from __future__ import annotations

import csv
import io
import warnings
from collections import deque
from pathlib import Path

import numpy as np

from segmenter.errors import InputError
from segmenter.io.image import LoadedImage

DELIMITERS = (",", ";", "\t")
_DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab"}


def sniff_delimiter(line: str) -> str:
    """The delimiter among comma, semicolon and tab occurring most often in ``line`` (comma if none)."""
    counts = {delimiter: line.count(delimiter) for delimiter in DELIMITERS}
    best = max(DELIMITERS, key=lambda delimiter: counts[delimiter])
    return best if counts[best] > 0 else ","


def _all_numbers(cells: list[str]) -> bool:
    try:
        deque(map(float, cells), maxlen=0)  # float() driven from C: several times faster than a Python loop
    except ValueError:
        return False
    return True


def _parse_one_digit_cells(raw: bytes, delimiter: str):
    """The values (uint8) of a CSV file whose cells are all one digit ("0,1,2\\n"), or None if it is not such a file.

    Label maps are written this way, and np.loadtxt spends about 4 ms on a 512 x 512 one; reading each
    cell and the separator after it as one 16-bit number checks and converts it in about 0.2 ms. No header,
    no blank lines, "\\n" line ends; anything else (a header, "\\r\\n", spaces, two-digit labels) returns None
    and goes to np.loadtxt.
    """
    if raw and not raw.endswith(b"\n"):
        raw += b"\n"
    first_line_end = raw.find(b"\n") + 1
    if first_line_end < 2 or first_line_end % 2 or len(raw) % 2:
        return None
    width = first_line_end // 2
    cells = np.frombuffer(raw, dtype="<u2")  # low byte the digit, high byte the separator after it
    if len(cells) % width:
        return None  # ragged rows: np.loadtxt and then the slow path name the line
    cells = cells.reshape(-1, width)
    # Subtracting (separator, "0") leaves 0..9 exactly for a digit followed by the right separator; any
    # other pair wraps round (uint16) to a larger value.
    if not ((cells[:, :-1] - np.uint16(ord(delimiter) << 8 | ord("0")) <= 9).all()
            and (cells[:, -1] - np.uint16(ord("\n") << 8 | ord("0")) <= 9).all()):
        return None
    digits = cells.astype(np.uint8)  # the cast keeps the low byte, the digit's character
    digits -= ord("0")
    return digits


# Written in place of each line end for np.fromstring (see _parse_integer_cells): a value no CT slice holds.
_LINE_END_MARK = np.iinfo(np.int64).max - 1
# Characters np.fromstring skips or accepts where np.loadtxt's integer parse would not (whitespace, "+").
_SKIPPED_BY_FROMSTRING = (b" ", b"\r", b"\t", b"\x0b", b"\x0c", b"+")


def _parse_integer_cells(raw: bytes, delimiter: str):
    """The values (int64) of a CSV file of integers in equal rows ("-1000,40\\n"), or None if it is not such a file.

    CT slices in Hounsfield units are written this way. np.loadtxt's C parser splits every row into fields
    (quotes, comments, decoding) before it converts them; np.fromstring with a separator converts straight
    from the bytes. A 512 x 512 slice reads in 4.8 ms instead of 6.5 (medians in a preload worker; pandas'
    C parser and pyarrow's were slower than np.loadtxt in a one-off comparison). But fromstring does not
    see rows and is lenient: it skips whitespace and "+", reads a lone "-" as 0, ignores a separator at the
    very end, and clips a number beyond int64. So a mark value stands in for each line end, the rows are
    checked to hold equally many values, and a file where any of that could matter returns None and goes
    to np.loadtxt, as does anything else that is not plain integers. So do tab-separated files: a
    whitespace separator matches any run of whitespace in fromstring, empty cells included.
    """
    if delimiter == "\t":
        return None
    if not raw.endswith(b"\n"):
        raw += b"\n"
    if any(character in raw for character in _SKIPPED_BY_FROMSTRING):
        return None
    separator = delimiter.encode()
    text = raw.replace(b"\n", separator + str(_LINE_END_MARK).encode() + separator)
    try:
        with warnings.catch_warnings():
            # NumPy 1.x warns (2.x raises ValueError) when the text does not parse to its end.
            warnings.simplefilter("error", DeprecationWarning)
            values = np.fromstring(text, dtype=np.int64, sep=delimiter)
    except (ValueError, DeprecationWarning):
        return None  # an empty cell (a blank line too), "--1", "1-2", "1.5", a letter
    data = np.frombuffer(raw, dtype=np.uint8)
    rows = np.count_nonzero(data == ord("\n"))
    # As many marks as line ends (a cell holding the mark's value would add one), each closing a row.
    if np.count_nonzero(values == _LINE_END_MARK) != rows or values.size % rows or values.size == rows:
        return None
    table = values.reshape(rows, -1)
    if not (table[:, -1] == _LINE_END_MARK).all():
        return None  # rows of different lengths: np.loadtxt and then the slow path name the line
    table = np.ascontiguousarray(table[:, :-1])
    # Every "-" must have made a negative number: a lone "-" reads as 0 ("-0", which is 0, goes to
    # np.loadtxt too). A number beyond int64 reads as its limit, where np.loadtxt would parse floats.
    info = np.iinfo(np.int64)
    if np.count_nonzero(data == ord("-")) != np.count_nonzero(table < 0) \
            or table.max() == info.max or table.min() == info.min:
        return None
    return table


def _parse_plain_cells(raw: bytes):
    """The values of a CSV file of plain integer cells without a header, blank lines, quotes or "\\r" (uint8
    if every cell is one digit, else int64), or None if it is not such a file; :func:`_parse_with_numpy`
    parses the others."""
    first_line_end = raw.find(b"\n") + 1 or len(raw)
    try:
        first_line = raw[:first_line_end].decode("ascii")
    except UnicodeDecodeError:  # e.g. a byte order mark
        return None
    if not first_line.strip() or first_line[0] not in "-0123456789":
        return None  # a blank first line or a header
    delimiter = sniff_delimiter(first_line)
    # The first line tells cheaply whether the whole file is worth reading for the one-digit path, which
    # checks every byte itself.
    separators = delimiter * (len(first_line) // 2 - 1) + "\n"
    if first_line[0::2].isdigit() and first_line[1::2] == separators:
        one_digit = _parse_one_digit_cells(raw, delimiter)
        if one_digit is not None:
            return one_digit
    return _parse_integer_cells(raw, delimiter)


def _parse_with_numpy(path: Path):
    """Parse a well-formed numeric CSV file: plain integers directly (:func:`_parse_plain_cells`), anything
    else with np.loadtxt's C parser (4x faster than cell by cell).

    Returns None when the file is not plain numbers in equal rows; ``read_csv`` then parses it cell by
    cell to name the bad line and column. Reading the file in C, not through Python strings, halves the
    time of a 512 x 512 slice.
    """
    plain = _parse_plain_cells(Path(path).read_bytes())
    if plain is not None:
        return plain
    with open(path, encoding="utf-8-sig") as handle:
        for header_line_number, first_line in enumerate(handle, start=1):
            if first_line.strip():
                break
        else:
            return None
    delimiter = sniff_delimiter(first_line)
    cells = [cell.strip() for cell in next(csv.reader([first_line], delimiter=delimiter))]
    has_header = not _all_numbers(cells)
    # Integers (Hounsfield units, label maps) parse 1.5x faster as int64 than as float64. A file with a
    # decimal point, an exponent or a NaN fails that parse at its first such cell and is parsed as floats.
    for dtype in (np.int64, np.float64):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "input contained no data": handled below
                values = np.loadtxt(path, delimiter=delimiter, comments=None, ndmin=2, dtype=dtype,
                                    encoding="utf-8-sig", quotechar='"',
                                    skiprows=header_line_number if has_header else 0)
        except (ValueError, OverflowError):
            continue
        except (OSError, UnicodeDecodeError):
            return None
        return values if values.size else None
    return None


def read_csv(path: Path) -> LoadedImage:
    """Read a CSV file of numbers into a 2D array (rows, cols): uint8 if every cell is one digit, int64 if
    every cell is an integer, else float64; no spacing, no affine.

    Raises InputError (one line naming the file) for an unreadable or empty file, a header without data,
    rows of different lengths (naming the line) and non-numeric cells (naming line and column).
    """
    path = Path(path)
    try:
        fast = _parse_with_numpy(path)
    except (OSError, UnicodeDecodeError):
        fast = None  # the reading below names the problem
    if fast is not None:
        return LoadedImage(fast, None, None, path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read CSV file: {error}") from error
    # The slow path below finds the first bad line or cell and names it.
    numbered_lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not numbered_lines:
        raise InputError(path, "CSV file is empty")
    delimiter = sniff_delimiter(numbered_lines[0][1])
    rows = [
        (number, [cell.strip() for cell in next(csv.reader([line], delimiter=delimiter))])
        for number, line in numbered_lines
    ]
    if not _all_numbers(rows[0][1]):
        rows = rows[1:]  # a header row
        if not rows:
            raise InputError(path, "CSV file has a header row but no data rows")
    width = len(rows[0][1])
    values = np.empty((len(rows), width), dtype=np.float64)
    for row_index, (line_number, cells) in enumerate(rows):
        if len(cells) != width:
            raise InputError(
                path,
                f"line {line_number} has {len(cells)} values, expected {width} like line {rows[0][0]} "
                f"({_DELIMITER_NAMES[delimiter]}-separated)",
            )
        for column_index, cell in enumerate(cells):
            try:
                values[row_index, column_index] = float(cell)
            except ValueError:
                raise InputError(
                    path, f"line {line_number}, column {column_index + 1}: {cell!r} is not a number"
                ) from None
    return LoadedImage(values, None, None, path)


def write_csv(array: np.ndarray, path: Path) -> None:
    """Write a 2D integer array as comma-separated integers without a header (``path`` is written as given)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerows(np.asarray(array).astype(np.int64).tolist())
