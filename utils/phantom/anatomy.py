"""Every random choice of one phantom case, in millimetres, before any voxel grid exists.

:func:`sample_anatomy` draws from the case's generator in a fixed order (body, spine and thorax,
solid organs, hollow organs, vessels and muscles, pelvic bones); the order is part of the
phantom's definition: changing it changes every case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.phantom.intensity import ImageNoise, Texture, TissueHU, sample_noise_and_texture, sample_tissue_hu
from utils.phantom.placement import (
    HollowOrgans,
    PelvicBones,
    SolidOrgans,
    sample_hollow_organs,
    sample_pelvic_bones,
    sample_solid_organs,
    sample_vessels_and_muscles,
)
from utils.phantom.shapes import Blob, Tube, orthonormal

REFERENCE_LENGTH_MM = 400.0  # anatomy is written for a 400 mm span, then scaled per case


@dataclass(frozen=True)
class BodyShape:
    """The body outline and the field of view (mm)."""

    half_width: float  # lateral half-width of the skin outline
    half_depth: float  # anterior-posterior half-depth
    fat_thickness: float  # subcutaneous fat, before its variation around the body and along z
    length: float  # covered span, femur heads to lung bases
    spacing_at_512: float  # in-plane pixel size of a 512 x 512 slice
    slice_thickness: float
    center_offset: np.ndarray  # (2,) body centre in the field of view (x, y)
    origin_z: float  # world z of the first slice
    exponent_anterior: float  # superellipse exponents: the back is flatter
    exponent_posterior: float
    outline_lobes: tuple  # (amplitudes (4,), angular orders (4,), phases (4,))
    width_waves: tuple  # (amplitudes (2,), periods (2,), phases (2,)): slow width changes along z
    belly: float  # anterior bulge of the lower abdomen
    fat_anterior: float  # extra fat in front, fraction
    fat_lateral: float  # extra fat at the flanks, fraction
    table_sag: float  # curvature of the CT table, 1/mm
    table_press: float  # how far the back is flattened on the table
    pelvic_cavity: tuple  # (z, lateral reach, anterior reach, posterior reach), each (5,) mm


@dataclass(frozen=True)
class BodyScale:
    """Size of this abdominal cavity relative to the reference body (340 x 250 mm)."""

    x: float  # lateral
    y: float  # anterior-posterior
    mean: float  # sqrt(x * y), for radii


@dataclass(frozen=True)
class Spine:
    """The vertebral column along z (mm)."""

    z: np.ndarray  # (7,) heights of the control points
    y: np.ndarray  # (7,) vertebral-body centre y there (lordosis)
    z_sacrum_top: float  # S1: lumbar vertebrae above, sacrum below
    vertebra_period: float  # height of one vertebra and its disc
    z_conus: float  # where the spinal cord ends


@dataclass(frozen=True)
class Thorax:
    """Ribs, diaphragm and heart."""

    rib_angles: np.ndarray  # (5,) angle from the posterior midline
    rib_lowest: np.ndarray  # (5,) z of the lowest rib at those angles, mm
    rib_slope: float  # how fast ribs descend from back to front
    rib_pitch: float  # mm between ribs
    rib_phase: float
    dome_right: float  # z of the diaphragm domes, mm
    dome_left: float
    heart: Blob
    mediastinum_y: float  # reference y of the mediastinum's centre


@dataclass(frozen=True)
class Anatomy:
    """One case, every shape in mm (organs, vessels and bones: ``utils.phantom.placement``)."""

    body: BodyShape
    scale: BodyScale
    tissue: TissueHU
    noise: ImageNoise
    texture: Texture
    spine: Spine
    thorax: Thorax
    solid: SolidOrgans
    hollow: HollowOrgans
    vessels: list[Tube]  # aorta, IVC and branches (unlabelled)
    muscles: list[Tube]
    pelvis: PelvicBones


class ReferenceSampler:
    """Draws the random parts of one case; reference coordinates -> millimetres.

    Reference frame: x toward the patient's right, y anterior (mm for a 340 x 250 mm abdomen,
    origin at the body centre), z as a fraction of the covered length (0 below the femur heads,
    1 at the lung bases). The scales follow the abdominal cavity, not the fat.
    """

    def __init__(self, rng: np.random.Generator, scale_x: float, scale_y: float, length: float):
        self.rng, self.scale_x, self.scale_y, self.length = rng, scale_x, scale_y, length
        self.scale = float(np.sqrt(scale_x * scale_y))
        self.spine = None  # (z mm, y mm) of the vertebral-body centre, once drawn

    def spine_y(self, z_fraction: float) -> float:
        """Reference y of the vertebral-body centre at a height given as a fraction of the length."""
        spine_z, spine_y = self.spine
        return float(np.interp(z_fraction * self.length, spine_z, spine_y)) / self.scale_y

    def mm(self, points) -> np.ndarray:
        """(M, 3+) reference [x, y, z-fraction, (radius)] -> mm."""
        points = np.array(points, float)
        scale = [self.scale_x, self.scale_y, self.length] + [self.scale] * (points.shape[-1] - 3)
        return points * scale

    def jitter_path(self, control, xy=4.0, z=0.008, radius=0.08) -> np.ndarray:
        """Reference control points (M, 4) with random displacement and width, in mm."""
        rng = self.rng
        control = np.array(control, float)
        control[:, :2] += rng.normal(0.0, xy, (len(control), 2))
        control[:, 2] += rng.normal(0.0, z, len(control))
        control[:, 3] *= rng.uniform(1 - radius, 1 + radius, len(control)) * rng.uniform(0.9, 1.1)
        return self.mm(control)

    def blob(self, center, radii, long_axis=(0, 0, 1), hint=(1, 0, 0), size=0.1, shift=6.0, tilt=0.08,
             bumps=3, bump=0.06) -> Blob:
        """Reference centre (x, y, z-fraction), radii in mm of a 400 mm reference body."""
        rng = self.rng
        scale = np.array([self.scale_x, self.scale_y, self.length / REFERENCE_LENGTH_MM])
        center = self.mm([center])[0] + rng.normal(0.0, shift, 3) * scale
        radii = np.asarray(radii, float) * scale * rng.uniform(1 - size, 1 + size, 3)
        axes = orthonormal(np.asarray(long_axis, float) + rng.normal(0, tilt, 3),
                           np.asarray(hint, float) + rng.normal(0, tilt, 3))
        amplitude = rng.uniform(0.3, 1.0, bumps) * bump
        frequency = 2 * np.pi / (rng.uniform(1.0, 2.2, (bumps, 3)) * radii.mean())
        phase = rng.uniform(0, 2 * np.pi, (bumps, 3))
        return Blob(center, radii, axes, amplitude, frequency, phase)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Every random choice of one case, in mm, independent of the voxel grid (fixed draw order)."""
    body, tissue, noise, texture, sampler = _sample_body(rng)
    scale = BodyScale(sampler.scale_x, sampler.scale_y, sampler.scale)
    spine, thorax = _sample_spine_and_thorax(rng, sampler, body.length)
    solid = sample_solid_organs(sampler)
    hollow = sample_hollow_organs(rng, sampler, solid)
    vessels, muscles = sample_vessels_and_muscles(sampler)
    pelvis = sample_pelvic_bones(rng, sampler, spine)
    return Anatomy(body=body, scale=scale, tissue=tissue, noise=noise, texture=texture, spine=spine,
                   thorax=thorax, solid=solid, hollow=hollow, vessels=vessels, muscles=muscles, pelvis=pelvis)


