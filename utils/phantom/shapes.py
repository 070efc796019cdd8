"""Shape primitives of the phantom, in millimetres: perturbed ellipsoids and tubes along splines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Blob:
    """A perturbed ellipsoid: inside where ``|local / radii| + bumps < 1``."""

    center: np.ndarray  # (3,) mm
    radii: np.ndarray  # (3,) mm along the local axes
    axes: np.ndarray  # (3, 3), columns: local axes in the world frame
    bump_amp: np.ndarray  # (K,)
    bump_freq: np.ndarray  # (K, 3) rad/mm
    bump_phase: np.ndarray  # (K, 3)

    def bounds(self, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned box around the region ``level < scale``."""
        reach = self.radii.max() * (scale + self.bump_amp.sum()) + 1.0
        return self.center - reach, self.center + reach


@dataclass(frozen=True)
class Tube:
    """Balls along a centreline, with what fills each stretch (hollow organs)."""

    points: np.ndarray  # (N, 3) mm
    radii: np.ndarray  # (N,) mm
    fill_hu: np.ndarray | None = None  # (N,) lumen HU
    air_level: np.ndarray | None = None  # (N,) air above this height (-1 bottom .. 1 top of the lumen)
    stool: np.ndarray | None = None  # (N,) bool, mottled content


def child_blob(parent: Blob, offset, radii) -> Blob:
    """A smooth blob in the parent's local frame (offset and radii in fractions of the parent's)."""
    center = parent.center + parent.axes @ (np.asarray(offset) * parent.radii)
    return Blob(center, np.asarray(radii) * parent.radii, parent.axes, np.zeros(0), np.zeros((0, 3)), np.zeros((0, 3)))


def orthonormal(long_axis, hint) -> np.ndarray:
    """(3, 3) rotation whose columns are (hint orthogonalised, third, long_axis normalised)."""
    long_unit = np.asarray(long_axis, float)
    long_unit = long_unit / np.linalg.norm(long_unit)
    across = np.asarray(hint, float)
    across = across - across.dot(long_unit) * long_unit
    across = across / np.linalg.norm(across)
    return np.stack([across, np.cross(long_unit, across), long_unit], axis=1)


def spline_path(control, step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample a cubic spline through ``control`` (M, 4: x, y, z, radius in mm) every ~step mm.

    Returns points (N, 3), radii (N,) and arc length (N,).
    """
    from scipy.interpolate import CubicSpline

    control = np.asarray(control, float)
    chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(control[:, :3], axis=0), axis=1))])
    samples = np.linspace(0.0, chord[-1], max(2, int(np.ceil(chord[-1] / step)) + 1))
    path = CubicSpline(chord, control, axis=0, bc_type="natural")(samples)
    return path[:, :3], np.maximum(path[:, 3], 1.0), samples


def spline_tube(control, step: float) -> Tube:
    """A plain tube (no content) along the spline through ``control`` (M, 4 mm)."""
    return Tube(*spline_path(control, step)[:2])


def smoothstep(ramp):
    """0 below 0, 1 above 1, a smooth cubic ramp between."""
    ramp = np.clip(ramp, 0.0, 1.0)
    return ramp * ramp * (3.0 - 2.0 * ramp)


def as_float32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)
