"""Vessels, muscles and bones, drawn last: they set the label back to 0, except for the
spinal cord and the femur heads (head and neck), which carry their own labels."""

from __future__ import annotations

import numpy as np

from utils.labels import ORGAN_IDS
from utils.phantom.anatomy import Anatomy
from utils.phantom.canvas import OUTSIDE, SUBCUTIS, WALL, Canvas, tube_field
from utils.phantom.intensity import bone_hu
from utils.phantom.placement import Femur, IliumProfile
from utils.phantom.shapes import Tube, as_float32, spline_tube
from utils.phantom.spine import draw_spine


def paint_tube(canvas: Canvas, tube: Tube, hu, min_zone: int, label: int = 0):
    """Paint a tube where the zone is at least ``min_zone``; ``hu`` is a value or f(distance, radius)."""
    field = tube_field(canvas, tube.points, tube.radii)
    if field is None:
        return None
    index = field.region.index
    inside = (field.distance < 1) & (canvas.zone[index] >= min_zone)
    canvas.hu[index][inside] = hu if np.isscalar(hu) else hu(field.distance[inside], tube.radii[field.nearest[inside]])
    canvas.labels[index][inside] = label
    return field


def draw_vessels_muscles_bones(canvas: Canvas, anatomy: Anatomy) -> None:
    """Muscles, pelvis, vessels, bone rods (femur shafts, pubis, ischium), femur heads, spine."""
    tissue = anatomy.tissue
    for muscle in anatomy.muscles:
        paint_tube(canvas, muscle, tissue.muscle, WALL)
    for side in (1, -1):
        _draw_ilium(canvas, anatomy, side)
    _draw_sacrum(canvas, anatomy)
    for vessel in anatomy.vessels:
        paint_tube(canvas, vessel, tissue.blood, SUBCUTIS)
    for rod in anatomy.pelvis.bone_rods:
        paint_tube(canvas, rod, lambda distance, radius: bone_hu(tissue, distance, radius), SUBCUTIS)
    for femur in anatomy.pelvis.femurs:
        _draw_femur_head(canvas, anatomy, femur)
    draw_spine(canvas, anatomy)


def _draw_femur_head(canvas: Canvas, anatomy: Anatomy, femur: Femur) -> None:
    """Acetabular cup (bone, label 0), then the femur head and neck (label femur head)."""
    tissue, radius = anatomy.tissue, femur.radius
    region = canvas.box(femur.head - radius - 14, femur.head + radius + 14)
    if region is None:
        return
    index = region.index
    dx = (region.x - femur.head[0])[:, None, None]
    dy = (region.y - femur.head[1])[None, :, None]
    dz = (region.z - femur.head[2])[None, None, :]
    distance = np.sqrt(dx**2 + dy**2 + dz**2)
    cup_axis = np.array([-femur.side * 0.8, 0.0, 0.6])  # the acetabulum covers the head medially and above
    facing = (dx * cup_axis[0] + dz * cup_axis[2]) / np.maximum(distance, 1e-3)
    cup = (distance > radius + 2) & (distance < radius + 10) & (facing > 0.0) & (canvas.zone[index] != OUTSIDE)
    canvas.hu[index][cup] = np.where(np.abs(distance - radius - 6) > 2.5, tissue.bone, tissue.marrow)[cup]
    canvas.labels[index][cup] = 0
    label = ORGAN_IDS["femur_head"]
    neck = spline_tube(np.c_[np.stack([femur.head, femur.neck]), [femur.neck_radius] * 2], 2.0)
    paint_tube(canvas, neck, lambda edge, tube_radius: bone_hu(tissue, edge, tube_radius), SUBCUTIS, label=label)
    head = (distance < radius) & (canvas.zone[index] != OUTSIDE)
    canvas.hu[index][head] = bone_hu(tissue, distance / radius, radius)[head]
    canvas.labels[index][head] = label


def femur_below_head(canvas: Canvas, anatomy: Anatomy) -> np.ndarray:
    """(X, Y, Z) bool: the femurs' trochanters and shafts as drawn (bone, label 0), below head and neck.

    Reads the finished canvas and draws no random numbers, so computing it changes nothing else.
    """
    mask = np.zeros(canvas.shape, bool, order="F")
    for rod in anatomy.pelvis.femur_rods:
        field = tube_field(canvas, rod.points, rod.radii)
        if field is None:
            continue
        index = field.region.index
        mask[index] |= (field.distance < 1) & (canvas.zone[index] >= SUBCUTIS) & (canvas.labels[index] == 0)
    return mask


def _ilium_arc(profile: IliumProfile):
    """Per slice, the iliac plate's circular arc: (tangent x, tangent y, chord, normal x, normal y,
    radius, centre x, centre y, cos of the half span), each (nz,) mm."""
    tangent_x = profile.anterior_x - profile.posterior_x
    tangent_y = profile.anterior_y - profile.posterior_y
    chord = np.hypot(tangent_x, tangent_y)
    normal_x, normal_y = tangent_y / chord, -tangent_x / chord  # outward normal (posterolateral)
    radius = (chord**2 / 4 + profile.bulge ** 2) / (2 * profile.bulge)
    center_x = (profile.posterior_x + profile.anterior_x) / 2 - normal_x * (radius - profile.bulge)
    center_y = (profile.posterior_y + profile.anterior_y) / 2 - normal_y * (radius - profile.bulge)
    cos_span = np.sqrt(1 - (chord / (2 * radius)) ** 2)
    return tangent_x, tangent_y, chord, normal_x, normal_y, radius, center_x, center_y, cos_span


