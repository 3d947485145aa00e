"""Synthetic L3-level axial CT slices with skeletal-muscle masks: the embedded demo dataset.

No binary data is committed to the repository; this module makes the demo dataset instead. Each slice is
an axial CT image in Hounsfield units (HU) at the level of the third lumbar vertebra, the level at which
body composition (skeletal muscle area, muscle attenuation) is usually measured, together with a binary
mask of the skeletal muscle a segmentation model should learn.

A slice is drawn in two steps. First a tissue map is painted in millimetres in a body-centred frame
(``u`` to the patient's left, which is image right; ``v`` towards the back, which is image down):

- the body outline, an ellipse with a flatter back, random size, aspect, rotation and offset;
- skin and subcutaneous fat whose thickness varies around the body and between slices;
- the abdominal wall muscles (rectus abdominis either side of the linea alba, the three oblique layers
  with thin fat planes between them, latissimus dorsi posterolaterally);
- the psoas muscles beside the vertebral body, the quadratus lumborum at the tips of the transverse
  processes and the paraspinal (erector spinae and multifidus) groups behind the laminae;
- the vertebra: body, pedicles, laminae, transverse and spinous processes, with a cortical rim around
  cancellous bone, and the spinal canal;
- retroperitoneal organs (aorta, inferior vena cava, lower poles of the kidneys) and, inside the
  peritoneal cavity, colon and small-bowel loops filled with gas, fluid, faeces or oral contrast, an
  occasional liver tip and mesenteric vessels, all in visceral fat.

Second, the tissue map is rendered to HU with per-slice tissue values (including intravenous contrast
phases), textures, partial-volume smoothing and correlated noise. The mask is 1 on skeletal muscle
pixels and 0 elsewhere; fat inside and between muscles is excluded, as in manual L3 annotations.

Slices are 512 x 512 by default on a fixed 400 mm field of view (0.78 mm pixels at 512), so the muscle
area in cm^2 of a mask is ``mask.sum() * pixel_spacing_mm(size) ** 2 / 100``.

Command line::

    python -m segmenter.demo_data OUTPUT_DIR [--num-slices N] [--size S] [--seed K] [--overwrite]
"""
from __future__ import annotations

import argparse
import enum
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from segmenter.artifacts import atomic_directory, write_json_atomic, write_text_atomic
from segmenter.errors import InputError

FIELD_OF_VIEW_MM = 400.0
"""Width of the square reconstruction field of view of every slice, whatever its size in pixels."""

HU_MIN, HU_MAX = -1024, 3071
"""The range of 12-bit CT numbers; every value is an integer in it, so it fits an int16."""

GENERATOR_VERSION = 1
"""Bump whenever the generator draws different slices for the same seed, so old datasets are redone."""

PARAMETERS_FILE_NAME = "demo_parameters.json"
MINIMUM_SIZE = 32


class Tissue(enum.IntEnum):
    """Labels of the internal tissue map; only ``MUSCLE`` becomes 1 in the mask."""

    AIR = 0
    SKIN = 1
    FAT = 2
    MUSCLE = 3
    INTRAMUSCULAR_FAT = 4
    BOWEL_WALL = 5
    BOWEL_GAS = 6
    BOWEL_FLUID = 7
    ORAL_CONTRAST = 8
    FAECES = 9
    LIVER = 10
    KIDNEY = 11
    AORTA = 12
    VENA_CAVA = 13
    MESENTERIC_VESSEL = 14
    CALCIFICATION = 15
    CANCELLOUS_BONE = 16
    CORTICAL_BONE = 17
    THECAL_SAC = 18


def pixel_spacing_mm(size: int) -> float:
    """Return the pixel spacing in millimetres of a generated ``size`` x ``size`` slice."""
    return FIELD_OF_VIEW_MM / size


# --------------------------------------------------------------------------------------------------
# Geometry: a body-centred frame in millimetres and shapes drawn in it.
# --------------------------------------------------------------------------------------------------


