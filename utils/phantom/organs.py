"""Painting the labelled organs into the cavity, in priority order (later overwrites earlier)."""

from __future__ import annotations

import numpy as np

from utils.labels import ORGAN_IDS
from utils.phantom.anatomy import Anatomy
from utils.phantom.canvas import AIR_HU, CAVITY, BlobField, Canvas, blob_field, blobs_field, tube_field
from utils.phantom.intensity import texture_at
from utils.phantom.placement import Kidney
from utils.phantom.shapes import Tube


def paint_blob_organ(canvas: Canvas, field: BlobField, label: int, hu) -> np.ndarray:
    """Paint ``level < 1`` of a blob field inside the cavity; returns that mask (the region's shape)."""
    index = field.region.index
    inside = (field.level < 1) & (canvas.zone[index] == CAVITY)
    canvas.hu[index][inside] = hu
    canvas.labels[index][inside] = label
    return inside


def _paint_hollow(canvas: Canvas, anatomy: Anatomy, tube: Tube, label: int, wall_mm: float) -> None:
    """A hollow organ: wall, fluid or mottled content, and air in the non-dependent (anterior) part."""
    field = tube_field(canvas, tube.points, tube.radii)
    if field is None:
        return
    region = field.region
    x_index, y_index, z_index = np.nonzero((field.distance < 1) & (canvas.zone[region.index] == CAVITY))
    ball = field.nearest[x_index, y_index, z_index]
    radius = tube.radii[ball]
    lumen = field.distance[x_index, y_index, z_index] < 1 - wall_mm / radius
    hu = tube.fill_hu[ball]
    stool = np.flatnonzero(tube.stool[ball])
    if stool.size:
        pattern = texture_at(anatomy.texture, region.x[x_index[stool]], region.y[y_index[stool]], region.z[z_index[stool]])
        hu[stool] += 25 * pattern
        hu[stool] = np.where(pattern > 1.5, -650.0 + 100 * pattern, hu[stool])  # gas bubbles in stool
    height = (region.y[y_index] - tube.points[ball, 1]) / radius
    hu = np.where(lumen & (height > tube.air_level[ball]), AIR_HU, hu)
    hu = np.where(lumen, hu, anatomy.tissue.muscle - 8)
    canvas.hu[region.index][x_index, y_index, z_index] = hu
    canvas.labels[region.index][x_index, y_index, z_index] = label


def draw_organs(canvas: Canvas, anatomy: Anatomy) -> None:
    """Small intestine, colon, rectum, bladder, stomach, pancreas, spleen, liver, kidney; then the
    unlabelled gallbladder and prostate."""
    hollow = anatomy.hollow
    _paint_hollow(canvas, anatomy, hollow.small_intestine, ORGAN_IDS["small_intestine"], 2.5)
    _paint_hollow(canvas, anatomy, hollow.duodenum, ORGAN_IDS["small_intestine"], 2.5)
    _paint_hollow(canvas, anatomy, hollow.colon, ORGAN_IDS["colon"], 2.5)
    _paint_hollow(canvas, anatomy, hollow.rectum, ORGAN_IDS["rectum"], 3.0)
    _draw_bladder(canvas, anatomy)
    _paint_hollow(canvas, anatomy, hollow.stomach, ORGAN_IDS["stomach"], 4.0)
    _draw_pancreas(canvas, anatomy)
    _draw_spleen(canvas, anatomy)
    _draw_liver(canvas, anatomy)
    for kidney in anatomy.solid.kidneys:
        _draw_kidney(canvas, anatomy, kidney)
    tissue = anatomy.tissue
    for blob, value in ((anatomy.solid.gallbladder, tissue.bile), (anatomy.solid.prostate, tissue.muscle - 12)):
        field = blobs_field(canvas, [blob])
        if field is not None:
            paint_blob_organ(canvas, field, 0, value)


def _draw_bladder(canvas: Canvas, anatomy: Anatomy) -> None:
    bladder, tissue = anatomy.solid.bladder, anatomy.tissue
    field = blobs_field(canvas, [bladder])
    if field is not None:
        inside = paint_blob_organ(canvas, field, ORGAN_IDS["bladder"], tissue.urine)
        wall = inside & (field.level > 1 - 3.0 / bladder.radii.mean())
        canvas.hu[field.region.index][wall] = tissue.muscle - 10


def _draw_pancreas(canvas: Canvas, anatomy: Anatomy) -> None:
    pancreas, tissue = anatomy.solid.pancreas, anatomy.tissue
    field = tube_field(canvas, pancreas.points, pancreas.radii)
    if field is not None:
        region = field.region
        x_index, y_index, z_index = np.nonzero((field.distance < 1) & (canvas.zone[region.index] == CAVITY))
        lobules = texture_at(anatomy.texture, region.x[x_index], region.y[y_index], region.z[z_index])
        canvas.hu[region.index][x_index, y_index, z_index] = np.where(lobules > 1.2, 0.8 * tissue.pancreas + 0.2 * tissue.fat,
                                                       tissue.pancreas)
        canvas.labels[region.index][x_index, y_index, z_index] = ORGAN_IDS["pancreas"]


def _draw_spleen(canvas: Canvas, anatomy: Anatomy) -> None:
    solid = anatomy.solid
    field = blobs_field(canvas, [solid.spleen])
    if field is not None:
        region = field.region
        field.level[blob_field(solid.spleen_hilum, region.x, region.y, region.z) < 1] = np.inf  # concave hilum
        paint_blob_organ(canvas, field, ORGAN_IDS["spleen"], anatomy.tissue.spleen)


def _draw_liver(canvas: Canvas, anatomy: Anatomy) -> None:
    tissue = anatomy.tissue
    field = blobs_field(canvas, anatomy.solid.liver)
    if field is None:
        return
    paint_blob_organ(canvas, field, ORGAN_IDS["liver"], tissue.liver)
    for vessel in anatomy.solid.liver_vessels:  # hepatic and portal veins: slightly darker, still liver
        vessel_field = tube_field(canvas, vessel.points, vessel.radii)
        if vessel_field is not None:
            index = vessel_field.region.index
            inside = (vessel_field.distance < 1) & (canvas.labels[index] == ORGAN_IDS["liver"])
            canvas.hu[index][inside] = tissue.liver - 12


def _draw_kidney(canvas: Canvas, anatomy: Anatomy, kidney: Kidney) -> None:
    """Perirenal fat (inside Gerota's fascia), the kidney, its sinus fat and the renal pelvis (unlabelled)."""
    tissue = anatomy.tissue
    region = canvas.box(*kidney.body.bounds(1.35))
    if region is None:
        return
    index, coords = region.index, (region.x, region.y, region.z)
    level = blob_field(kidney.body, *coords)
    perirenal = (level < 1.35) & (canvas.zone[index] == CAVITY)
    canvas.hu[index][perirenal] = tissue.fat + 5
    canvas.labels[index][perirenal] = 0
    inside = paint_blob_organ(canvas, BlobField(region, level), ORGAN_IDS["kidney"], tissue.kidney)
    hilum = inside & (blob_field(kidney.sinus, *coords) < 1)
    canvas.hu[index][hilum] = tissue.fat + 15
    canvas.labels[index][hilum] = 0
    renal_pelvis = (blob_field(kidney.renal_pelvis, *coords) < 1) & (canvas.zone[index] == CAVITY)
    canvas.hu[index][renal_pelvis] = tissue.urine
    canvas.labels[index][renal_pelvis] = 0