def _ilium_region(canvas: Canvas, ilium: IliumProfile, side: int):
    """The box around one iliac wing with its iliacus and gluteal muscle, or None."""
    reach = ilium.thickness.max() / 2 + 35  # plate, iliacus and gluteal muscle around the arc
    lateral = (min(ilium.posterior_x.min(), ilium.anterior_x.min()) - reach,
               ilium.anterior_x.max() + ilium.bulge.max() + reach)
    x_range = lateral if side > 0 else (-lateral[1], -lateral[0])
    y_range = (min(ilium.posterior_y.min(), ilium.anterior_y.min()) - reach,
               max(ilium.posterior_y.max(), ilium.anterior_y.max()) + reach)
    return canvas.box([x_range[0], y_range[0], ilium.z[0]], [x_range[1], y_range[1], ilium.z[-1]])


def _draw_ilium(canvas: Canvas, anatomy: Anatomy, side: int) -> None:
    """One iliac wing: per slice, a plate along a circular arc whose ends and bulge follow the ilium profile."""
    ilium, tissue = anatomy.pelvis.ilium, anatomy.tissue
    region = _ilium_region(canvas, ilium, side)
    if region is None:
        return
    profile = ilium.at(region.z)
    tangent_x, tangent_y, chord, normal_x, normal_y, radius, center_x, center_y, cos_span = _ilium_arc(profile)

    def per_slice(values):  # (nz,) -> (1, 1, nz), broadcast over (x, y)
        return as_float32(values)[None, None, :]

    x = side * region.x[:, None, None]  # mirrored: + is lateral on both sides
    y, z = region.y[None, :, None], region.z[None, None, :]
    dx, dy = x - per_slice(center_x), y - per_slice(center_y)
    rho = np.sqrt(dx**2 + dy**2)
    along = (((x - per_slice(profile.posterior_x)) * per_slice(tangent_x)
              + (y - per_slice(profile.posterior_y)) * per_slice(tangent_y)) / per_slice(chord**2))  # 0 back .. 1 front
    crest = ilium.z[-1] - 30 * anatomy.scale.mean * (2 * along - 1) ** 2  # the iliac crest arches, highest mid-wing
    sector = (dx * per_slice(normal_x) + dy * per_slice(normal_y) > per_slice(cos_span) * rho) & (z < crest)
    offset = rho - per_slice(radius)  # mm from the plate's mid-surface, + outward
    half = per_slice(profile.thickness) / 2
    index = region.index
    zone = canvas.zone[index]
    iliacus = sector & (offset < 0) & (offset > -half - 16) & (z > ilium.z[1]) & (zone >= WALL)
    gluteal = sector & (offset > 0) & (offset < half + 30) & (zone >= WALL)
    muscle = iliacus | gluteal
    canvas.hu[index][muscle] = tissue.muscle
    canvas.labels[index][muscle] = 0
    plate = sector & (np.abs(offset) < half) & (zone != OUTSIDE)
    canvas.hu[index][plate] = np.where(np.abs(offset) > half - 2, tissue.bone, tissue.marrow)[plate]
    canvas.labels[index][plate] = 0


def _draw_sacrum(canvas: Canvas, anatomy: Anatomy) -> None:
    """Sacrum and coccyx: per slice a wide, thin-winged bar with the sacral canal."""
    sacrum, scale, tissue = anatomy.pelvis.sacrum, anatomy.scale, anatomy.tissue
    region = canvas.box([-80 * scale.x, -150, sacrum.z[0]], [80 * scale.x, 0, sacrum.z[-1]])
    if region is None:
        return
    x, y, z = region.x, region.y, region.z
    front, thickness, width = (as_float32(np.interp(z, sacrum.z, values))[None, None, :]
                               for values in (sacrum.front, sacrum.thickness, sacrum.width))
    across = (x[:, None, None] / width) ** 2  # (nx, 1, nz): 0 at the midline, 1 at the edge of the alae
    half = thickness * (1 - 0.5 * across)  # the alae are thinner than the sacral body
    center = front - thickness - 0.3 * thickness * across
    depth = np.abs(y[None, :, None] - center) / half
    inner = np.sqrt(np.clip(1 - across**2, 0, None))
    bone = (depth < inner) & (across < 1) & (canvas.zone[region.index] != OUTSIDE)
    cortex = (depth > inner - 2.5 / half) | (across > 0.9)
    canal_radius = as_float32(np.clip(thickness / 16.0, 0.3, 1.0)) * scale.mean
    canal = (((x[:, None, None] / (10 * canal_radius)) ** 2
              + ((y[None, :, None] - (front - 1.45 * thickness)) / (6 * canal_radius)) ** 2 < 1)
             & (z[None, None, :] > 0.15 * anatomy.body.length))
    canvas.hu[region.index][bone] = np.where(cortex, tissue.bone, tissue.marrow)[bone]
    canvas.hu[region.index][bone & canal] = 10.0
    canvas.labels[region.index][bone] = 0
