"""Tests of the synthetic L3 CT demo dataset: anatomy in HU, mask shape, determinism and the writer."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from segmenter import demo_data
from segmenter.demo_data import (
    HU_MAX,
    HU_MIN,
    PARAMETERS_FILE_NAME,
    generate_l3_slice,
    main,
    pixel_spacing_mm,
    write_demo_dataset,
)
from segmenter.errors import InputError

# Slices checked for anatomy: enough seeds to catch a rare bad draw, small enough to stay fast.
ANATOMY_SEEDS = list(range(6))
ANATOMY_SIZE = 256


@pytest.fixture(scope="module")
def slices():
    """(seed, image, mask) for every anatomy seed, drawn once for the module."""
    return [(seed, *generate_l3_slice(np.random.default_rng(seed), size=ANATOMY_SIZE)) for seed in ANATOMY_SEEDS]


def body_and_centre(image):
    body = image > -500
    rows, columns = np.nonzero(body)
    return body, (rows.mean(), columns.mean())


def test_slice_types_shapes_and_value_range(slices):
    for _, image, mask in slices:
        assert image.shape == mask.shape == (ANATOMY_SIZE, ANATOMY_SIZE)
        assert image.dtype == np.float32 and mask.dtype == np.uint8
        assert np.array_equal(image, np.rint(image)), "HU values must be integers"
        assert HU_MIN <= image.min() and image.max() <= HU_MAX
        assert set(np.unique(mask)) == {0, 1}


def test_same_seed_gives_same_slice_and_different_seeds_differ():
    image_a, mask_a = generate_l3_slice(np.random.default_rng(7), size=128)
    image_b, mask_b = generate_l3_slice(np.random.default_rng(7), size=128)
    image_c, mask_c = generate_l3_slice(np.random.default_rng(8), size=128)
    assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(image_a, image_c)
    # Different anatomy, not just different noise: the masks disagree on a good share of muscle.
    assert np.sum(mask_a != mask_c) > 0.2 * mask_a.sum()


def test_hounsfield_units_by_tissue(slices):
    for seed, image, mask in slices:
        body, _ = body_and_centre(image)
        muscle_hu = image[mask == 1].mean()
        assert 20 < muscle_hu < 70, f"seed {seed}: mean muscle HU {muscle_hu:.1f}"
        # Air around the body: the image corners.
        corners = np.concatenate([image[:10, :10].ravel(), image[:10, -10:].ravel()])
        assert abs(np.median(corners) + 1000) < 10, f"seed {seed}: air {np.median(corners)}"
        # Subcutaneous fat: the band just under the skin, outside the muscle, is mostly fat.
        fat_band = ndimage.binary_erosion(body, iterations=3) & ~ndimage.binary_erosion(body, iterations=6)
        assert np.median(image[fat_band & (mask == 0)]) < -50, f"seed {seed}: subcutaneous fat not negative"
        # Bone: the vertebra is there and dense.
        assert np.sum(image > 300) > 20, f"seed {seed}: no bone above 300 HU"
        assert image.max() > 500


def test_muscle_area_is_plausible_and_forms_a_ring(slices):
    for seed, image, mask in slices:
        body, (centre_row, centre_column) = body_and_centre(image)
        fraction = mask.sum() / body.sum()
        assert 0.05 < fraction < 0.35, f"seed {seed}: muscle is {fraction:.2%} of the body"
        assert np.all(mask[~body] == 0), "muscle outside the body"
        rows, columns = np.nonzero(mask)
        row_offset, column_offset = rows - centre_row, columns - centre_column
        # Muscle in front of, behind, left and right of the body centre (a ring, not one blob).
        along_midline = np.abs(column_offset) < 0.15 * ANATOMY_SIZE
        along_equator = np.abs(row_offset) < 0.1 * ANATOMY_SIZE
        assert np.any(along_midline & (row_offset < -0.1 * ANATOMY_SIZE)), f"seed {seed}: no anterior muscle"
        assert np.any(along_midline & (row_offset > 0.1 * ANATOMY_SIZE)), f"seed {seed}: no posterior muscle"
        assert np.any(along_equator & (column_offset < -0.2 * ANATOMY_SIZE)), f"seed {seed}: no muscle on the left"
        assert np.any(along_equator & (column_offset > 0.2 * ANATOMY_SIZE)), f"seed {seed}: no muscle on the right"


def test_muscle_area_in_square_centimetres_is_adult_like(slices):
    # Adult skeletal muscle area at L3 is roughly 80-250 cm^2.
    for seed, _, mask in slices:
        area_cm2 = mask.sum() * pixel_spacing_mm(ANATOMY_SIZE) ** 2 / 100
        assert 60 < area_cm2 < 300, f"seed {seed}: {area_cm2:.0f} cm^2"


@pytest.mark.parametrize("size", [32, 128, 512])
def test_size_argument(size):
    image, mask = generate_l3_slice(np.random.default_rng(1), size=size)
    assert image.shape == mask.shape == (size, size)
    assert mask.sum() > 0


@pytest.mark.parametrize("size", [0, 16, 31, 64.0])
def test_bad_size_is_rejected(size):
    with pytest.raises(ValueError, match="size"):
        generate_l3_slice(np.random.default_rng(0), size=size)


def test_csv_round_trip_gives_identical_arrays(tmp_path):
    output_dir = write_demo_dataset(tmp_path / "demo", num_slices=2, size=64, seed=3)
    assert output_dir == tmp_path / "demo"
    assert sorted(path.name for path in (output_dir / "images").iterdir()) == ["l3_000.csv", "l3_001.csv"]
    assert sorted(path.name for path in (output_dir / "masks").iterdir()) == ["l3_000.csv", "l3_001.csv"]
    slice_seeds = np.random.SeedSequence(3).spawn(2)
    for slice_id, slice_seed in zip(["l3_000", "l3_001"], slice_seeds):
        image, mask = generate_l3_slice(np.random.default_rng(slice_seed), size=64)
        stored_image = np.loadtxt(output_dir / "images" / f"{slice_id}.csv", delimiter=",")
        stored_mask = np.loadtxt(output_dir / "masks" / f"{slice_id}.csv", delimiter=",")
        assert np.array_equal(stored_image, image)
        assert np.array_equal(stored_mask, mask)
    first_line = (output_dir / "images" / "l3_000.csv").read_text().splitlines()[0]
    assert len(first_line.split(",")) == 64 and "." not in first_line
    assert "synthetic" in (output_dir / "README.txt").read_text().lower()
    parameters = json.loads((output_dir / PARAMETERS_FILE_NAME).read_text())
    assert (parameters["num_slices"], parameters["size"], parameters["seed"]) == (2, 64, 3)


def test_slice_depends_only_on_seed_and_index(tmp_path):
    short = write_demo_dataset(tmp_path / "short", num_slices=1, size=48, seed=5)
    longer = write_demo_dataset(tmp_path / "longer", num_slices=3, size=48, seed=5)
    assert (short / "images" / "l3_000.csv").read_text() == (longer / "images" / "l3_000.csv").read_text()
    assert (longer / "images" / "l3_000.csv").read_text() != (longer / "images" / "l3_001.csv").read_text()


def test_existing_dataset_with_same_parameters_is_kept(tmp_path, monkeypatch):
    output_dir = write_demo_dataset(tmp_path / "demo", num_slices=2, size=48, seed=0)
    marker = output_dir / "images" / "l3_000.csv"
    modified = marker.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("the generator must not run for an up-to-date dataset")

    monkeypatch.setattr(demo_data, "generate_l3_slice", fail)
    assert write_demo_dataset(output_dir, num_slices=2, size=48, seed=0) == output_dir
    assert marker.stat().st_mtime_ns == modified


def test_other_parameters_need_overwrite(tmp_path):
    output_dir = write_demo_dataset(tmp_path / "demo", num_slices=2, size=48, seed=0)
    with pytest.raises(InputError, match="overwrite"):
        write_demo_dataset(output_dir, num_slices=2, size=48, seed=1)
    write_demo_dataset(output_dir, num_slices=3, size=48, seed=1, overwrite=True)
    assert len(list((output_dir / "images").iterdir())) == 3
    assert json.loads((output_dir / PARAMETERS_FILE_NAME).read_text())["seed"] == 1


def test_unrelated_folder_is_not_replaced_but_empty_folder_is_filled(tmp_path):
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(InputError):
        write_demo_dataset(unrelated, num_slices=1, size=48)
    assert (unrelated / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_demo_dataset(empty, num_slices=1, size=48)
    assert (empty / "images" / "l3_000.csv").exists()


def test_failure_midway_leaves_no_partial_dataset(tmp_path, monkeypatch):
    real_generate = demo_data.generate_l3_slice
    calls = []

    def fail_on_third_slice(rng, size=512):
        calls.append(size)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real_generate(rng, size=size)

    monkeypatch.setattr(demo_data, "generate_l3_slice", fail_on_third_slice)
    with pytest.raises(RuntimeError, match="disk full"):
        write_demo_dataset(tmp_path / "fresh", num_slices=4, size=48)
    assert list(tmp_path.iterdir()) == [], "no dataset and no temporary folder may be left behind"

    # A failed overwrite keeps the earlier good dataset intact.
    monkeypatch.setattr(demo_data, "generate_l3_slice", real_generate)
    good = write_demo_dataset(tmp_path / "good", num_slices=2, size=48, seed=0)
    before = (good / "images" / "l3_000.csv").read_text()
    calls.clear()
    monkeypatch.setattr(demo_data, "generate_l3_slice", fail_on_third_slice)
    with pytest.raises(RuntimeError):
        write_demo_dataset(good, num_slices=4, size=48, seed=9, overwrite=True)
    assert (good / "images" / "l3_000.csv").read_text() == before
    assert json.loads((good / PARAMETERS_FILE_NAME).read_text())["seed"] == 0
    assert sorted(os.listdir(tmp_path)) == ["good"]


@pytest.mark.parametrize(
    "arguments", [{"num_slices": 0}, {"size": 8}, {"seed": -1}], ids=["no slices", "tiny size", "negative seed"]
)
def test_writer_rejects_bad_arguments(tmp_path, arguments):
    with pytest.raises(ValueError):
        write_demo_dataset(tmp_path / "demo", **arguments)
    assert not (tmp_path / "demo").exists()


def test_command_line_prints_the_folder(tmp_path, capsys):
    output_dir = tmp_path / "cli"
    arguments = [str(output_dir), "--num-slices", "2", "--size", "40", "--seed", "4"]
    assert main(arguments) == 0
    assert capsys.readouterr().out.strip() == str(output_dir)
    assert len(list((output_dir / "masks").iterdir())) == 2
    assert main(arguments[:-1] + ["5"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(arguments[:-1] + ["5", "--overwrite"]) == 0
