"""Patch size, batch size and network depth for a 3D U-Net, planned from the dataset, as nnU-Net does.

nnU-Net's ``ExperimentPlanner`` (Isensee et al. 2021) fits the largest patch that the GPU memory allows and
the network that patch needs. :func:`plan_3d` follows its rules, simplified to one depth for all axes:

1. Start from the median shape of the training volumes after resampling to the target spacing: a patch
   that covers a typical case whole gives the most context.
2. Depth (the number of 2x2x2 poolings): halve until the smallest side would drop below 4 voxels at the
   bottleneck (nnU-Net stops pooling an axis there; with one depth for all axes the smallest side decides),
   between 1 and ``max_depth``.
3. Round every side up to a multiple of ``2 ** depth``, so that every pooling halves it exactly.
4. While the patch exceeds ``max_patch_voxels``, or one training step at batch size 2 exceeds the memory
   budget, shrink the side that is longest in mm (not in voxels: an anisotropic patch then tends towards
   the same physical extent on every axis) by ``2 ** depth``, and redo steps 2 and 3.
5. Batch size: as many patches as the budget holds, at least 2 (nnU-Net's minimum) and at most 8 (more
   does not help a U-Net trained with instance or group normalisation; nnU-Net caps the batch at 5% of
   the dataset's voxels instead).

The memory model (:func:`estimate_training_mb`) counts float32 activations: a U-Net whose filters start at
``base_filters`` and double per level keeps, at level ``l`` (``patch / 8**l`` voxels, ``base * 2**l``
filters), ``MAPS_PER_LEVEL`` feature maps for the backward pass: in the encoder two convolutions, their
normalisation and ReLU outputs (6); in the decoder the up-sampled tensor, the concatenation (2) and the
block (6); plus the gradients alive at the peak. The input and the class maps at full resolution (logits,
softmax, one-hot target, their gradients) add ``num_channels + OUTPUT_MAPS_PER_CLASS * num_classes`` maps.
Weights and optimizer state are small next to the activations at these sizes and are left out. The figure
only has to grow with the patch and batch and to be roughly right; ``MAPS_PER_LEVEL`` (20, above the 15
stored activations, for the gradients and workspace alive at the peak) says how it compares with a
measured Keras model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

__all__ = ["MAPS_PER_LEVEL", "OUTPUT_MAPS_PER_CLASS", "Plan3D", "describe", "estimate_training_mb", "plan_3d"]

# Feature maps per level kept for one training step (forward activations and the gradients alive at the
# peak), in units of (voxels at that level) x (filters at that level). 15 activations are stored per level
# (see the module docstring); TensorFlow frees most gradients as it goes. Calibrated on CPU (TensorFlow
# 2.21, jit_compile=False as training uses) against segmenter.models.unet in 3D (group normalisation,
# transposed convolutions, base_filters 16, 3 classes, AdamW, train_on_batch), as the growth of the peak
# resident memory over the built model: at batch size 2, 469 MB measured vs 489 MB estimated for a
# 48x64x48 patch at depth 3, and 908 vs 918 MB for 64x64x64 at depth 4. Each further sample cost less
# (163 and 271 MB, about 13 maps per level), so the estimate errs high for larger batches. GPU memory
# (cuDNN workspaces, the allocator's pool) was not measured.
MAPS_PER_LEVEL = 20
# Full-resolution maps per class: logits, softmax, one-hot target, and the gradient of the logits.
OUTPUT_MAPS_PER_CLASS = 4
_BYTES_PER_VALUE = 4  # float32
_MIN_BOTTLENECK = 4  # voxels along the smallest side at the bottleneck (nnU-Net's limit per axis)
_MIN_SIDE = 8  # a side is never shrunk below this (4 at the bottleneck of a depth-1 network)
_MAX_BATCH = 8
_MIN_BATCH = 2


@dataclasses.dataclass(frozen=True)
class Plan3D:
    """A planned 3D training set-up: ``patch_size`` (3 sides, each divisible by ``2 ** depth``),
    ``batch_size``, the U-Net ``depth`` (poolings) and ``estimated_mb`` of one training step at that batch."""

    patch_size: tuple[int, int, int]
    batch_size: int
    depth: int
    estimated_mb: float

    def to_dict(self) -> dict:
        """JSON-ready: lists and plain numbers."""
        return {"patch_size": [int(side) for side in self.patch_size], "batch_size": int(self.batch_size),
                "depth": int(self.depth), "estimated_mb": round(float(self.estimated_mb), 1)}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan3D":
        """The inverse of :meth:`to_dict`."""
        return cls(patch_size=tuple(int(side) for side in data["patch_size"]), batch_size=int(data["batch_size"]),
                   depth=int(data["depth"]), estimated_mb=float(data["estimated_mb"]))


def estimate_training_mb(patch_size: Sequence[int], batch_size: int, depth: int, num_channels: int,
                         num_classes: int, base_filters: int = 16) -> float:
    """Approximate memory (MB) of the activations of one training step of a 3D U-Net (module docstring)."""
    voxels = math.prod(int(side) for side in patch_size)
    maps = 0.0
    for level in range(depth + 1):
        # The bottleneck has no decoder half: its one block keeps about 6 of the maps.
        share = 6.0 / 15.0 if level == depth else 1.0
        maps += share * MAPS_PER_LEVEL * base_filters * 2**level * voxels / 8**level
    maps += voxels * (num_channels + OUTPUT_MAPS_PER_CLASS * num_classes)
    return maps * _BYTES_PER_VALUE * batch_size / 2**20


def _depth_for(patch: Sequence[int], max_depth: int) -> int:
    smallest, depth = min(patch), 0
    while depth < max_depth and smallest / 2 ** (depth + 1) >= _MIN_BOTTLENECK:
        depth += 1
    return max(1, depth)


def _fit_depth(patch: list[int], max_depth: int) -> tuple[int, list[int]]:
    """The depth for ``patch`` and ``patch`` rounded up to multiples of ``2 ** depth``, consistent with each
    other (rounding up can allow one more pooling, which can ask for more rounding)."""
    while True:
        depth = _depth_for(patch, max_depth)
        step = 2**depth
        rounded = [math.ceil(side / step) * step for side in patch]
        if rounded == patch:
            return depth, patch
        patch = rounded


def plan_3d(median_shape: Sequence[float], target_spacing: Sequence[float], num_channels: int, num_classes: int,
            memory_mb: float, base_filters: int = 16, max_depth: int = 5,
            max_patch_voxels: int = 128**3) -> Plan3D:
    """Plan patch size, depth and batch size for volumes of ``median_shape`` voxels at ``target_spacing`` mm.

    ``median_shape``: the training volumes' median shape after resampling to ``target_spacing``.
    ``memory_mb``: the budget for one training step (activations, as :func:`estimate_training_mb` counts them).
    The rules are the module docstring's; the result depends on the arguments alone. A ValueError when not
    even the smallest patch fits the budget at batch size 2.
    """
    if len(median_shape) != 3 or len(target_spacing) != 3:
        raise ValueError(f"median_shape {tuple(median_shape)} and target_spacing {tuple(target_spacing)} "
                         f"need 3 entries each")
    if any(float(side) <= 0 for side in median_shape) or any(float(s) <= 0 for s in target_spacing):
        raise ValueError(f"median_shape {tuple(median_shape)} and target_spacing {tuple(target_spacing)} "
                         f"must be positive")
    if num_channels < 1 or num_classes < 1 or base_filters < 1 or max_depth < 1 or max_patch_voxels < 1:
        raise ValueError("num_channels, num_classes, base_filters, max_depth and max_patch_voxels must be positive")
    if not memory_mb > 0:
        raise ValueError(f"memory_mb must be positive, got {memory_mb}")
    spacing = [float(s) for s in target_spacing]

    def estimate(patch, depth, batch):
        return estimate_training_mb(patch, batch, depth, num_channels, num_classes, base_filters)

    depth, patch = _fit_depth([max(1, int(round(float(side)))) for side in median_shape], max_depth)
    while math.prod(patch) > max_patch_voxels or estimate(patch, depth, _MIN_BATCH) > memory_mb:
        step = 2**depth
        shrinkable = [axis for axis in range(3) if patch[axis] - step >= _MIN_SIDE]
        if not shrinkable:
            raise ValueError(f"memory_mb {memory_mb:g} MB cannot hold one training step of batch size "
                             f"{_MIN_BATCH} even for a {'x'.join(map(str, patch))} patch (about "
                             f"{estimate(patch, depth, _MIN_BATCH):.0f} MB); raise the budget or lower "
                             f"base_filters")
        axis = max(shrinkable, key=lambda a: patch[a] * spacing[a])  # the first of equals on a tie
        patch[axis] -= step
        depth, patch = _fit_depth(patch, max_depth)
    return plan_for_patch(patch, num_channels, num_classes, memory_mb, base_filters, depth=depth)


def plan_for_patch(patch_size: Sequence[int], num_channels: int, num_classes: int, memory_mb: float,
                   base_filters: int = 16, depth: Optional[int] = None, max_depth: int = 5) -> Plan3D:
    """The plan for a given patch size: ``depth`` (None: the most levels, up to ``max_depth``, that halve every
    side evenly and keep 4 voxels at the bottleneck) and the largest batch (2 to 8) within ``memory_mb``.

    A ValueError names the problem when ``depth`` does not halve every side evenly.
    """
    patch = [int(side) for side in patch_size]
    if depth is None:
        depth = _depth_for(patch, max_depth)
        while depth > 1 and any(side % 2**depth for side in patch):
            depth -= 1
    if any(side % 2**depth for side in patch):
        raise ValueError(f"a patch of {'x'.join(map(str, patch))} cannot be halved {depth} times: every side "
                         f"must be divisible by {2**depth}")
    per_sample = estimate_training_mb(patch, 1, depth, num_channels, num_classes, base_filters)
    batch = min(_MAX_BATCH, max(_MIN_BATCH, int(memory_mb // per_sample)))
    return Plan3D(patch_size=tuple(patch), batch_size=batch, depth=depth,
                  estimated_mb=estimate_training_mb(patch, batch, depth, num_channels, num_classes, base_filters))


def describe(plan: Plan3D) -> str:
    """One line for logs, e.g. ``patch 40x56x40, depth 3 (bottleneck 5x7x5), batch 8, ~600 MB per step``."""
    bottleneck = "x".join(str(side // 2**plan.depth) for side in plan.patch_size)
    return (f"patch {'x'.join(map(str, plan.patch_size))}, depth {plan.depth} (bottleneck {bottleneck}), "
            f"batch {plan.batch_size}, ~{plan.estimated_mb:.0f} MB per training step")