class _BodyFrame:
    """Millimetre coordinates ``u`` (patient left) and ``v`` (posterior) of every pixel of a slice.

    The frame is centred on the body centre and rotated with the body, so anatomy placed in it follows
    the per-slice rotation and offset. Shapes are evaluated only in a square window around them, which
    keeps a slice with dozens of bowel loops fast.
    """

    def __init__(
        self,
        size: int,
        centre_mm: tuple[float, float],
        rotation_deg: float,
        displacement_mm: Optional[tuple[np.ndarray, np.ndarray]] = None,
    ):
        self.size = size
        self.spacing = pixel_spacing_mm(size)
        self.max_displacement_mm = 0.0 if displacement_mm is None else float(
            max(np.abs(displacement_mm[0]).max(), np.abs(displacement_mm[1]).max())
        )
        self.centre_x, self.centre_y = centre_mm
        angle = math.radians(rotation_deg)
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        # Pixel centres relative to the image centre, x to the right and y downwards.
        coordinates = ((np.arange(size) + 0.5 - size / 2) * self.spacing).astype(np.float32)
        x = coordinates[None, :] - np.float32(self.centre_x)
        y = coordinates[:, None] - np.float32(self.centre_y)
        self.u = self.cos * x + self.sin * y
        self.v = -self.sin * x + self.cos * y
        # The unwarped coordinates draw smooth outlines: the skin and the layers that follow it.
        self.rigid_u, self.rigid_v = self.u, self.v
        if displacement_mm is not None:
            # Shapes are drawn on slightly warped coordinates, so no outline is a perfect ellipse.
            self.u = self.u + displacement_mm[0]
            self.v = self.v + displacement_mm[1]

    def _window(self, centre: tuple[float, float], radius_mm: float) -> tuple[slice, slice]:
        centre_u, centre_v = centre
        x = self.cos * centre_u - self.sin * centre_v + self.centre_x
        y = self.sin * centre_u + self.cos * centre_v + self.centre_y
        column = x / self.spacing + self.size / 2 - 0.5
        row = y / self.spacing + self.size / 2 - 0.5
        reach = (radius_mm + self.max_displacement_mm) / self.spacing + 2
        rows = slice(max(0, int(row - reach)), max(0, min(self.size, int(row + reach) + 2)))
        columns = slice(max(0, int(column - reach)), max(0, min(self.size, int(column + reach) + 2)))
        return rows, columns

    def ellipse(
        self, centre: tuple[float, float], semi_axes: tuple[float, float], angle_deg: float = 0.0
    ) -> np.ndarray:
        """Boolean mask of an ellipse; ``semi_axes`` are along ``u`` and ``v`` before rotating it."""
        inside = np.zeros((self.size, self.size), dtype=bool)
        window = self._window(centre, max(semi_axes))
        du = self.u[window] - centre[0]
        dv = self.v[window] - centre[1]
        angle = math.radians(angle_deg)
        along = math.cos(angle) * du + math.sin(angle) * dv
        across = -math.sin(angle) * du + math.cos(angle) * dv
        inside[window] = (along / semi_axes[0]) ** 2 + (across / semi_axes[1]) ** 2 <= 1.0
        return inside

    def capsule(self, start: tuple[float, float], end: tuple[float, float], radius: float) -> np.ndarray:
        """Boolean mask of the points within ``radius`` of the segment from ``start`` to ``end``."""
        inside = np.zeros((self.size, self.size), dtype=bool)
        middle = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
        half_length = math.hypot(end[0] - start[0], end[1] - start[1]) / 2
        window = self._window(middle, half_length + radius)
        du = self.u[window] - start[0]
        dv = self.v[window] - start[1]
        segment_u, segment_v = end[0] - start[0], end[1] - start[1]
        fraction = np.clip((du * segment_u + dv * segment_v) / max(4 * half_length**2, 1e-9), 0.0, 1.0)
        inside[window] = (du - fraction * segment_u) ** 2 + (dv - fraction * segment_v) ** 2 <= radius**2
        return inside


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Gaussian-smoothed white noise, ``size`` x ``size``, with zero mean and unit variance (roughly)."""
    # Fields smoother than a couple of pixels are drawn on a coarser grid and interpolated up: they
    # look the same and cost a fraction of the time. The variance is fixed on the coarse grid, which
    # interpolation lowers slightly; the amplitudes are tuned by eye anyway.
    factor = max(1, int(sigma_px // 2))
    coarse_size = -(-size // factor)
    field = ndimage.gaussian_filter(
        rng.standard_normal((coarse_size, coarse_size), dtype=np.float32), sigma_px / factor, truncate=3.0
    )
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    if factor > 1:
        # Nearest-neighbour upsampling followed by a box filter of the same width is linear
        # interpolation, at half the cost of ndimage.zoom.
        field = np.repeat(np.repeat(field, factor, axis=0), factor, axis=1)[:size, :size]
        field = ndimage.uniform_filter(field, size=factor)
    return field


# --------------------------------------------------------------------------------------------------
# The tissue map.
# --------------------------------------------------------------------------------------------------


def _paint_tissue_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one L3 anatomy and return its tissue map, ``Tissue`` values as uint8, shape (size, size)."""
    spacing = pixel_spacing_mm(size)
    # Body habitus: adiposity drives subcutaneous and visceral fat, muscularity the muscle sizes.
    adiposity = float(rng.beta(1.6, 1.8))
    muscularity = float(rng.uniform(0.8, 1.25))
    skin_thickness = max(float(rng.uniform(1.5, 2.5)), spacing)
    fat_lateral = float(rng.uniform(6, 12) + 32 * adiposity)
    fat_anterior = float(rng.uniform(6, 14) + 38 * adiposity)
    fat_posterior = float(rng.uniform(5, 10) + 26 * adiposity)
    half_width = min(float(rng.uniform(118, 150)) * (0.9 + 0.1 * muscularity) + fat_lateral, 178.0)
    # Visceral fat pushes the belly forwards; the caps keep every body inside the field of view.
    half_depth_anterior = min(float(rng.uniform(75, 100) + fat_anterior + 25 * adiposity), 175.0)
    half_depth_posterior = float(rng.uniform(72, 88) * (0.92 + 0.08 * muscularity) + fat_posterior)
    # Patients lie on their back, so the back is flatter than the belly.
    back_flatness = float(rng.uniform(2.4, 3.4))

    # Centre the body's extent (not its centre, which is nearer the back) in the field of view, then
    # shift it a little as patients are never positioned exactly.
    half_extent = max(half_width, (half_depth_anterior + half_depth_posterior) / 2)
    offset_limit = float(np.clip(0.5 * FIELD_OF_VIEW_MM - half_extent - 10, 0.0, 15.0))
    centre = (
        float(rng.uniform(-offset_limit, offset_limit)),
        (half_depth_anterior - half_depth_posterior) / 2 + float(rng.uniform(-offset_limit, offset_limit)),
    )
    displacement = tuple(
        3.0 * _smooth_noise(rng, size, sigma_px=20.0 / spacing)
        + 1.0 * _smooth_noise(rng, size, sigma_px=5.0 / spacing)
        for _ in range(2)
    )
    frame = _BodyFrame(size, centre, rotation_deg=float(rng.uniform(-8, 8)), displacement_mm=displacement)
    u, v = frame.rigid_u, frame.rigid_v

    # Body outline: normalised radius below a slightly wavy boundary.
    polar_angle = np.arctan2(v, u)
    semi_depth = np.where(v < 0, np.float32(half_depth_anterior), np.float32(half_depth_posterior))
    exponent = np.where(v < 0, np.float32(2.0), np.float32(back_flatness))
    normalised_radius = (np.abs(u / half_width) ** exponent + np.abs(v / semi_depth) ** exponent) ** (
        1.0 / exponent
    )
    boundary = np.ones_like(u)
    for harmonic in range(2, 6):
        amplitude = float(rng.normal(0.0, 0.012))
        phase = float(rng.uniform(0, 2 * np.pi))
        boundary += amplitude * np.cos(harmonic * polar_angle + phase)
    body = normalised_radius <= boundary

    tissue = np.full((size, size), Tissue.AIR, dtype=np.uint8)
    tissue[body] = Tissue.FAT
    depth = ndimage.distance_transform_edt(body).astype(np.float32) * np.float32(spacing)
    tissue[body & (depth < skin_thickness)] = Tissue.SKIN

    # Angle from the posterior midline: 0 at the spine, 90 at the flanks, 180 at the navel.
    angle_from_back = np.degrees(np.arctan2(np.abs(u), v))
    fat_thickness = np.interp(angle_from_back, [0, 90, 180], [fat_posterior, fat_lateral, fat_anterior])
    fat_thickness *= 1 + 0.12 * np.cos(2 * polar_angle + rng.uniform(0, 2 * np.pi))
    muscle_boundary_depth = (skin_thickness + fat_thickness).astype(np.float32)
    inside_fascia = depth >= muscle_boundary_depth

    # Abdominal wall thickness by angle: none behind the spine (the paraspinals are drawn there), thin
    # latissimus posterolaterally, the three oblique layers at the flanks, thinning at the linea
    # semilunaris and thick again over the rectus abdominis.
    oblique = float(rng.uniform(11, 19)) * muscularity
    rectus = float(rng.uniform(8, 13)) * muscularity
    latissimus = float(rng.uniform(4, 8)) * muscularity
    wall_thickness = np.interp(
        angle_from_back,
        [0, 28, 42, 68, 132, 148, 156, 164, 180],
        [0, 0, latissimus, oblique, oblique, 0.6 * oblique, 2.0, rectus, rectus],
    ).astype(np.float32)
    wall_depth = depth - muscle_boundary_depth
    abdominal_wall = inside_fascia & (wall_depth < wall_thickness)
    peritoneal_cavity = inside_fascia & ~abdominal_wall
    preperitoneal_fat = float(rng.uniform(2, 6))
    deep_cavity = peritoneal_cavity & (wall_depth > wall_thickness + preperitoneal_fat)

    # Spine, placed from the back inwards so it sits behind the body centre as at L3.
    # The back muscle surface is measured on the midline, where the outline's waves have moved it.
    midline = inside_fascia & (np.abs(u) < max(2.0, spacing)) & (v > 0)
    back_muscle_surface = float(v[midline].max()) if midline.any() else half_depth_posterior - fat_posterior
    vertebral_half_width = float(rng.uniform(21, 26))
    vertebral_half_depth = float(rng.uniform(14.5, 18))
    canal_half_width = float(rng.uniform(9, 12))
    canal_half_depth = float(rng.uniform(6.5, 8.5))
    lamina_thickness = float(rng.uniform(5, 7))
    spinous_length = float(rng.uniform(22, 30))
    spinous_half_width = float(rng.uniform(2.8, 4.2))
    spinous_tip = back_muscle_surface - float(rng.uniform(3, 9))
    lamina_back = spinous_tip - spinous_length
    canal_centre = lamina_back - lamina_thickness - canal_half_depth
    vertebral_centre = canal_centre - canal_half_depth - vertebral_half_depth + 1.0
    vertebral_front = vertebral_centre - vertebral_half_depth
    transverse_reach = vertebral_half_width + float(rng.uniform(20, 28))

    psoas_half_width = float(rng.uniform(13, 19)) * muscularity
    psoas_half_depth = float(rng.uniform(14, 20)) * muscularity
    psoas_centre_u = vertebral_half_width + 0.7 * psoas_half_width
    psoas_centre_v = vertebral_centre + float(rng.uniform(-5, 3))
    paraspinal_half_width = float(rng.uniform(24, 33)) * muscularity
    paraspinal_front = canal_centre - 2.0
    paraspinal_back = back_muscle_surface + 20.0
    kidney_semi_axes = (float(rng.uniform(17, 27)), float(rng.uniform(12, 19)))

    # Muscle groups are separated by thin fascial fat planes: each group is drawn only outside the
    # slightly grown outlines of the groups drawn before it.
    fascia_gap = max(1.2, 0.8 * spacing)
    muscle = np.zeros((size, size), dtype=bool)
    claimed = np.zeros((size, size), dtype=bool)
    retroperitoneum = np.zeros((size, size), dtype=bool)  # where bowel loops may not go
    organs: list[tuple[np.ndarray, Tissue]] = []

    def add_muscle(centre, semi_axes, angle_deg, within=None):
        nonlocal muscle, claimed
        group = frame.ellipse(centre, semi_axes, angle_deg) & ~claimed
        if within is not None:
            group &= within
        muscle |= group
        claimed |= frame.ellipse(centre, (semi_axes[0] + fascia_gap, semi_axes[1] + fascia_gap), angle_deg)

    for side in (-1.0, 1.0):
        paraspinal_centre = (
            side * (spinous_half_width + fascia_gap + 0.9 * paraspinal_half_width),
            (paraspinal_front + paraspinal_back) / 2,
        )
        add_muscle(
            paraspinal_centre,
            (paraspinal_half_width, (paraspinal_back - paraspinal_front) / 2),
            side * float(rng.uniform(-4, 10)),
            within=inside_fascia,
        )
        add_muscle(
            (side * psoas_centre_u, psoas_centre_v),
            (psoas_half_width, psoas_half_depth),
            side * float(rng.uniform(10, 30)),
        )
        quadratus_centre = (
            side * (transverse_reach + float(rng.uniform(0, 6))),
            canal_centre + float(rng.uniform(0, 8)),
        )
        add_muscle(
            quadratus_centre,
            (float(rng.uniform(8, 12)) * muscularity, float(rng.uniform(15, 21)) * muscularity),
            -side * float(rng.uniform(15, 35)),
        )
        retroperitoneum |= frame.ellipse(
            (side * psoas_centre_u, psoas_centre_v), (psoas_half_width + 6, psoas_half_depth + 6)
        )
        retroperitoneum |= frame.ellipse(quadratus_centre, (18, 26))
        if rng.random() < 0.7:
            kidney_centre = (
                side * (psoas_centre_u + psoas_half_width + kidney_semi_axes[0] + float(rng.uniform(-2, 8))),
                psoas_centre_v + float(rng.uniform(-6, 6)),
            )
            kidney_angle = -side * float(rng.uniform(25, 55))
            kidney = frame.ellipse(kidney_centre, kidney_semi_axes, kidney_angle) & inside_fascia
            organs.append((kidney, Tissue.KIDNEY))
            if rng.random() < 0.5:
                sinus_centre = (kidney_centre[0] - side * 0.45 * kidney_semi_axes[0], kidney_centre[1] - 3)
                sinus_axes = (0.45 * kidney_semi_axes[0], 0.35 * kidney_semi_axes[1])
                organs.append((frame.ellipse(sinus_centre, sinus_axes, kidney_angle) & kidney, Tissue.FAT))
            retroperitoneum |= frame.ellipse(
                kidney_centre, (kidney_semi_axes[0] + 6, kidney_semi_axes[1] + 6), kidney_angle
            )

    aorta_radius = float(rng.uniform(8, 12))
    aorta_centre = (float(rng.uniform(3, 12)), vertebral_front - aorta_radius - float(rng.uniform(1, 4)))
    vena_cava_axes = (float(rng.uniform(10, 14)), float(rng.uniform(6, 10)))
    vena_cava_centre = (-float(rng.uniform(16, 26)), vertebral_front - vena_cava_axes[1] - float(rng.uniform(0, 4)))
    organs.append((frame.ellipse(aorta_centre, (aorta_radius, aorta_radius)), Tissue.AORTA))
    organs.append((frame.ellipse(vena_cava_centre, vena_cava_axes), Tissue.VENA_CAVA))
    if rng.random() < 0.35:
        for _ in range(int(rng.integers(1, 4))):
            angle = rng.uniform(0, 2 * np.pi)
            spot = (aorta_centre[0] + aorta_radius * math.cos(angle), aorta_centre[1] + aorta_radius * math.sin(angle))
            organs.append((frame.ellipse(spot, (1.6, 1.1), math.degrees(angle) + 90), Tissue.CALCIFICATION))
    retroperitoneum |= frame.ellipse(aorta_centre, (aorta_radius + 5, aorta_radius + 5))
    retroperitoneum |= frame.ellipse(vena_cava_centre, (vena_cava_axes[0] + 5, vena_cava_axes[1] + 5))
    retroperitoneum |= frame.ellipse(
        (0.0, vertebral_centre), (vertebral_half_width + 10, vertebral_half_depth + 6)
    )
    retroperitoneum |= v > canal_centre

    intraperitoneal = deep_cavity & ~retroperitoneum
    tissue[inside_fascia] = Tissue.FAT
    _paint_bowel_and_mesentery(rng, frame, tissue, intraperitoneal, adiposity, half_width - fat_lateral)
    for region, label in organs:
        tissue[region] = label

    # Muscle goes on top of the viscera; the fat planes inside it are carved out afterwards.
    muscle |= abdominal_wall & ~claimed
    tissue[muscle] = Tissue.MUSCLE
    oblique_fat_planes = (
        abdominal_wall
        & (angle_from_back > 62)
        & (angle_from_back < 142)
        & ((np.abs(wall_depth - 0.3 * wall_thickness) < 0.6) | (np.abs(wall_depth - 0.64 * wall_thickness) < 0.5))
    )
    if spacing > 1.5:
        # Planes this thin would only punch scattered holes into the wall of a coarse image.
        oblique_fat_planes[:] = False
    linea_alba = abdominal_wall & (v < 0) & (np.abs(u) < float(rng.uniform(2, 9)))
    tissue[(oblique_fat_planes | linea_alba) & muscle] = Tissue.FAT

    _paint_vertebra(
        frame,
        tissue,
        vertebral_centre=vertebral_centre,
        vertebral_half_width=vertebral_half_width,
        vertebral_half_depth=vertebral_half_depth,
        canal_centre=canal_centre,
        canal_half_width=canal_half_width,
        canal_half_depth=canal_half_depth,
        lamina_thickness=lamina_thickness,
        spinous_tip=spinous_tip,
        spinous_half_width=spinous_half_width,
        transverse_reach=transverse_reach,
        transverse_half_width=float(rng.uniform(3.0, 4.2)),
    )

    # Intramuscular fat: small streaks, more of them in older, less muscular patients (myosteatosis).
    muscle_now = tissue == Tissue.MUSCLE
    fat_fraction = float(rng.uniform(0.0, 0.03))
    if fat_fraction > 0.003 and muscle_now.any():
        streaks = _smooth_noise(rng, size, sigma_px=max(1.2 / spacing, 0.8))
        threshold = np.quantile(streaks[muscle_now], 1.0 - fat_fraction)
        tissue[muscle_now & (streaks > threshold)] = Tissue.INTRAMUSCULAR_FAT
    return tissue


