"""Surface elements with areas, for the normalised surface Dice of Nikolov et al. (2021).

Nikolov et al., "Clinically applicable segmentation of head and neck anatomy for radiotherapy",
J Med Internet Res 23(7) e26151 (2021), define the surface of a mask on the grid of voxel
*corners*: each corner looks at the 2x2x2 voxels around it (a neighbourhood code, 0..255), and a
corner whose code is neither all-outside nor all-inside carries a surface element (surfel) whose
area is that of the marching-cubes triangles of its code, scaled by the voxel spacing. Distances
run between surfel corners, and every surfel counts with its area, so a surface that runs along
thick slices is not outweighed by one that crosses them (counting boundary voxels is).

The triangles of each code are built here, not copied from a table: the corners on the smaller
side of the code (inside, or outside when more than four are inside) split into groups joined
by cube edges; each group is wrapped by one polygon through the midpoints of the cube edges that
leave it, and a polygon that is not planar (a pentagon or hexagon) is cut into the triangles of
largest total area at unit spacing. This reproduces the reference implementation's table for all
256 codes at any spacing (``tests/test_metrics.py`` checks it against MONAI). In 2D the same
construction gives the contour length of each of the 16 codes of a 2x2 neighbourhood.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import ndimage


def crop_to_union(pred_mask: np.ndarray, gt_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box, then padded by one empty voxel per side.

    Both must be non-empty together (the union must hold a voxel).
    """
    union = pred_mask | gt_mask
    box = []
    for axis in range(union.ndim):
        occupied = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(occupied[0], occupied[-1] + 1))
    box = tuple(box)
    return np.pad(pred_mask[box], 1), np.pad(gt_mask[box], 1)


def surfel_distances(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float]):
    """Surfels of both masks with their areas and their distances to the other surface.

    Args:
        pred_mask, gt_mask: non-empty boolean volumes of the same shape, 2D or 3D.
        spacing: voxel size in mm per array axis.

    Returns:
        ``(pred_to_gt_mm, pred_areas, gt_to_pred_mm, gt_areas)``, 1-D arrays: for each surfel of
        one mask its distance to the nearest surfel corner of the other, and its area in mm^2
        (contour length in mm in 2D).
    """
    pred_mask, gt_mask = crop_to_union(pred_mask, gt_mask)
    spacing = tuple(float(s) for s in spacing)
    table = surfel_measure_table(spacing)
    full = len(table) - 1
    pred_codes, gt_codes = _neighbourhood_codes(pred_mask), _neighbourhood_codes(gt_mask)
    pred_surfels = (pred_codes != 0) & (pred_codes != full)
    gt_surfels = (gt_codes != 0) & (gt_codes != full)
    to_gt = ndimage.distance_transform_edt(~gt_surfels, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surfels, sampling=spacing)
    return (to_gt[pred_surfels], table[pred_codes[pred_surfels]],
            to_pred[gt_surfels], table[gt_codes[gt_surfels]])


