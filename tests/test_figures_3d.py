"""Best / median / worst figures of volumes: three orthogonal planes through the structure, one row each.

A 12x14x10 volume with a ball as truth and a shifted ball as prediction is drawn as three rows of the four
panels (image, truth, prediction, overlay); the planes pass through the centre of mass of the union of the
two balls (the volume's centre when the class is absent); a 2D slice still gives the single-row figure.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segmenter.evaluation import figures

SHAPE = (12, 14, 10)


def ball(centre, radius=3.0):
    grid = np.indices(SHAPE).astype(float)
    distance = np.sqrt(sum((grid[axis] - centre[axis]) ** 2 for axis in range(3)))
    return (distance <= radius).astype(np.uint8)


@pytest.fixture
def case3d():
    truth = ball((6, 7, 5))
    pred = ball((6, 9, 5))  # shifted by two voxels along the columns
    image = np.random.default_rng(0).normal(size=SHAPE) + 3.0 * truth
    return image, truth, pred


def test_volume_figure_has_three_rows_of_four_panels(tmp_path, case3d):
    image, truth, pred = case3d
    scores = {"dice": 0.8, "hd95": 1.5, "case": "both_present"}
    drawing = figures.comparison_drawing(image, truth, pred, 1, "ball", "ball, best case: v1",
                                         spacing=(0.8, 0.8, 2.5), scores=scores)
    assert len(drawing.axes) == 12
    labels = [axis.get_ylabel() for axis in drawing.axes if axis.get_ylabel()]
    assert [label.split("\n")[0] for label in labels] == ["Axial", "Coronal", "Sagittal"]
    assert "Dice 0.800" in drawing._suptitle.get_text() and "mm" in drawing._suptitle.get_text()
    # Pixels are drawn with the plane's physical shape: the coronal plane's rows are 2.5 mm, columns 0.8 mm.
    assert drawing.axes[4].get_aspect() == pytest.approx(2.5 / 0.8)
    assert drawing.axes[0].get_aspect() == pytest.approx(1.0)

    path3d = figures.comparison_figure(image, truth, pred, 1, "ball", "ball, best case: v1",
                                       tmp_path / "compare_ball_best.png", spacing=(0.8, 0.8, 2.5), scores=scores)
    path2d = figures.comparison_figure(image[..., 5], truth[..., 5], pred[..., 5], 1, "ball", "ball, 2D",
                                       tmp_path / "two_d.png", spacing=(0.8, 0.8))
    assert path3d.name == "compare_ball_best.png" and path3d.exists()
    with Image.open(path3d) as three_d, Image.open(path2d) as two_d:
        assert three_d.format == "PNG"
        assert three_d.height > 2.5 * two_d.height


def test_volume_figure_without_image_or_orientation(case3d):
    _, truth, pred = case3d
    drawing = figures.comparison_drawing(None, truth, pred, 1, "ball", "masks only", anatomical_planes=False)
    assert len(drawing.axes) == 9  # no image column
    labels = [axis.get_ylabel() for axis in drawing.axes if axis.get_ylabel()]
    assert len(labels) == 3 and not any("Axial" in label for label in labels)
    assert "px" in drawing._suptitle.get_text()  # spacing unknown; scores computed on the volume


def test_planes_pass_through_centre_of_mass_of_the_union(case3d):
    _, truth, pred = case3d
    union = (truth == 1) | (pred == 1)
    expected = tuple(int(np.round(value)) for value in np.argwhere(union).mean(axis=0))
    assert figures.orthogonal_planes(truth, pred, 1) == expected == (6, 8, 5)
    # An asymmetric union: truth at one corner, prediction elsewhere.
    truth2, pred2 = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    truth2[1:3, 2:4, 1:2] = 1
    pred2[8:10, 10:12, 7:9] = 1
    expected2 = tuple(int(np.round(value)) for value in np.argwhere(truth2 | pred2).mean(axis=0))
    assert figures.orthogonal_planes(truth2, pred2, 1) == expected2
    # The class absent from both: the volume's centre.
    assert figures.orthogonal_planes(truth, pred, 2) == (6, 7, 5)


def test_plane_views_are_turned_superior_up():
    volume = np.zeros(SHAPE)
    volume[2, 3, 9] = 1  # the most superior plane
    coronal = figures._plane_view(volume, 0, 2)
    sagittal = figures._plane_view(volume, 1, 3)
    assert coronal.shape == (10, 14) and coronal[0, 3] == 1
    assert sagittal.shape == (10, 12) and sagittal[0, 2] == 1
    assert figures._plane_view(volume, 2, 9)[2, 3] == 1


def test_2d_figure_keeps_one_row(tmp_path, case3d):
    image, truth, pred = case3d
    drawing = figures.comparison_drawing(image[..., 5], truth[..., 5], pred[..., 5], 1, "ball", "slice",
                                         spacing=(0.8, 1.2))
    assert len(drawing.axes) == 4
    assert [axis.get_title() for axis in drawing.axes][1:] == ["True ball", "Predicted ball", "Overlay"]
    assert not any(axis.get_ylabel() for axis in drawing.axes)
    assert drawing.get_size_inches() == pytest.approx((13, 3.9))
    assert drawing.axes[0].get_aspect() == pytest.approx(0.8 / 1.2)
