"""Preload speed and peak memory against the number of 512 x 512 CSV slices.

    python benchmarks/preload_bench.py [--sizes 100,1000,5000] [--workers 2] [--image-size 256]
                                       [--data-dir DIR] [--keep-data] [--json FILE]

Generates synthetic L3 CT slices (``segmenter.demo_data.generate_l3_slice``) once, for the largest size,
as CSV files in the layout the preload stage reads (images/<id>.csv, masks/<id>.csv). Generating 5,000
slices one by one would take longer than preloading them, so ``--distinct`` slices (default 100) are
generated and the others are byte copies of them under their own names: every file is still a real file
that is read, hashed and parsed. Each size then gets a folder of symbolic links to its first N pairs.

For each size the preload stage runs as a user runs it, ``python -m stages.preload --config ... --overwrite``
in a fresh process, and the benchmark reports slices per second (wall clock of the whole command, start-up
included) and the peak resident memory of the whole process tree: the stage process and its worker
processes, summed. Generation time is not measured. The generated data is deleted at the end unless
``--keep-data``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import pprint
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segmenter import layout

REPO_ROOT = Path(__file__).resolve().parents[1]

# Sampling period of the memory of the process tree, in seconds. Worker processes live for the whole run
# and the stage's big allocations last far longer than this, so a 20 ms period does not miss the peak.
SAMPLE_SECONDS = 0.02
# Period of the scan of /proc for the tree's processes, in seconds. A scan takes about 2 ms of CPU: at every
# sample it took a tenth of a core from the measured command on a two-core machine. Reading the resident
# memory of the tree's few processes takes about 0.1 ms. The workers start once, at the beginning.
TREE_SECONDS = 0.5


# ----------------------------------------------------------------------------------------------------
# Memory of a process tree
# ----------------------------------------------------------------------------------------------------
# psutil is not a dependency of segmenter, and resource.getrusage(RUSAGE_CHILDREN).ru_maxrss gives the peak
# of the largest single child only, not of the stage process and its workers together. So the tree is read
# from /proc (Linux): parent ids from /proc/<pid>/stat, resident memory from VmRSS in /proc/<pid>/status.
def _parent_ids() -> dict[int, int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:  # the process ended meanwhile
            continue
        # The command name (field 2) is in parentheses and may contain spaces: split after the last ")".
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def _resident_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(root_pid: int) -> set[int]:
    """``root_pid`` and all its descendants."""
    parents = _parent_ids()
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


def run_measured(command: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``command``; return the completed process, its wall-clock seconds and the tree's peak RSS in MiB."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=REPO_ROOT)
        peak, tree, next_scan = 0.0, set(), 0.0
        while process.poll() is None:
            if time.perf_counter() >= next_scan:
                tree, next_scan = process_tree(process.pid), time.perf_counter() + TREE_SECONDS
            peak = max(peak, sum(_resident_kib(pid) for pid in tree) / 1024.0)
            time.sleep(SAMPLE_SECONDS)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        completed = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    return completed, seconds, peak


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def _csv_bytes(array: np.ndarray) -> bytes:
    """Comma-separated integers, one row per line, as segmenter.io.tabular.write_csv writes them."""
    lines = [",".join(map(str, row)) for row in np.asarray(array).astype(np.int64).tolist()]
    return ("\n".join(lines) + "\n").encode()


def generate_slices(folder: Path, count: int, distinct: int, seed: int = 0) -> list[str]:
    """Write ``count`` CSV image/mask pairs into ``folder``/images and /masks; return their ids in order."""
    from segmenter.demo_data import generate_l3_slice

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    # A fixed width, so that data generated for a smaller size is reused, not duplicated under other names.
    ids = [f"l3_{index:06d}" for index in range(count)]
    for index, case in enumerate(ids):
        image_path, mask_path = folder / "images" / f"{case}.csv", folder / "masks" / f"{case}.csv"
        if image_path.exists() and mask_path.exists():
            continue
        if index < distinct:
            image, mask = generate_l3_slice(np.random.default_rng([seed, index]), size=512)
            image_path.write_bytes(_csv_bytes(image))
            mask_path.write_bytes(_csv_bytes(mask))
        else:
            source = ids[index % distinct]
            shutil.copyfile(folder / "images" / f"{source}.csv", image_path)
            shutil.copyfile(folder / "masks" / f"{source}.csv", mask_path)
        if (index + 1) % 500 == 0:
            print(f"  generated {index + 1} of {count} pairs", flush=True)
    return ids


def link_subset(source: Path, target: Path, ids: list[str]) -> Path:
    """A new folder of symbolic links to the pairs ``ids`` of ``source``."""
    shutil.rmtree(target, ignore_errors=True)
    for kind in ("images", "masks"):
        (target / kind).mkdir(parents=True)
        for case in ids:
            (target / kind / f"{case}.csv").symlink_to(source / kind / f"{case}.csv")
    return target


def write_config(path: Path, data_dir: Path, preloaded_root: Path, workers: int, image_size: int) -> Path:
    config = {
        "experiment": "preload_bench",
        "classes": ["background", "muscle"],
        "paths": {"preloaded_root": str(preloaded_root), "experiments_root": str(path.parent / "experiments")},
        "preload": {
            "input_dir": str(data_dir),
            "normalization": {"method": "ct_window", "window": [-250.0, 250.0]},
            "image_size": [image_size, image_size],
            "pixel_spacing": [0.78125, 0.78125],
            "workers": workers,
        },
    }
    path.write_text("CONFIG = " + pprint.pformat(config, sort_dicts=False) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,5000", help="comma-separated numbers of slices")
    parser.add_argument("--workers", type=int, default=2, help="preload.workers")
    parser.add_argument("--image-size", type=int, default=256, help="preload.image_size (square)")
    parser.add_argument("--distinct", type=int, default=100, help="slices generated; the rest are copies")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder for the generated data (default: a temporary folder)")
    parser.add_argument("--keep-data", action="store_true", help="do not delete the generated data")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))

    work = args.data_dir or Path(tempfile.mkdtemp(prefix="preload_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": f"python -m stages.preload --config <generated> --overwrite (preload.workers={args.workers}, "
                   f"image_size {args.image_size}, 512 x 512 CSV slices)",
        "sizes": {},
    }
    try:
        print(f"Generating {sizes[-1]} slice pairs in {work} ...", flush=True)
        ids = generate_slices(work / "all", sizes[-1], min(args.distinct, sizes[-1]))
        for size in sizes:
            data_dir = link_subset(work / "all", work / f"subset_{size}", ids[:size])
            config = write_config(work / f"config_{size}.py", data_dir, work / "preloaded", args.workers,
                                  args.image_size)
            command = [sys.executable, "-m", "stages.preload", "--config", str(config), "--overwrite"]
            result, seconds, peak = run_measured(command, env)
            if result.returncode != 0:
                sys.exit(f"preload of {size} slices failed:\n{result.stderr[-3000:]}")
            manifest = json.loads(layout.manifest_path(work / "preloaded" / "preload_bench").read_text())
            preloaded = len(manifest["train"]["cases"]) + len(manifest["test"]["cases"])
            if preloaded != size:
                sys.exit(f"preloaded {preloaded} slices, expected {size}")
            figures["sizes"][str(size)] = {"slices_per_s": round(size / seconds, 1), "peak_rss_mb": round(peak, 1),
                                           "seconds": round(seconds, 1)}
            print(f"{size} slices: {seconds:.1f} s, {size / seconds:.1f} slices/s, peak RSS {peak:.0f} MB "
                  f"({result.stdout.strip().splitlines()[-1]})", flush=True)
            shutil.rmtree(work / "preloaded", ignore_errors=True)
    finally:
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