def surfel_measure_table(spacing: Sequence[float]) -> np.ndarray:
    """Area (3D, mm^2) or contour length (2D, mm) of the surfel of each neighbourhood code.

    Returns:
        ``(256,)`` float64 in 3D, ``(16,)`` in 2D; codes 0 and the last (all inside) are 0.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.size not in (2, 3):
        raise ValueError(f"surfels need 2D or 3D masks, got spacing {tuple(spacing)}")
    # an area vector's component along an axis scales with the spacing of the other axes
    scale = np.prod(spacing) / spacing if spacing.size == 3 else spacing
    return np.array([np.linalg.norm(pieces * scale, axis=1).sum()
                     for pieces in _unit_pieces(spacing.size)])


def _neighbourhood_codes(mask: np.ndarray) -> np.ndarray:
    """Code of every voxel corner: bit ``b`` set when the voxel at offset ``corners[b]`` is in.

    ``mask`` is padded by one empty voxel per side; the result has one entry fewer per axis.
    """
    corners = list(itertools.product((0, 1), repeat=mask.ndim))
    shape = tuple(n - 1 for n in mask.shape)
    codes = np.zeros(shape, dtype=np.uint8)
    for bit, corner in enumerate(corners):
        window = tuple(slice(c, c + n) for c, n in zip(corner, shape))
        codes |= mask[window].astype(np.uint8) << bit
    return codes


@lru_cache(maxsize=2)
def _unit_pieces(ndim: int) -> tuple[np.ndarray, ...]:
    """Per code, the ``(P, ndim)`` pieces of its surfel at unit spacing: triangle area vectors
    (half cross products) in 3D, segment vectors in 2D."""
    corners = list(itertools.product((0, 1), repeat=ndim))
    pieces = []
    for code in range(2 ** len(corners)):
        inside = {corner for bit, corner in enumerate(corners) if code >> bit & 1}
        polygons = _cut_polygons(inside, corners)
        if ndim == 2:
            found = [points[1] - points[0] for points in polygons]
        else:
            found = [area for points in polygons for area in _largest_triangulation(points)]
        pieces.append(np.array(found, dtype=np.float64).reshape(-1, ndim))
    return tuple(pieces)


def _cut_polygons(inside: set, corners: list) -> list[list[np.ndarray]]:
    """Closed polygons (ordered edge midpoints) wrapping each edge-joined group of the corners
    on the smaller side of the code (a segment's two ends in 2D)."""
    side = inside if len(inside) <= len(corners) // 2 else set(corners) - inside
    polygons = []
    for group in _edge_groups(side):
        leaving = [(u, v) for u in sorted(group) for v in corners
                   if v not in side and _adjacent(u, v)]
        polygons.append([np.add(u, v) / 2.0 for u, v in _cycle(leaving, len(corners[0]))])
    return polygons


def _adjacent(u, v) -> bool:
    return sum(a != b for a, b in zip(u, v)) == 1


def _edge_groups(side: set) -> list[set]:
    groups, left = [], set(side)
    while left:
        stack = [left.pop()]
        group = set(stack)
        while stack:
            corner = stack.pop()
            for other in [c for c in left if _adjacent(corner, c)]:
                left.remove(other)
                group.add(other)
                stack.append(other)
        groups.append(group)
    return groups


def _cycle(edges: list, ndim: int) -> list:
    """Order the cut edges of one group so consecutive ones share a cube face."""
    if ndim == 2:
        return edges  # a segment
    neighbours = {edge: [] for edge in edges}
    for axis, value in itertools.product(range(3), (0, 1)):
        on_face = [e for e in edges if e[0][axis] == value and e[1][axis] == value]
        if len(on_face) == 2:
            neighbours[on_face[0]].append(on_face[1])
            neighbours[on_face[1]].append(on_face[0])
    ordered, previous = [edges[0]], None
    while len(ordered) < len(edges):
        step = next(e for e in neighbours[ordered[-1]] if e != previous)
        previous = ordered[-1]
        ordered.append(step)
    return ordered


def _largest_triangulation(points: list[np.ndarray]) -> list[np.ndarray]:
    """Area vectors of the triangulation of a polygon with the largest total area."""
    best, best_area = None, -1.0
    for triangles in _triangulations(tuple(range(len(points)))):
        vectors = [np.cross(points[j] - points[i], points[k] - points[i]) / 2.0
                   for i, j, k in triangles]
        area = sum(np.linalg.norm(v) for v in vectors)
        if area > best_area + 1e-12:
            best, best_area = vectors, area
    return best


def _triangulations(vertices: tuple) -> list[list[tuple]]:
    """Every triangulation of a polygon given by its vertex indices in order."""
    if len(vertices) < 3:
        return [[]]
    first, last = vertices[0], vertices[-1]
    found = []
    for k in range(1, len(vertices) - 1):
        for left in _triangulations(vertices[:k + 1]):
            for right in _triangulations(vertices[k:]):
                found.append(left + right + [(first, vertices[k], last)])
    return found