def _sample_body(rng: np.random.Generator):
    """Body outline, field of view, tissue HU, noise; also the sampler scaled to this body.

    Returns (BodyShape, TissueHU, ImageNoise, Texture, ReferenceSampler).
    """
    uniform = rng.uniform
    half_width = uniform(140, 185)
    half_depth = half_width * uniform(0.66, 0.78)
    fat_thickness = uniform(10, 38)
    length = uniform(350, 450)
    spacing_at_512 = float(np.clip(2 * half_width * 1.08 / uniform(0.8, 0.93) / 512, 0.6, 0.9))  # hips fill 80-93 %
    slice_thickness = round(uniform(2.5, 5.0) * 4) / 4
    center_offset = np.array([uniform(-10, 10), uniform(-5, 12)])
    origin_z = -uniform(200, 700)
    exponent_anterior, exponent_posterior = uniform(2.0, 2.4), uniform(2.6, 3.6)
    outline_lobes = (uniform(0, 0.015, 4), np.arange(2, 6), uniform(0, 2 * np.pi, 4))
    width_waves = (uniform(0, 0.03, 2), uniform(0.8, 1.6, 2), uniform(0, 2 * np.pi, 2))
    belly = uniform(0.0, 0.06)
    fat_anterior, fat_lateral = uniform(0.0, 0.5), uniform(0.0, 0.4)
    table_sag, table_press = uniform(0.0004, 0.001), uniform(0.93, 0.98)
    scale_x = (half_width - 2 - fat_thickness - 14) / 132
    scale_y = (half_depth - 2 - 1.1 * fat_thickness - 11) / 93
    sampler = ReferenceSampler(rng, float(np.clip(scale_x, 0.7, 1.3)), float(np.clip(scale_y, 0.7, 1.3)), length)
    tissue = sample_tissue_hu(uniform)
    noise, texture = sample_noise_and_texture(rng)
    pelvic_cavity = (np.array([0.0, 0.12, 0.22, 0.32, 0.40]) * length,  # z; lateral, anterior, posterior reach
                     np.array([55, 62, 88, 125, 400.0]) * sampler.scale_x,
                     np.array([72, 80, 88, 95, 400.0]) * sampler.scale_y,
                     np.array([72, 80, 92, 110, 400.0]) * sampler.scale_y)
    body = BodyShape(half_width, half_depth, fat_thickness, length, spacing_at_512, slice_thickness, center_offset,
                     origin_z, exponent_anterior, exponent_posterior, outline_lobes, width_waves, belly,
                     fat_anterior, fat_lateral, table_sag, table_press, pelvic_cavity)
    return body, tissue, noise, texture, sampler


