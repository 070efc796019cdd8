"""The vertebral column above the sacrum: bodies, discs, arches, processes, canal and spinal cord."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.labels import ORGAN_IDS
from utils.phantom.anatomy import Anatomy
from utils.phantom.canvas import OUTSIDE, WALL, Canvas
from utils.phantom.shapes import as_float32, smoothstep


@dataclass(frozen=True)
class _Vertebrae:
    """Per slice of the spine's box, each (nz,): the vertebral body's centre y and radii, the
    canal's centre y and radii, how thoracic the level is, where lumbar-or-higher bone and discs are,
    and the phase within one vertebra (0 .. 1)."""

    body_y: np.ndarray
    body_rx: np.ndarray
    body_ry: np.ndarray
    canal_y: np.ndarray
    canal_rx: np.ndarray
    canal_ry: np.ndarray
    thoracic: np.ndarray
    above_sacrum: np.ndarray
    disc: np.ndarray
    phase: np.ndarray


def _vertebrae(anatomy: Anatomy, z) -> _Vertebrae:
    spine, scale = anatomy.spine, anatomy.scale.mean
    z_fraction = z / anatomy.body.length
    body_y = as_float32(np.interp(z, spine.z, spine.y))
    thoracic = smoothstep((z_fraction - 0.78) / 0.1)
    body_ry = as_float32((16 - 2 * thoracic) * scale)
    phase = ((z - spine.z_sacrum_top) / spine.vertebra_period) % 1.0
    above_sacrum = z > spine.z_sacrum_top
    return _Vertebrae(body_y=body_y, body_rx=as_float32((23 - 5 * thoracic) * scale), body_ry=body_ry,
                      canal_y=body_y - body_ry - 10 * scale, canal_rx=as_float32((11 - 3 * thoracic) * scale),
                      canal_ry=as_float32((9 - 1 * thoracic) * scale), thoracic=thoracic,
                      above_sacrum=above_sacrum, disc=above_sacrum & (phase < 0.22), phase=phase)


def draw_spine(canvas: Canvas, anatomy: Anatomy) -> None:
    """Paraspinal muscles, vertebrae above the sacrum, the canal, and the spinal cord (labelled)."""
    scale, tissue = anatomy.scale.mean, anatomy.tissue
    region = canvas.box([-60 * scale, anatomy.spine.y.min() - 90 * scale, 0],
                        [60 * scale, anatomy.spine.y.max() + 25 * scale, canvas.z[-1] + 1])
    if region is None:
        return
    z = region.z
    vertebra = _vertebrae(anatomy, z)
    x, y = region.x[:, None, None], region.y[None, :, None]
    zone = canvas.zone[region.index]
    inside_body = zone != OUTSIDE
    hu, labels = canvas.hu[region.index], canvas.labels[region.index]

    def per_slice(values):  # (nz,) -> (1, 1, nz), broadcast over (x, y)
        return values[None, None, :]

    def put(mask, value):
        mask = mask & inside_body
        hu[mask] = value if np.isscalar(value) else np.broadcast_to(value, mask.shape)[mask]
        labels[mask] = 0

    size = as_float32(scale * (0.35 + 0.65 * smoothstep((z / anatomy.body.length - 0.2) / 0.15)))  # thin over the sacrum
    paraspinal = (np.abs((np.abs(x) - 30 * per_slice(size)) / (26 * per_slice(size))) ** 2.5
                  + np.abs((y - per_slice(vertebra.canal_y) + 22 * per_slice(size)) / (21 * per_slice(size))) ** 2.5) < 1
    put(paraspinal & (zone >= WALL), tissue.muscle)
    canal_y, canal_rx, canal_ry = per_slice(vertebra.canal_y), per_slice(vertebra.canal_rx), per_slice(vertebra.canal_ry)
    body_level = (x / per_slice(vertebra.body_rx)) ** 2 + ((y - per_slice(vertebra.body_y)) / per_slice(vertebra.body_ry)) ** 2
    arch_level = (x / (canal_rx + 6 * scale)) ** 2 + ((y - canal_y) / (canal_ry + 6 * scale)) ** 2
    canal_level = (x / canal_rx) ** 2 + ((y - canal_y) / canal_ry) ** 2
    put((body_level < 1) & per_slice(vertebra.above_sacrum & ~vertebra.disc),
        np.where(body_level > 0.8, tissue.bone, tissue.marrow))
    put((body_level < 1.08) & per_slice(vertebra.disc), 85.0)
    arch = per_slice(vertebra.above_sacrum)
    put((arch_level < 1) & arch, np.where(arch_level > 0.55, tissue.bone, tissue.marrow))
    _put_processes(put, x, y, vertebra, scale, tissue.bone)
    put((canal_level < 1) & arch, 10.0)
    taper = as_float32(np.clip((z - anatomy.spine.z_conus) / 20.0, 0, 1))
    cord_level = ((x / per_slice(5.5 * scale * taper + 1e-3)) ** 2
                  + ((y - per_slice(vertebra.canal_y + 1)) / per_slice(4.5 * scale * taper + 1e-3)) ** 2)
    cord = (cord_level < 1) & per_slice(z > anatomy.spine.z_conus) & inside_body
    hu[cord] = 35.0
    labels[cord] = ORGAN_IDS["spinal_cord"]


def _put_processes(put, x, y, vertebra: _Vertebrae, scale: float, bone_hu: float) -> None:
    """Spinous and transverse processes, each on its part of every vertebra's height."""
    phase, above_sacrum = vertebra.phase, vertebra.above_sacrum
    spinous_top = (vertebra.canal_y - vertebra.canal_ry - 4 * scale)[None, None, :]
    spinous = ((np.abs(x) < 3.5 * scale) & (y < spinous_top) & (y > spinous_top - 24 * scale)
               & (above_sacrum & (phase > 0.3) & (phase < 0.85))[None, None, :])
    put(spinous, bone_hu)
    transverse_length = as_float32((38 - 16 * vertebra.thoracic) * scale)[None, None, :]
    transverse = ((np.abs(x) > vertebra.canal_rx[None, None, :]) & (np.abs(x) < transverse_length)
                  & (np.abs(y - vertebra.canal_y[None, None, :] - 4 * scale) < 3.5 * scale)
                  & (above_sacrum & (phase > 0.45) & (phase < 0.65))[None, None, :])
    put(transverse, bone_hu)
