"""Tissue HU, texture and image formation (blur and noise) of the phantom."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.phantom.shapes import orthonormal


@dataclass(frozen=True)
class TissueHU:
    """Mean HU of each tissue in one case (non-contrast CT)."""

    fat: float
    muscle: float
    liver: float
    spleen: float
    pancreas: float
    kidney: float
    blood: float
    bone: float  # cortex
    marrow: float
    urine: float
    bile: float
    lung: float


@dataclass(frozen=True)
class Texture:
    """A smooth random field: a (48, 48, 48) float32 lattice read through two (3, 3) rotations."""

    lattice: np.ndarray
    rotations: list[np.ndarray]


@dataclass(frozen=True)
class ImageNoise:
    """Reconstruction blur and noise of the scanner."""

    noise_std: float  # HU, after the blur
    blur_mm: float  # in-plane Gaussian sigma


def sample_tissue_hu(uniform) -> TissueHU:
    """Draw each tissue's HU with ``uniform(low, high)`` (the draw order is fixed: field order)."""
    return TissueHU(
        fat=-100 + uniform(-10, 10), muscle=50 + uniform(-8, 8), liver=55 + uniform(-10, 10),
        spleen=45 + uniform(-10, 10), pancreas=40 + uniform(-10, 10), kidney=35 + uniform(-10, 10),
        blood=40 + uniform(-5, 5), bone=800 + uniform(-100, 150), marrow=220 + uniform(-60, 80),
        urine=8 + uniform(-5, 5), bile=12 + uniform(-5, 5), lung=-860 + uniform(-30, 30),
    )


def sample_noise_and_texture(rng: np.random.Generator) -> tuple[ImageNoise, Texture]:
    """Scanner noise and blur, then the texture's rotations and lattice, in this draw order."""
    noise = ImageNoise(noise_std=rng.uniform(10, 18), blur_mm=rng.uniform(0.45, 0.75))
    rotations = [orthonormal(rng.normal(0, 1, 3), rng.normal(0, 1, 3)) for _ in range(2)]
    return noise, Texture(rng.standard_normal((48, 48, 48), dtype=np.float32), rotations)


def bone_hu(tissue: TissueHU, edge, radius) -> np.ndarray:
    """Cortex (~2.5 mm) at the surface, marrow inside; ``edge`` is 0 at the centre, 1 at the surface."""
    return np.where((1 - edge) * radius < 2.5, tissue.bone, tissue.marrow).astype(np.float32)


def texture_at(texture: Texture, x, y, z) -> np.ndarray:
    """Smooth random field at points x, y, z (each (n,) mm): (n,) float32, mean 0, std ~1, blobs of 3-8 mm.

    Two octaves of value noise on rotated lattices with unrelated cell sizes, so that no grid shows.
    """
    out = np.zeros(len(x), np.float32)
    for rotation, cell, offset in zip(texture.rotations, (3.1, 4.9), (0.0, 17.3)):
        to_lattice = rotation.T.astype(np.float32) / np.float32(cell)
        coords = [to_lattice[row, 0] * x + to_lattice[row, 1] * y + to_lattice[row, 2] * z + np.float32(offset)
                  for row in range(3)]
        out += _value_noise(texture.lattice, *coords)
    return out * np.float32(1.6 / np.sqrt(2))  # interpolation shrinks the lattice's unit std


def _value_noise(lattice, u, v, w) -> np.ndarray:
    """Smoothly interpolated lattice values at lattice coordinates u, v, w (each (n,)), periodic."""
    size = lattice.shape[0]
    corners, weights = [], []
    for coord in (u, v, w):
        floor = np.floor(coord)
        frac = coord - floor
        frac = frac * frac * (3 - 2 * frac)  # smooth weights hide the lattice cells
        corners.append(floor.astype(np.int64) % size)
        weights.append((1 - frac, frac))
    out = np.zeros(len(u), np.float32)
    for step_x in (0, 1):
        for step_y in (0, 1):
            for step_z in (0, 1):
                weight = weights[0][step_x] * weights[1][step_y] * weights[2][step_z]
                out += weight * lattice[(corners[0] + step_x) % size, (corners[1] + step_y) % size,
                                        (corners[2] + step_z) % size]
    return out


def finish_image(canvas, noise: ImageNoise, rng: np.random.Generator) -> np.ndarray:
    """Blur in-plane (reconstruction kernel) with correlated Gaussian noise.

    Args:
        canvas: the drawn :class:`utils.phantom.canvas.Canvas` (float32 HU, (X, Y, Z)).
        noise: the case's noise level and blur.
        rng: the case's generator; one ``standard_normal`` draw per slab of 8 slices.

    Returns:
        (X, Y, Z) int16 HU in [-1024, 3071], Fortran order.
    """
    from scipy.ndimage import gaussian_filter1d

    sigma = noise.blur_mm / canvas.spacing[0]
    radius = max(1, int(np.ceil(3 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    noise_gain = float((kernel**2).sum())  # std of white noise after the separable blur
    scale = np.float32(noise.noise_std / noise_gain)
    out = np.empty(canvas.shape, np.int16, order="F")
    chunk = 8
    for first in range(0, canvas.shape[2], chunk):
        slab = canvas.hu[:, :, first:first + chunk]
        slab = slab + scale * rng.standard_normal(slab.shape, dtype=np.float32)
        slab = gaussian_filter1d(slab, sigma, axis=0, truncate=3.0, mode="nearest")
        slab = gaussian_filter1d(slab, sigma, axis=1, truncate=3.0, mode="nearest")
        np.clip(np.rint(slab), -1024, 3071, out=slab)
        out[:, :, first:first + chunk] = slab
    return out
