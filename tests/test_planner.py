"""The 3D planner: patch size, depth and batch size from the dataset's median shape and a memory budget."""
import json
import math

import pytest

from segmenter.preprocessing.planner import Plan3D, describe, estimate_training_mb, plan_3d


def _check(plan: Plan3D, memory_mb: float, max_patch_voxels: int = 128**3):
    assert all(side % 2**plan.depth == 0 for side in plan.patch_size)
    assert min(plan.patch_size) // 2**plan.depth >= 1
    assert math.prod(plan.patch_size) <= max_patch_voxels
    assert 2 <= plan.batch_size <= 8
    assert plan.estimated_mb <= memory_mb


def test_hippocampus_plan_matches_nnunet():
    # MSD Task04 Hippocampus: median shape 36 x 50 x 35 at 1 mm; nnU-Net's 3d_fullres patch is 40 x 56 x 40.
    plan = plan_3d((36, 50, 35), (1.0, 1.0, 1.0), num_channels=1, num_classes=3, memory_mb=2048)
    assert plan.patch_size == (40, 56, 40) and plan.depth == 3
    _check(plan, 2048)
    assert plan.estimated_mb == pytest.approx(estimate_training_mb((40, 56, 40), plan.batch_size, 3, 1, 3))
    assert describe(plan).startswith("patch 40x56x40, depth 3 (bottleneck 5x7x5), batch ")


def test_large_anisotropic_ct_fits_voxels_and_memory():
    plan = plan_3d((512, 512, 300), (0.8, 0.8, 2.5), num_channels=1, num_classes=4, memory_mb=2048)
    _check(plan, 2048)
    rows, columns, slices = plan.patch_size
    assert rows == columns and slices < rows  # the 2.5 mm axis was shrunk first, towards equal extents in mm
    assert 0.5 < slices * 2.5 / (rows * 0.8) < 2
    generous = plan_3d((512, 512, 300), (0.8, 0.8, 2.5), 1, 4, memory_mb=64000)
    _check(generous, 64000)
    assert math.prod(generous.patch_size) > math.prod(plan.patch_size)  # capped by max_patch_voxels instead


def test_tighter_memory_gives_smaller_patches():
    sizes = []
    for memory_mb in (4096, 1024, 256, 64):
        plan = plan_3d((160, 160, 160), (1.0, 1.0, 1.0), 2, 3, memory_mb=memory_mb)
        _check(plan, memory_mb)
        sizes.append(math.prod(plan.patch_size))
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_depth_follows_the_smallest_side_and_max_depth():
    assert plan_3d((200, 200, 200), (1, 1, 1), 1, 2, memory_mb=1e6, max_patch_voxels=10**9).depth == 5
    assert plan_3d((200, 200, 200), (1, 1, 1), 1, 2, memory_mb=1e6, max_depth=3, max_patch_voxels=10**9).depth == 3
    thin = plan_3d((200, 200, 10), (1, 1, 1), 1, 2, memory_mb=1e6, max_patch_voxels=10**9)
    assert thin.depth == 1 and thin.patch_size == (200, 200, 10)  # 10 / 2 = 5 >= 4, 10 / 4 < 4
    tiny = plan_3d((3, 3, 3), (1, 1, 1), 1, 2, memory_mb=100)
    assert tiny.depth == 1 and tiny.patch_size == (4, 4, 4)


def test_plan_is_deterministic_and_serialisable():
    arguments = ((90, 120, 70.5), (1.5, 0.7, 0.7), 2, 5, 1500.0)
    plan = plan_3d(*arguments)
    assert plan == plan_3d(*arguments)
    data = json.loads(json.dumps(plan.to_dict()))
    assert Plan3D.from_dict(data) == Plan3D(plan.patch_size, plan.batch_size, plan.depth,
                                             round(plan.estimated_mb, 1))
    with pytest.raises(Exception):
        plan.batch_size = 3  # frozen


def test_memory_estimate_grows_with_patch_batch_and_filters():
    base = estimate_training_mb((64, 64, 64), 2, 4, 1, 3)
    assert estimate_training_mb((64, 64, 96), 2, 4, 1, 3) > base
    assert estimate_training_mb((64, 64, 64), 4, 4, 1, 3) == pytest.approx(2 * base)
    assert estimate_training_mb((64, 64, 64), 2, 4, 1, 3, base_filters=32) > base
    assert estimate_training_mb((64, 64, 64), 2, 4, 1, 8) > base


def test_impossible_budget_and_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="memory_mb"):
        plan_3d((128, 128, 128), (1, 1, 1), 1, 2, memory_mb=0.01)
    with pytest.raises(ValueError):
        plan_3d((128, 128), (1, 1, 1), 1, 2, memory_mb=100)
    with pytest.raises(ValueError):
        plan_3d((128, 128, 128), (1, 0, 1), 1, 2, memory_mb=100)
