"""The body wall, slice by slice: skin, fat, muscle wall and ribs, the cavity, lung bases,
diaphragm and heart above it, and the CT table. Sets the canvas's HU and tissue zones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.phantom.anatomy import Anatomy
from utils.phantom.canvas import AIR_HU, CAVITY, LUNG, MEDIASTINUM, OUTSIDE, WALL, Canvas
from utils.phantom.shapes import smoothstep

ANGLE_BINS = 720  # the body outline is computed per polar angle bin


@dataclass(frozen=True)
class SliceMaps:
    """What every slice shares, on the in-plane crop (each (nx, ny) unless noted, mm)."""

    x: np.ndarray  # (nx, 1)
    y: np.ndarray  # (1, ny)
    radius: np.ndarray  # distance from the body centre
    angle_bin: np.ndarray  # int32 polar angle bin of each pixel
    bin_angles: np.ndarray  # (ANGLE_BINS,) centre angle of each bin
    lateral: np.ndarray  # bool: the flanks, where the three lateral wall muscles lie
    linea_alba: np.ndarray  # bool
    above_table: np.ndarray  # bool
    table: np.ndarray  # float32 HU of the CT table (air elsewhere)
    angle_from_back: np.ndarray  # angle from the posterior midline
    arc: np.ndarray  # mm along the body wall from the posterior midline
    rib_lowest: np.ndarray  # z of the lowest rib at this angle
    diaphragm: np.ndarray  # z of the diaphragm
    diaphragm_band: np.ndarray  # z thickness of the diaphragm muscle
    mediastinum: np.ndarray  # bool


def draw_body(canvas: Canvas, anatomy: Anatomy) -> None:
    """Skin, fat, muscle wall, ribs, cavity, lung bases, diaphragm, heart and the CT table, per slice."""
    body = anatomy.body
    extent = body.half_width * 1.25
    x0, x1 = np.searchsorted(canvas.x, -extent), np.searchsorted(canvas.x, extent, side="right")
    y0 = np.searchsorted(canvas.y, -body.half_depth * 1.25 - 25)
    y1 = np.searchsorted(canvas.y, body.half_depth * 1.25, side="right")
    maps = slice_maps(canvas.x[x0:x1, None], canvas.y[None, y0:y1], canvas.spacing, anatomy)
    for index, z in enumerate(canvas.z):
        hu, zone, depth, fat_inner, wall_inner = _wall_slice(anatomy, maps, float(z))
        _add_ribs(anatomy, maps, float(z), hu, zone, depth, fat_inner, wall_inner)
        if z > maps.diaphragm.min() - 10:
            _add_thorax(anatomy, maps, float(z), hu, zone)
        canvas.hu[x0:x1, y0:y1, index] = hu
        canvas.zone[x0:x1, y0:y1, index] = zone


def body_profile(anatomy: Anatomy, angles, z: float):
    """Body wall of the slice at height z (mm), per polar angle ``angles`` (NB,), all in mm.

    Returns the skin radius, the subcutaneous fat and muscle wall thicknesses, and the deep fat
    (intermuscular, ischioanal) that fills the low pelvis between the wall and the pelvic ring.
    """
    body = anatomy.body
    z_fraction = z / body.length
    amplitude, period, phase = body.width_waves
    half_width = body.half_width * (1 + 0.07 * smoothstep((0.32 - z_fraction) / 0.17)
                                    + 0.03 * smoothstep((z_fraction - 0.6) / 0.25)
                                    + amplitude[0] * np.cos(2 * np.pi * z_fraction / period[0] + phase[0]))
    half_depth = body.half_depth * (1 + body.belly * np.exp(-(((z_fraction - 0.42) / 0.15) ** 2))
                                    + amplitude[1] * np.cos(2 * np.pi * z_fraction / period[1] + phase[1]))
    cos, sin = np.cos(angles), np.sin(angles)
    exponent = np.where(sin > 0, body.exponent_anterior, body.exponent_posterior)
    radius = (np.abs(cos / half_width) ** exponent + np.abs(sin / half_depth) ** exponent) ** (-1 / exponent)
    lobe_amplitude, lobe_order, lobe_phase = body.outline_lobes
    radius = radius * (1 + (lobe_amplitude[:, None] * np.cos(lobe_order[:, None] * angles + lobe_phase[:, None])).sum(0))
    fat = body.fat_thickness * (1 + body.fat_anterior * np.clip(sin, 0, None) + body.fat_lateral * cos**2
                                - 0.3 * np.clip(-sin, 0, None))
    fat = fat * (1 + 0.25 * smoothstep((0.3 - z_fraction) / 0.2) - 0.3 * smoothstep((z_fraction - 0.6) / 0.3))
    muscle = 11 + 5 * cos**2 + 7 * smoothstep((z_fraction - 0.62) / 0.12)  # thicker over the ribs
    pelvis = smoothstep((0.34 - z_fraction) / 0.14)
    muscle = muscle + pelvis * (38 * np.clip(-sin, 0, None) ** 1.5 + 10 * cos**2)  # gluteus maximus, abductors
    cavity_z, reach_lateral, reach_anterior, reach_posterior = body.pelvic_cavity  # the cavity fits the pelvic ring
    cavity_a, cavity_anterior, cavity_posterior = (float(np.interp(z, cavity_z, reach))
                                                   for reach in (reach_lateral, reach_anterior, reach_posterior))
    cavity_b = np.where(sin > 0, cavity_anterior, cavity_posterior)
    cavity = (np.abs(cos / cavity_a) ** 2.2 + np.abs(sin / cavity_b) ** 2.2) ** (-1 / 2.2)
    deep = np.maximum(radius - 2 - fat - muscle - cavity, 0.0)
    return radius, fat, muscle, deep


def _table(anatomy: Anatomy, x, y) -> tuple[np.ndarray, np.ndarray]:
    """(above the table (bool), table HU (float32)) on the crop x (nx, 1), y (1, ny)."""
    body = anatomy.body
    table_top = -body.half_depth * 1.02 * body.table_press + body.table_sag * x**2  # the back is flattened on it
    below = table_top - y
    table = np.where((below > 1) & (below < 4), 250.0, AIR_HU)  # carbon shells around a foam core
    table = np.where((below >= 4) & (below < 14), -950.0, table)
    table = np.where((below >= 14) & (below < 17), 250.0, table)
    return y > table_top, np.where(np.abs(x) < body.half_width * 1.2, table, AIR_HU).astype(np.float32)


def _diaphragm(anatomy: Anatomy, x, y, spacing) -> tuple[np.ndarray, np.ndarray]:
    """(z of the diaphragm, its muscle band in z) on the crop x (nx, 1), y (1, ny)."""
    thorax, scale = anatomy.thorax, anatomy.scale
    x_ref, y_ref = x / scale.x, y / scale.y
    dome = np.maximum(thorax.dome_right - ((x_ref - 55) ** 2 + (y_ref + 5) ** 2) / 260,
                      thorax.dome_left - ((x_ref + 55) ** 2 + (y_ref + 10) ** 2) / 260)
    rho = np.sqrt((x_ref / 132) ** 2 + (y_ref / 93) ** 2)
    diaphragm = dome - 35 * np.clip((rho - 0.75) / 0.25, 0, 1) ** 2 - 0.3 * np.clip(-y_ref - 30, 0, None)  # recesses
    slope_x, slope_y = np.gradient(diaphragm, spacing[0], axis=0), np.gradient(diaphragm, spacing[1], axis=1)
    return diaphragm, 5.0 * np.sqrt(1 + slope_x**2 + slope_y**2)  # 5 mm muscle, across the sloping sheet


def slice_maps(x, y, spacing, anatomy: Anatomy) -> SliceMaps:
    """What every slice shares, on the in-plane crop x (nx, 1), y (1, ny) in mm: polar angle bins,
    table, rib angles, diaphragm height and the mediastinum."""
    body, thorax, scale = anatomy.body, anatomy.thorax, anatomy.scale
    theta = np.arctan2(y, x)
    above_table, table = _table(anatomy, x, y)
    angle_from_back = np.abs(np.arctan2(x, -y))
    diaphragm, diaphragm_band = _diaphragm(anatomy, x, y, spacing)
    return SliceMaps(
        x=x, y=y, radius=np.hypot(x, y),
        angle_bin=((theta + np.pi) / (2 * np.pi) * ANGLE_BINS).astype(np.int32) % ANGLE_BINS,
        bin_angles=(np.arange(ANGLE_BINS) + 0.5) / ANGLE_BINS * 2 * np.pi - np.pi,
        lateral=np.abs(np.cos(theta)) > 0.75, linea_alba=(np.abs(x) < 2.0) & (y > 0),
        above_table=above_table, table=table, angle_from_back=angle_from_back,
        arc=angle_from_back * 0.8 * (body.half_width + body.half_depth) / 2,
        rib_lowest=np.interp(angle_from_back, thorax.rib_angles, thorax.rib_lowest),
        diaphragm=diaphragm, diaphragm_band=diaphragm_band,
        mediastinum=((x / (28 * scale.x)) ** 2 + ((y - thorax.mediastinum_y * scale.y) / (28 * scale.y)) ** 2) < 1,
    )


def _wall_slice(anatomy: Anatomy, maps: SliceMaps, z: float):
    """HU (nx, ny) and zone of one slice from skin to cavity; also the depth below the skin and
    the depths where the subcutaneous fat and the muscle wall end (mm, each (nx, ny))."""
    tissue = anatomy.tissue
    radius, fat, muscle, deep = body_profile(anatomy, maps.bin_angles, z)
    depth = radius[maps.angle_bin] - maps.radius
    depth[~maps.above_table] = -1.0
    fat_inner = (2 + fat)[maps.angle_bin]
    wall_inner = fat_inner + muscle[maps.angle_bin]
    zone = (depth > 0).astype(np.uint8) + (depth > fat_inner) + (depth > wall_inner + deep[maps.angle_bin])
    spine_y = np.interp(z, anatomy.spine.z, anatomy.spine.y)
    behind_spine = (zone == CAVITY) & (np.abs(maps.x) < 55 * anatomy.scale.mean) & (maps.y < spine_y - 10 * anatomy.scale.mean)
    zone[behind_spine] = WALL  # the back
    hu = np.array([AIR_HU, tissue.fat, tissue.muscle, tissue.fat + 8], np.float32)[zone]
    hu[(depth > 0) & (depth < 2)] = tissue.muscle - 10  # skin
    hu[(zone == WALL) & (depth > wall_inner)] = tissue.fat + 5  # deep fat of the low pelvis
    hu[(zone == WALL) & maps.linea_alba] = tissue.fat + 60
    if 0.3 * anatomy.body.length < z < 0.74 * anatomy.body.length:  # fat planes between the lateral wall muscles
        layer = (depth - fat_inner) / (wall_inner - fat_inner)
        hu[maps.lateral & ((np.abs(layer - 0.36) < 0.045) | (np.abs(layer - 0.68) < 0.045))] = tissue.fat + 20
    hu = np.where(zone == OUTSIDE, maps.table, hu)
    return hu, zone, depth, fat_inner, wall_inner


def _add_ribs(anatomy: Anatomy, maps: SliceMaps, z: float, hu, zone, depth, fat_inner, wall_inner) -> None:
    """Oval rib sections in the muscle wall: oblique bands descending from back to front."""
    thorax = anatomy.thorax
    ribbed = (zone == WALL) & (z > maps.rib_lowest) & (maps.angle_from_back > 0.5)
    if not ribbed.any():
        return
    rows, cols = np.nonzero(ribbed)
    middle = (fat_inner + 0.5 * np.minimum(wall_inner - fat_inner, 20.0))[rows, cols]
    phase = ((z + thorax.rib_slope * maps.arc[rows, cols]) / thorax.rib_pitch + thorax.rib_phase) % 1.0
    ellipse = ((depth[rows, cols] - middle) / 5.0) ** 2 + ((phase - 0.5) / (6.0 / thorax.rib_pitch)) ** 2
    rib = ellipse < 1
    bone = np.where(maps.angle_from_back[rows, cols] > 2.3, 130.0,  # costal cartilage in front
                    np.where(ellipse > 0.5, anatomy.tissue.bone, anatomy.tissue.marrow))
    hu[rows[rib], cols[rib]] = bone[rib]


def _add_thorax(anatomy: Anatomy, maps: SliceMaps, z: float, hu, zone) -> None:
    """Above the diaphragm: lung, mediastinal fat and heart; the diaphragm itself is muscle."""
    tissue, heart = anatomy.tissue, anatomy.thorax.heart
    cavity = zone == CAVITY
    above = cavity & (z > maps.diaphragm)
    sheet = cavity & ~above & (z > maps.diaphragm - maps.diaphragm_band)
    zone[sheet], hu[sheet] = WALL, tissue.muscle
    zone[above], hu[above] = LUNG, tissue.lung
    middle = above & maps.mediastinum
    heart_extent = 1 - ((z - heart.center[2]) / heart.radii[2]) ** 2
    in_heart = np.zeros_like(above)
    if heart_extent > 0:
        in_heart = (((maps.x - heart.center[0]) / heart.radii[0]) ** 2
                    + ((maps.y - heart.center[1]) / heart.radii[1]) ** 2 < heart_extent) & above
    zone[middle | in_heart] = MEDIASTINUM
    hu[middle] = tissue.fat + 10
    hu[in_heart] = tissue.blood