def _sample_spine_and_thorax(rng: np.random.Generator, sampler: ReferenceSampler, length: float):
    """Spine curve and segments, ribs, diaphragm domes, heart; returns (Spine, Thorax)."""
    uniform = rng.uniform
    spine_z = np.array([0.30, 0.36, 0.45, 0.55, 0.70, 0.85, 1.05]) * length
    spine_y = (np.array([-52.0, -44, -33, -30, -33, -40, -46]) + rng.normal(0, 3, 7)) * sampler.scale_y
    sampler.spine = (spine_z, spine_y)
    spine = Spine(z=spine_z, y=spine_y, z_sacrum_top=uniform(0.32, 0.35) * length,
                  vertebra_period=36.0 * length / REFERENCE_LENGTH_MM * uniform(0.93, 1.07),
                  z_conus=uniform(0.58, 0.64) * length)
    rib_angles = np.array([0.5, 0.8, 1.6, 2.2, 2.75])
    rib_lowest = np.array([0.78, 0.66, 0.64, 0.74, 0.86]) * length + rng.normal(0, 0.01 * length, 5)
    rib_slope, rib_pitch, rib_phase = (uniform(0.35, 0.5), 34 * length / REFERENCE_LENGTH_MM * uniform(0.9, 1.1),
                                       uniform(0, 1))
    dome_right = uniform(0.95, 0.98) * length
    dome_left = dome_right - uniform(0.01, 0.04) * length
    heart = sampler.blob((-20, 40, 1.08), (75, 55, 64), size=0.08, bumps=0)
    thorax = Thorax(rib_angles, rib_lowest, rib_slope, rib_pitch, rib_phase, dome_right, dome_left, heart,
                    mediastinum_y=sampler.spine_y(0.95) + 40)
    return spine, thorax