def _paint_bowel_and_mesentery(
    rng: np.random.Generator,
    frame: _BodyFrame,
    tissue: np.ndarray,
    intraperitoneal: np.ndarray,
    adiposity: float,
    cavity_half_width: float,
) -> None:
    """Paint colon, small-bowel loops, an occasional liver tip and mesenteric vessels into the cavity."""
    oral_contrast = rng.random() < 0.3
    if rng.random() < 0.35:
        liver_tip = frame.ellipse(
            (-0.75 * cavity_half_width, float(rng.uniform(-40, 0))),
            (float(rng.uniform(25, 45)), float(rng.uniform(30, 50))),
            angle_deg=float(rng.uniform(-30, 30)),
        )
        tissue[liver_tip & intraperitoneal] = Tissue.LIVER

    def paint_loop(centre, semi_axes, angle, wall, contents):
        outer = frame.ellipse(centre, semi_axes, angle) & intraperitoneal
        inner = frame.ellipse(centre, (semi_axes[0] - wall, semi_axes[1] - wall), angle) & outer
        tissue[outer] = Tissue.BOWEL_WALL
        if contents == Tissue.BOWEL_GAS and rng.random() < 0.5:
            # An air-fluid level: gas rises to the front of a supine patient.
            level = centre[1] + float(rng.uniform(-0.3, 0.5)) * semi_axes[1]
            tissue[inner & (frame.v < level)] = Tissue.BOWEL_GAS
            tissue[inner & (frame.v >= level)] = Tissue.ORAL_CONTRAST if oral_contrast else Tissue.BOWEL_FLUID
        else:
            tissue[inner] = contents
        return int(outer.sum())

    # Ascending colon on the patient's right (image left), descending colon on the left.
    for side, radius_range in ((-1.0, (15, 24)), (1.0, (10, 17))):
        if rng.random() < 0.9:
            radius = float(rng.uniform(*radius_range))
            centre = (side * (cavity_half_width - radius - float(rng.uniform(8, 20))), float(rng.uniform(-25, 20)))
            contents = Tissue.FAECES if rng.random() < 0.65 else Tissue.BOWEL_GAS
            paint_loop(centre, (radius, radius * float(rng.uniform(0.8, 1.1))), 0.0, 2.0, contents)

    # Small bowel: loops until a target share of the free cavity is covered; lean patients have less
    # visceral fat between their loops.
    available = int(intraperitoneal.sum())
    target = available * float(np.clip(rng.uniform(0.55, 0.85) - 0.35 * adiposity, 0.2, 0.85))
    covered = 0
    for _ in range(80):
        if covered >= target:
            break
        free = np.flatnonzero(intraperitoneal & (tissue == Tissue.FAT))
        if free.size == 0:
            break
        pick = int(free[rng.integers(free.size)])
        centre = (float(frame.u.flat[pick]), float(frame.v.flat[pick]))
        radius = float(rng.uniform(7, 15))
        semi_axes = (radius, radius * float(rng.uniform(0.55, 1.0)))
        draw = rng.random()
        if draw < 0.3:
            contents = Tissue.BOWEL_GAS
        elif draw < 0.65 and oral_contrast:
            contents = Tissue.ORAL_CONTRAST
        else:
            contents = Tissue.BOWEL_FLUID
        covered += paint_loop(centre, semi_axes, float(rng.uniform(0, 180)), float(rng.uniform(1.5, 3.0)), contents)

    # Mesenteric vessels: small round vessels in the fat at the root of the mesentery.
    for _ in range(int(rng.integers(4, 14))):
        centre = (float(rng.uniform(-60, 60)), float(rng.uniform(-70, 0)))
        radius = float(rng.uniform(1.5, 3.5))
        vessel = frame.ellipse(centre, (radius, radius)) & intraperitoneal & (tissue == Tissue.FAT)
        tissue[vessel] = Tissue.MESENTERIC_VESSEL


