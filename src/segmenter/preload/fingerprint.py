"""Source digests and the fingerprint that says whether an earlier preload is still up to date."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from segmenter.artifacts import sha256_of_file
from segmenter.config import Config
from segmenter.errors import InputError
from segmenter.manifest import MANIFEST_VERSION
from segmenter.preload.discovery import CaseFiles

# Sources larger than this in total are hashed by the worker processes in parallel; below it starting the
# workers (about a second each, they are spawned) costs more than it saves.
PARALLEL_HASH_BYTES = 256 * 2**20


def source_digest(path: Path) -> str:
    """sha256 of a file, or of a DICOM series folder (its files' digests, in name order)."""
    path = Path(path)
    try:
        if path.is_dir():
            digest = hashlib.sha256()
            for child in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
                digest.update(sha256_of_file(child).encode())
            return digest.hexdigest()
        return sha256_of_file(path)
    except OSError as error:
        raise InputError(path, f"cannot read: {error.strerror or error}") from None


def digest_job(path: str):
    """(digest, None) or (None, one-line error), for a worker process."""
    try:
        return source_digest(Path(path)), None
    except InputError as error:
        return None, str(error)


#: Preload settings that only 3D datasets (spatial_dims 3) use.
THREE_D_SETTINGS = ("spatial_dims", "target_spacing", "patch_size", "crop_to_nonzero", "plan_memory_mb",
                    "image_interpolation", "label_interpolation", "anisotropy_threshold")


def fingerprint(config: Config, source_hashes: dict) -> str:
    """A digest of everything preload's output depends on: its settings, classes, seed, sources, version."""
    settings = config.preload.model_dump(mode="json", exclude={"workers", "skip_invalid"})
    if config.preload.spatial_dims == 2:
        # Settings of 3D datasets only: a 2D dataset preloaded before they existed stays up to date.
        for name in THREE_D_SETTINGS:
            settings.pop(name)
    payload = {"version": MANIFEST_VERSION, "preload": settings, "classes": config.classes, "seed": config.seed,
               "sources": sorted(source_hashes.items())}
    if config.preload.spatial_dims == 3:
        # The plan (batch size, depth) depends on the model's size too.
        model = config.train.model
        payload["plan_model"] = {"base_filters": model.base_filters, "depth": model.depth}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def source_paths(cases: list[CaseFiles]) -> list[str]:
    return sorted({str(path) for case in cases for path in case.source_paths})


def _total_bytes(paths: list[str]) -> int:
    total = 0
    for path in map(Path, paths):
        try:
            total += sum(child.stat().st_size for child in path.iterdir()) if path.is_dir() else path.stat().st_size
        except OSError:
            pass  # source_digest names the file
    return total


def hash_sources(cases: list[CaseFiles], workers: Optional[object] = None) -> dict:
    """path -> sha256 of every source, hashed by the worker processes when they are worth starting."""
    paths = source_paths(cases)
    if workers is not None and workers.parallel and _total_bytes(paths) > PARALLEL_HASH_BYTES:
        results = workers.map(digest_job, paths, ordered=True, chunksize=8)
    else:
        results = map(digest_job, paths)
    hashes = {}
    for path, (digest, error) in zip(paths, results):
        if error:
            raise InputError(None, error)
        hashes[path] = digest
    return hashes
