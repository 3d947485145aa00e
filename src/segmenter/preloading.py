"""Preload: original dataset -> validated, normalised, resized, split slices in ``preloaded_dataset/<experiment>/``.

The work per image/mask pair (read, validate, remap labels, cut volumes into slices, normalise, resize)
runs in worker processes; the main process writes each finished slice to a scratch file at once, so
memory does not grow with the number of slices. After the seeded split the slices are packed into shards
(``train.npz``, or ``train-00000.npz``, ... for large splits) inside a temporary folder that replaces the
output folder only when everything succeeded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import re
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from segmenter import io
from segmenter.artifacts import atomic_directory, read_json, sha256_of_file, write_json_atomic
from segmenter.config import Config
from segmenter.dataset import SliceSet, save_shard
from segmenter.errors import InputError
from segmenter.preprocessing import normalize, resize_image, resize_mask, resized_spacing, split_train_test

MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CasePair:
    """One image and its mask (a 2D slice, or a volume to be cut into slices)."""

    case_id: str
    image_path: Path
    mask_path: Path
    group_id: str


@dataclasses.dataclass
class PreloadResult:
    output_dir: Path
    num_train: int
    num_test: int
    skipped: list
    up_to_date: bool = False

    def __str__(self) -> str:
        if self.up_to_date:
            return f"{self.output_dir} is up to date (use --overwrite to redo it)"
        return f"{self.output_dir}: {self.num_train} train and {self.num_test} test slices, {len(self.skipped)} skipped"


# ----------------------------------------------------------------------------------------------------
# Finding the pairs
# ----------------------------------------------------------------------------------------------------
def _group_id(case_id: str, group_pattern: Optional[str]) -> str:
    if group_pattern:
        match = re.search(group_pattern, case_id)
        if match:
            return match.group(1) if match.groups() else match.group(0)
    return case_id


def find_pairs(config: Config, log=print) -> list[CasePair]:
    """Pair images with masks by id (or take the config's explicit pairs) and report what did not match."""
    settings = config.preload
    root = Path(settings.input_dir)
    if not root.is_dir():
        raise InputError(root, "input folder not found")
    if settings.pairs:
        pairs = []
        for image_name, mask_name in settings.pairs:
            image_path, mask_path = root / image_name, root / mask_name
            for path in (image_path, mask_path):
                if not path.exists():
                    raise InputError(path, "listed in preload.pairs but not found")
            case_id = io.case_id(image_path)
            pairs.append(CasePair(case_id, image_path, mask_path, _group_id(case_id, settings.group_pattern)))
        return pairs

    images = io.list_cases(root / settings.images_subdir, "image")
    masks = io.list_cases(root / settings.masks_subdir, "mask")
    matched = sorted(set(images) & set(masks))
    images_only = sorted(set(images) - set(masks))
    masks_only = sorted(set(masks) - set(images))
    log(f"Matched {len(matched)} image/mask pairs; {len(images_only)} images without masks, "
        f"{len(masks_only)} masks without images.")
    if images_only:
        log(f"  images without masks: {', '.join(images_only[:20])}{' ...' if len(images_only) > 20 else ''}")
    if masks_only:
        log(f"  masks without images: {', '.join(masks_only[:20])}{' ...' if len(masks_only) > 20 else ''}")
    if not matched:
        raise InputError(root, f"no image in {settings.images_subdir}/ has a mask of the same name in {settings.masks_subdir}/")
    return [CasePair(cid, images[cid], masks[cid], _group_id(cid, settings.group_pattern)) for cid in matched]


# ----------------------------------------------------------------------------------------------------
# The work on one pair (runs in a worker process)
# ----------------------------------------------------------------------------------------------------
def remap_labels(mask: np.ndarray, label_map: dict, unmapped: str, num_classes: int, path: Path) -> np.ndarray:
    """Apply ``label_map`` (source label -> class index) and check every label is a configured class."""
    values = np.unique(mask)
    lookup = {int(v): int(v) for v in values}
    lookup.update({int(k): int(v) for k, v in label_map.items() if int(k) in lookup})
    if unmapped == "background":
        lookup = {value: (label_map[value] if value in label_map else 0) for value in lookup}
    outside = sorted(source for source, target in lookup.items() if not 0 <= target < num_classes)
    if outside:
        raise InputError(path, f"mask has labels {outside} outside the configured classes 0..{num_classes - 1} "
                               "(map them with preload.label_map)")
    remapped = np.zeros(mask.shape, dtype=np.uint8)
    for source, target in lookup.items():
        if target:
            remapped[mask == source] = target
    return remapped


def _slices_of(image, mask, axis: int):
    """Yield (slice_index, image2d, mask2d, spacing2d) for a 2D pair or each slice of a 3D pair."""
    spacing = image.spacing
    if image.array.ndim == 2:
        yield -1, image.array, mask.array, (tuple(spacing) if spacing is not None else None)
        return
    in_plane = [a for a in range(3) if a != axis]
    spacing2d = tuple(spacing[a] for a in in_plane) if spacing is not None else None
    for index in range(image.array.shape[axis]):
        yield index, np.take(image.array, index, axis=axis), np.take(mask.array, index, axis=axis), spacing2d


def process_pair(pair: CasePair, config: Config) -> list[dict]:
    """Read, validate and preprocess one pair; return one record per kept slice (arrays included)."""
    settings = config.preload
    image = io.read_image(pair.image_path)
    mask = io.read_mask(pair.mask_path, reference=image)
    if image.array.ndim == 3 and image.array.shape[-1] in (3, 4) and mask.array.ndim == 2:
        raise InputError(pair.image_path, "colour images are not supported; save them as grey levels")
    if image.array.shape != mask.array.shape:
        raise InputError(pair.mask_path, f"mask shape {mask.array.shape} differs from image shape "
                                         f"{image.array.shape} ({pair.image_path.name})")
    if image.spacing is None and settings.pixel_spacing is not None and image.array.ndim == 2:
        image = dataclasses.replace(image, spacing=tuple(settings.pixel_spacing))
    labels = remap_labels(mask.array, settings.label_map, settings.unmapped_labels, config.num_classes, pair.mask_path)
    mask = dataclasses.replace(mask, array=labels)
    records = []
    for slice_index, image2d, mask2d, spacing in _slices_of(image, mask, settings.slice_axis):
        present = set(np.unique(mask2d).tolist())
        if settings.require_labels and not set(settings.require_labels) <= present:
            continue
        if not settings.keep_empty_slices and present == {0}:
            continue
        shape = tuple(settings.image_size)
        raw = resize_image(image2d.astype(np.float32), shape)
        normalised = resize_image(normalize(image2d, settings.normalization), shape)
        records.append({
            "id": pair.case_id if slice_index < 0 else f"{pair.case_id}_s{slice_index:04d}",
            "volume_id": pair.group_id,
            "slice_index": slice_index,
            "source_image": str(pair.image_path),
            "source_mask": str(pair.mask_path),
            "original_shape": list(image2d.shape),
            "spacing": list(resized_spacing(spacing, image2d.shape, shape)) if spacing else None,
            "labels": sorted(int(v) for v in present),
            "image": normalised[..., np.newaxis],
            "hu_image": raw,
            "mask": resize_mask(mask2d, shape),
        })
    return records


def _worker(args):
    pair, config_json = args
    config = Config.model_validate_json(config_json)
    try:
        return pair, process_pair(pair, config), None
    except InputError as error:
        return pair, None, str(error)
    except Exception as error:  # An unexpected failure in a reader still names the file.
        return pair, None, str(InputError(pair.image_path, f"{type(error).__name__}: {error}"))


# ----------------------------------------------------------------------------------------------------
# Up-to-date check
# ----------------------------------------------------------------------------------------------------
def source_digest(path: Path) -> str:
    """sha256 of a file, or of a DICOM series folder (its files' digests, in name order)."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
            digest.update(sha256_of_file(child).encode())
        return digest.hexdigest()
    return sha256_of_file(path)


def _fingerprint(config: Config, source_hashes: dict) -> str:
    settings = config.preload.model_dump(mode="json", exclude={"workers", "skip_invalid"})
    payload = {"version": MANIFEST_VERSION, "preload": settings, "classes": config.classes, "seed": config.seed,
               "sources": sorted(source_hashes.items())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _hash_sources(pairs: list[CasePair]) -> dict:
    paths = sorted({str(p) for pair in pairs for p in (pair.image_path, pair.mask_path)})
    return {path: source_digest(Path(path)) for path in paths}


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------
def _run_workers(pairs: list[CasePair], config: Config):
    jobs = [(pair, config.model_dump_json()) for pair in pairs]
    # disable=None: a bar on a terminal, none in logs and pipes.
    progress = dict(total=len(jobs), unit="file", desc="preload", mininterval=1.0, disable=None)
    if config.preload.workers == 1 or len(jobs) == 1:
        yield from tqdm(map(_worker, jobs), **progress)
        return
    # "spawn" because a forked child of a process that has TensorFlow loaded (tests, notebooks) can hang.
    context = multiprocessing.get_context("spawn")
    with context.Pool(config.preload.workers) as pool:
        yield from tqdm(pool.imap_unordered(_worker, jobs, chunksize=4), **progress)


def _write_shards(folder: Path, split: str, records: list[dict], scratch: Path, shard_size: int) -> list[str]:
    num_shards = max(1, -(-len(records) // shard_size))
    names = []
    for shard_number in range(num_shards):
        chunk = records[shard_number * shard_size:(shard_number + 1) * shard_size]
        name = f"{split}.npz" if num_shards == 1 else f"{split}-{shard_number:05d}.npz"
        arrays = [np.load(scratch / f"{record['scratch']}.npz") for record in chunk]
        nan2 = np.array([np.nan, np.nan], dtype=np.float32)
        shard = SliceSet(
            images=np.stack([a["image"] for a in arrays]) if arrays else np.zeros((0, 1, 1, 1), np.float32),
            masks=np.stack([a["mask"] for a in arrays]) if arrays else np.zeros((0, 1, 1), np.uint8),
            ids=np.array([r["id"] for r in chunk], dtype=str),
            volume_ids=np.array([r["volume_id"] for r in chunk], dtype=str),
            slice_index=np.array([r["slice_index"] for r in chunk], dtype=np.int32),
            spacing=np.array([r["spacing"] if r["spacing"] else nan2 for r in chunk], dtype=np.float32).reshape(-1, 2),
            hu_images=np.stack([a["hu_image"] for a in arrays]) if arrays else np.zeros((0, 1, 1), np.float32),
        )
        save_shard(shard, folder / name)
        names.append(name)
    return names


def preload(config: Config, overwrite: bool = False, skip_invalid: Optional[bool] = None, log=print) -> PreloadResult:
    """Run the preload stage for ``config``; see the module docstring."""
    skip_invalid = config.preload.skip_invalid if skip_invalid is None else skip_invalid
    output_dir = config.preloaded_dir
    pairs = find_pairs(config, log=log)
    source_hashes = _hash_sources(pairs)
    fingerprint = _fingerprint(config, source_hashes)
    manifest_path = output_dir / "manifest.json"
    if manifest_path.is_file() and not overwrite:
        old = read_json(manifest_path)
        if old.get("fingerprint") == fingerprint:
            return PreloadResult(output_dir, old["splits"]["train"]["num_slices"], old["splits"]["test"]["num_slices"],
                                 old.get("skipped", []), up_to_date=True)

    with atomic_directory(output_dir) as tmp_dir:
        scratch = tmp_dir / "scratch"
        scratch.mkdir()
        records, skipped = [], []
        for pair, pair_records, error in _run_workers(pairs, config):
            if error:
                if not skip_invalid:
                    raise InputError(None, error)
                skipped.append({"case_id": pair.case_id, "image": str(pair.image_path), "mask": str(pair.mask_path),
                                "error": error})
                continue
            for record in pair_records:
                record["scratch"] = f"{len(records):07d}"
                np.savez(scratch / f"{record['scratch']}.npz", image=record.pop("image"),
                         hu_image=record.pop("hu_image"), mask=record.pop("mask"))
                records.append(record)
        if skipped:
            log(f"Skipped {len(skipped)} invalid pairs (--skip-invalid):")
            for entry in skipped:
                log(f"  {entry['error']}")
        if not records:
            raise InputError(config.preload.input_dir, "no slices left after validation and the label filter")
        ids = [r["id"] for r in records]
        if len(set(ids)) != len(ids):
            duplicate = sorted({i for i in ids if ids.count(i) > 1})[0]
            raise InputError(config.preload.input_dir, f"duplicate slice id {duplicate!r}")
        train_idx, test_idx = split_train_test(
            ids, [r["volume_id"] for r in records], [len(r["labels"]) > 1 or r["labels"] != [0] for r in records],
            config.preload.test_fraction, config.seed)
        manifest = {
            "version": MANIFEST_VERSION,
            "fingerprint": fingerprint,
            "experiment": config.experiment,
            "classes": config.classes,
            "image_size": list(config.preload.image_size),
            "channels": 1,
            "preprocessing": config.preload.model_dump(mode="json"),
            "sources": source_hashes,
            "skipped": skipped,
            "splits": {},
            "config": config.to_jsonable(),
        }
        for split, indices in (("train", train_idx), ("test", test_idx)):
            split_records = sorted((records[i] for i in indices), key=lambda r: r["id"])
            shards = _write_shards(tmp_dir, split, split_records, scratch, config.preload.shard_size)
            label_counts = {}
            for record in split_records:
                for label in record["labels"]:
                    label_counts[str(label)] = label_counts.get(str(label), 0) + 1
            manifest["splits"][split] = {
                "num_slices": len(split_records),
                "shards": shards,
                "slices_with_label": label_counts,
                "slices": [{k: v for k, v in r.items() if k != "scratch"} for r in split_records],
            }
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()
        write_json_atomic(manifest, tmp_dir / "manifest.json")
    return PreloadResult(output_dir, len(train_idx), len(test_idx), skipped)