def _paint_vertebra(
    frame: _BodyFrame,
    tissue: np.ndarray,
    *,
    vertebral_centre: float,
    vertebral_half_width: float,
    vertebral_half_depth: float,
    canal_centre: float,
    canal_half_width: float,
    canal_half_depth: float,
    lamina_thickness: float,
    spinous_tip: float,
    spinous_half_width: float,
    transverse_reach: float,
    transverse_half_width: float,
) -> None:
    """Paint the L3 vertebra (cortex around cancellous bone) and its spinal canal."""
    body = frame.ellipse((0.0, vertebral_centre), (vertebral_half_width, vertebral_half_depth))
    # The back of the vertebral body is flat to slightly concave where it faces the canal.
    body &= ~frame.ellipse((0.0, canal_centre + 2.0), (canal_half_width * 1.05, canal_half_depth + 1.0))
    arch_radius = (canal_half_width + lamina_thickness, canal_half_depth + lamina_thickness)
    arch = frame.ellipse((0.0, canal_centre), arch_radius) & (frame.v > vertebral_centre + 0.5 * vertebral_half_depth)
    processes = frame.capsule((0.0, canal_centre + canal_half_depth), (0.0, spinous_tip), spinous_half_width)
    for side in (-1.0, 1.0):
        pedicle_u = side * (canal_half_width + 0.5 * lamina_thickness)
        processes |= frame.capsule(
            (pedicle_u, canal_centre), (side * transverse_reach, canal_centre + 3.0), transverse_half_width
        )
    posterior_elements = (arch | processes) & ~body
    canal = frame.ellipse((0.0, canal_centre), (canal_half_width, canal_half_depth))
    bone = (body | posterior_elements) & ~canal

    # Only the vertebral body has a wide cancellous core; the thin posterior elements are mostly cortex.
    cortex_px = max(1, int(round(1.6 / frame.spacing)))
    cancellous = ndimage.binary_erosion(body & ~canal, iterations=cortex_px)
    tissue[bone] = Tissue.CORTICAL_BONE
    tissue[cancellous] = Tissue.CANCELLOUS_BONE
    tissue[canal] = Tissue.FAT  # epidural fat around the thecal sac
    thecal_sac = frame.ellipse((0.0, canal_centre), (0.75 * canal_half_width, 0.8 * canal_half_depth))
    tissue[thecal_sac] = Tissue.THECAL_SAC


