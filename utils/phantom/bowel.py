"""Hollow organs: tubes with content (fluid, stool, air), and the small-intestine random walk."""

from __future__ import annotations

import numpy as np

from utils.phantom.shapes import Tube, spline_path


def hollow_organ(rng: np.random.Generator, control, fill, air, air_from=0.0, stool=False, haustra=None,
                 step=4.0) -> Tube:
    """A hollow organ along ``control`` (M, 4 mm): random fluid HU, air above ``air`` (scalar or per control point).

    Args:
        fill: (low, high) HU of the fluid, drawn at 6 points along the organ.
        air: air level (-1 bottom .. 1 top of the lumen) per control point, or one value.
        air_from: no air before this fraction of the length.
        stool: mottled content (texture and gas bubbles).
        haustra: period (mm) of the colon's haustral folds, or None.
        step: mm between the tube's balls.
    """
    points, radii, arc = spline_path(control, step)
    count = len(points)
    position = np.linspace(0, 1, count)
    if haustra is not None:
        radii = radii * (1 + 0.1 * np.cos(2 * np.pi * arc / haustra))
    air = np.interp(position, np.linspace(0, 1, len(control)), np.broadcast_to(air, len(control)))
    air = np.where(position >= air_from, air, 2.0)
    fill_hu = np.interp(position, np.linspace(0, 1, 6), rng.uniform(*fill, 6))
    return Tube(points, radii, fill_hu.astype(np.float32), air, np.full(count, stool))


class _CrowdGrid:
    """A coarse grid (14 mm cells) counting how crowded each place is, around the walk's region."""

    cell = 14.0

    def __init__(self, center, half):
        self.origin = center - half - 40
        self.dims = np.ceil((2 * half + 80) / self.cell).astype(int)
        self.crowd = np.zeros(self.dims, np.float32)

    def cells(self, points):
        """Grid indices of points (N, 3) mm, clipped to the grid: a tuple of 3 (N,) arrays."""
        return tuple(np.clip(((points - self.origin) / self.cell).astype(int), 0, self.dims - 1).T)

    def add_obstacles(self, obstacles) -> None:
        """Mark the balls of other organs ([(points (N, 3), radii (N,))]) as crowded."""
        cell = self.cell
        for points, radii in obstacles:
            for point, radius in zip(points, radii):
                offsets = np.stack(np.meshgrid(*[np.arange(-radius, radius + cell, cell)] * 3, indexing="ij"),
                                   -1).reshape(-1, 3)
                offsets = offsets[np.linalg.norm(offsets, axis=1) <= radius]
                self.crowd[self.cells(point + offsets)] += 2.0


def small_bowel_walk(rng: np.random.Generator, sampler, start, end, obstacles) -> Tube:
    """Loops of small intestine: a self-avoiding random walk in the mid and lower abdomen.

    Each step picks, among a few random turns, the one heading into the least crowded space,
    staying in an ellipsoidal region and heading for the ileocaecal valve (``end``) in its last part.
    """
    center = sampler.mm([(0, 18, 0.41)])[0]
    half = sampler.mm([(92, 68, 0.19)])[0]
    mean_radius = 12.0 * sampler.scale
    volume = 4 / 3 * np.pi * np.prod(half)
    length = 0.9 * volume / (np.pi * mean_radius**2) * rng.uniform(0.85, 1.15)
    step = 4.0
    steps = int(length / step)
    grid = _CrowdGrid(center, half)
    grid.add_obstacles(obstacles)
    position = np.asarray(start, float)
    direction = np.array([-0.3, 0.0, -1.0])
    direction /= np.linalg.norm(direction)
    path = [position.copy()]
    for index in range(steps):
        trials = direction + 0.35 * rng.normal(0, 1, (8, 3))
        trials /= np.linalg.norm(trials, axis=1, keepdims=True)
        ahead = position + 3 * step * trials
        outside = np.linalg.norm((ahead - center) / half, axis=1)
        score = grid.crowd[grid.cells(ahead)] + 60.0 * np.maximum(outside - 0.85, 0)
        homing = max(0.0, (index / steps - 0.8) / 0.2)
        score += homing * 0.08 * np.linalg.norm(ahead - end, axis=1)
        direction = trials[int(np.argmin(score))]
        position = position + step * direction
        path.append(position.copy())
        grid.crowd[grid.cells(position[None])] += 1.0
    path.append(np.asarray(end, float))
    return _bowel_content(rng, np.array(path), mean_radius)


def _bowel_content(rng: np.random.Generator, points, mean_radius: float) -> Tube:
    """Per ~60 mm segment of the walk: fluid-filled, collapsed, or with an air-fluid level."""
    count = len(points)
    segments = (count + 14) // 15
    kind = rng.choice(3, segments, p=[0.55, 0.25, 0.2])  # fluid, collapsed, air-fluid
    radius = np.where(kind == 1, 0.6, 1.0) * rng.uniform(0.8, 1.15, segments) * mean_radius
    fill = np.where(kind == 1, 35.0, rng.uniform(0, 30, segments))
    air = np.where(kind == 2, rng.uniform(0.2, 0.6, segments), 2.0)
    segment = np.minimum(np.arange(count) // 15, segments - 1)
    radii = np.convolve(np.pad(radius[segment], 4, mode="edge"), np.ones(9) / 9, mode="valid")
    return Tube(points, radii, fill[segment].astype(np.float32), air[segment], np.zeros(count, bool))