# --------------------------------------------------------------------------------------------------
# Rendering the tissue map to Hounsfield units.
# --------------------------------------------------------------------------------------------------


def _tissue_hounsfield_values(rng: np.random.Generator) -> np.ndarray:
    """Per-slice mean HU of every tissue, including the intravenous contrast phase."""
    phase = rng.choice(["unenhanced", "portal_venous", "arterial"], p=[0.35, 0.5, 0.15])
    values = np.zeros(len(Tissue), dtype=np.float32)
    values[Tissue.AIR] = -1000.0
    values[Tissue.SKIN] = rng.uniform(20, 50)
    values[Tissue.FAT] = rng.uniform(-115, -90)
    values[Tissue.MUSCLE] = rng.uniform(36, 58)
    values[Tissue.INTRAMUSCULAR_FAT] = rng.uniform(-90, -60)
    values[Tissue.BOWEL_GAS] = rng.uniform(-960, -880)
    values[Tissue.BOWEL_FLUID] = rng.uniform(0, 20)
    values[Tissue.ORAL_CONTRAST] = rng.uniform(180, 350)
    values[Tissue.FAECES] = rng.uniform(-20, 30)
    values[Tissue.CALCIFICATION] = rng.uniform(450, 900)
    values[Tissue.CANCELLOUS_BONE] = rng.uniform(160, 280)
    values[Tissue.CORTICAL_BONE] = rng.uniform(650, 950)
    values[Tissue.THECAL_SAC] = rng.uniform(5, 20)
    blood = rng.uniform(35, 50)
    if phase == "unenhanced":
        values[[Tissue.AORTA, Tissue.VENA_CAVA, Tissue.MESENTERIC_VESSEL]] = blood
        values[Tissue.KIDNEY] = rng.uniform(25, 40)
        values[Tissue.LIVER] = rng.uniform(50, 65)
        values[Tissue.BOWEL_WALL] = rng.uniform(30, 45)
    elif phase == "portal_venous":
        values[Tissue.AORTA] = rng.uniform(130, 190)
        values[Tissue.VENA_CAVA] = rng.uniform(110, 160)
        values[Tissue.MESENTERIC_VESSEL] = rng.uniform(120, 170)
        values[Tissue.KIDNEY] = rng.uniform(150, 200)
        values[Tissue.LIVER] = rng.uniform(100, 130)
        values[Tissue.BOWEL_WALL] = rng.uniform(50, 80)
    else:
        values[Tissue.AORTA] = rng.uniform(250, 380)
        values[Tissue.VENA_CAVA] = rng.uniform(60, 90)
        values[Tissue.MESENTERIC_VESSEL] = rng.uniform(200, 300)
        values[Tissue.KIDNEY] = rng.uniform(130, 190)
        values[Tissue.LIVER] = rng.uniform(65, 85)
        values[Tissue.BOWEL_WALL] = rng.uniform(50, 80)
    return values


def _render_hounsfield(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """Turn a tissue map into an integer-valued float32 HU image with texture, blur and noise."""
    size = tissue.shape[0]
    spacing = pixel_spacing_mm(size)
    image = _tissue_hounsfield_values(rng)[tissue]

    # Textures, with correlation lengths in millimetres so they look alike at every image size.
    is_fat = tissue == Tissue.FAT
    septa = np.abs(_smooth_noise(rng, size, sigma_px=3.0 / spacing)) < 0.06
    image += np.where(is_fat, 4.0 * _smooth_noise(rng, size, sigma_px=4.0 / spacing), 0.0).astype(np.float32)
    image[is_fat & septa] += 45.0
    is_muscle = tissue == Tissue.MUSCLE
    image[is_muscle] += 6.0 * _smooth_noise(rng, size, sigma_px=1.0 / spacing)[is_muscle]
    is_cancellous = tissue == Tissue.CANCELLOUS_BONE
    image[is_cancellous] += 35.0 * _smooth_noise(rng, size, sigma_px=0.8 / spacing)[is_cancellous]
    is_faeces = tissue == Tissue.FAECES
    if is_faeces.any():
        bubbles = _smooth_noise(rng, size, sigma_px=1.5 / spacing) > 0.6
        image[is_faeces & bubbles] = -850.0
    is_organ = np.isin(tissue, [Tissue.LIVER, Tissue.KIDNEY, Tissue.BOWEL_FLUID])
    image[is_organ] += 4.0 * _smooth_noise(rng, size, sigma_px=2.0 / spacing)[is_organ]

    # Partial-volume blur of the reconstruction, then noise that is correlated over about half a
    # millimetre as filtered back projection makes it. Both are set in millimetres so that a coarse
    # slice is not blurred over centimetres.
    blur_mm = float(rng.uniform(0.4, 0.6))
    noise_sigma = float(rng.uniform(10, 20))
    noise_correlation_px = 0.55 / spacing
    if blur_mm / spacing > 0.2:
        image = ndimage.gaussian_filter(image, sigma=blur_mm / spacing)
    if noise_correlation_px > 0.2:
        image += noise_sigma * _smooth_noise(rng, size, sigma_px=noise_correlation_px)
    else:
        image += noise_sigma * rng.standard_normal((size, size), dtype=np.float32)
    return np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------


def generate_l3_slice(rng: np.random.Generator, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic axial CT slice at L3 and its skeletal-muscle mask.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of every random choice; the same generator state gives the same slice.
    size : int, optional
        Rows and columns of the square slice (at least 32). The field of view is always
        ``FIELD_OF_VIEW_MM``, so the pixel spacing is ``pixel_spacing_mm(size)``.

    Returns
    -------
    image : numpy.ndarray of float32, shape (size, size)
        CT numbers in Hounsfield units, integer-valued and within ``[HU_MIN, HU_MAX]``; rows run from
        the front (anterior) of the patient to the back, columns from the patient's right to left.
    mask : numpy.ndarray of uint8, shape (size, size)
        1 on skeletal muscle (abdominal wall, psoas, quadratus lumborum, paraspinal muscles), 0 elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> image, mask = generate_l3_slice(np.random.default_rng(0), size=128)
    >>> image.shape, image.dtype, mask.dtype
    ((128, 128), dtype('float32'), dtype('uint8'))
    >>> bool(20 < image[mask == 1].mean() < 70)
    True
    """
    if not isinstance(size, (int, np.integer)) or size < MINIMUM_SIZE:
        raise ValueError(f"size must be an integer of at least {MINIMUM_SIZE}, got {size!r}")
    tissue = _paint_tissue_map(rng, int(size))
    image = _render_hounsfield(rng, tissue)
    mask = (tissue == Tissue.MUSCLE).astype(np.uint8)
    return image, mask


def demo_slice_ids(num_slices: int) -> list[str]:
    """Return the slice ids ``l3_000``, ``l3_001``, ... of a demo dataset of ``num_slices`` slices."""
    width = max(3, len(str(num_slices - 1)))
    return [f"l3_{index:0{width}d}" for index in range(num_slices)]


def _dataset_parameters(num_slices: int, size: int, seed: int) -> dict:
    return {
        "generator": "segmenter.demo_data.generate_l3_slice",
        "generator_version": GENERATOR_VERSION,
        "num_slices": num_slices,
        "size": size,
        "seed": seed,
        "field_of_view_mm": FIELD_OF_VIEW_MM,
        "pixel_spacing_mm": pixel_spacing_mm(size),
    }


def _read_parameters(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_README_TEMPLATE = """\
Synthetic demo dataset: axial CT slices at the level of the third lumbar vertebra (L3).

Every slice here is made up: no patient data. It was generated by segmenter.demo_data
(generator version {generator_version}) with

    python -m segmenter.demo_data {folder_name} --num-slices {num_slices} --size {size} --seed {seed}

images/<id>.csv  one {size} x {size} slice per file, CT numbers in Hounsfield units (integers), comma-separated,
                 no header; rows run from the front of the body to the back, columns from the patient's
                 right to left. Field of view {field_of_view_mm:g} mm, pixel spacing {pixel_spacing_mm:.4g} mm.
masks/<id>.csv   the matching label map: 1 = skeletal muscle, 0 = everything else.
{parameters_file}  the parameters above; with the same parameters the generator leaves this folder as it is.

Each slice draws a body outline, skin, subcutaneous and visceral fat, the abdominal wall, psoas, quadratus
lumborum and paraspinal muscles, the vertebra, aorta, vena cava, kidneys and bowel loops with a seeded
random generator (slice i uses numpy.random.SeedSequence(seed).spawn(num_slices)[i]), then adds texture,
partial-volume blur and noise.
"""


def write_demo_dataset(
    output_dir: Path, num_slices: int = 40, size: int = 512, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write the synthetic L3 CT demo dataset as CSV files and return its folder.

    The dataset is built in a temporary folder beside ``output_dir`` and moved into place at the end, so
    ``output_dir`` never holds half a dataset. If ``output_dir`` already holds a demo dataset made with the
    same parameters it is returned unchanged, unless ``overwrite`` is set.

    Parameters
    ----------
    output_dir : pathlib.Path
        Folder to create; receives ``images/<id>.csv``, ``masks/<id>.csv``, ``README.txt`` and
        ``demo_parameters.json``, with ids ``l3_000``, ``l3_001``, ...
    num_slices : int, optional
        Number of slices (at least 1).
    size : int, optional
        Rows and columns of every slice (at least 32).
    seed : int, optional
        Seed of the generator; slice ``i`` depends only on ``seed`` and ``i``.
    overwrite : bool, optional
        Replace an existing ``output_dir`` even if it holds the same dataset or something else.

    Returns
    -------
    pathlib.Path
        ``output_dir``.

    Raises
    ------
    ValueError
        If ``num_slices``, ``size`` or ``seed`` is out of range.
    segmenter.errors.InputError
        If ``output_dir`` exists, is not empty and is not this demo dataset, and ``overwrite`` is not set.
    """
    if int(num_slices) < 1:
        raise ValueError(f"num_slices must be at least 1, got {num_slices}")
    if int(size) < MINIMUM_SIZE:
        raise ValueError(f"size must be at least {MINIMUM_SIZE}, got {size}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    num_slices, size, seed = int(num_slices), int(size), int(seed)
    output_dir = Path(output_dir)
    parameters = _dataset_parameters(num_slices, size, seed)

    if output_dir.exists() and not overwrite:
        if not output_dir.is_dir():
            raise InputError(output_dir, "exists and is not a folder; pass overwrite=True (--overwrite) to replace it")
        if _read_parameters(output_dir / PARAMETERS_FILE_NAME) == parameters:
            return output_dir
        if any(output_dir.iterdir()):
            raise InputError(
                output_dir,
                "exists and does not hold a demo dataset with these parameters; "
                "pass overwrite=True (--overwrite) to replace it",
            )
    elif output_dir.exists() and not output_dir.is_dir():
        output_dir.unlink()

    # One independent stream per slice, so slice i is the same whatever num_slices is.
    slice_seeds = np.random.SeedSequence(seed).spawn(num_slices)
    with atomic_directory(output_dir) as building_dir:
        (building_dir / "images").mkdir()
        (building_dir / "masks").mkdir()
        for slice_id, slice_seed in zip(demo_slice_ids(num_slices), slice_seeds):
            image, mask = generate_l3_slice(np.random.default_rng(slice_seed), size=size)
            np.savetxt(building_dir / "images" / f"{slice_id}.csv", image, fmt="%d", delimiter=",")
            np.savetxt(building_dir / "masks" / f"{slice_id}.csv", mask, fmt="%d", delimiter=",")
        readme = _README_TEMPLATE.format(
            folder_name=output_dir.name, parameters_file=PARAMETERS_FILE_NAME, **parameters
        )
        write_text_atomic(readme, building_dir / "README.txt")
        # The parameters file goes last: its presence marks a complete dataset.
        write_json_atomic(parameters, building_dir / PARAMETERS_FILE_NAME)
    return output_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: write the demo dataset and print its folder."""
    parser = argparse.ArgumentParser(
        prog="python -m segmenter.demo_data",
        description="Write the synthetic L3 CT demo dataset (images/ and masks/ as CSV) and print its folder.",
    )
    parser.add_argument("output_dir", type=Path, help="folder to create, e.g. original_dataset/demo_l3_ct")
    parser.add_argument("--num-slices", type=int, default=40, help="number of slices (default: 40)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns per slice (default: 512)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    try:
        output_dir = write_demo_dataset(
            args.output_dir, num_slices=args.num_slices, size=args.size, seed=args.seed, overwrite=args.overwrite
        )
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
