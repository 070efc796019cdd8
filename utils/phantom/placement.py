"""Where the organs, vessels, muscles and bones of one case lie: their shapes in mm.

Each function draws from the case's generator in a fixed order (called in this order by
:func:`utils.phantom.anatomy.sample_anatomy`); coordinates are the reference frame of
:class:`utils.phantom.anatomy.ReferenceSampler`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np

from utils.phantom.bowel import hollow_organ, small_bowel_walk
from utils.phantom.shapes import Blob, Tube, child_blob, spline_tube

if TYPE_CHECKING:
    from utils.phantom.anatomy import ReferenceSampler, Spine


@dataclass(frozen=True)
class Kidney:
    body: Blob
    sinus: Blob  # renal sinus fat, cut out of the kidney label
    renal_pelvis: Blob  # urine, unlabelled


@dataclass(frozen=True)
class Femur:
    side: int  # +1 the patient's right, -1 left
    head: np.ndarray  # (3,) centre, mm
    radius: float
    neck: np.ndarray  # (3,) distal end of the neck
    neck_radius: float


@dataclass(frozen=True)
class SolidOrgans:
    liver: list[Blob]  # right lobe, left lobe, caudate region
    liver_vessels: list[Tube]  # hepatic and portal veins, drawn darker inside the liver
    spleen: Blob
    spleen_hilum: Blob  # cut out of the spleen: its concave hilum
    kidneys: list[Kidney]  # right, then left
    bladder: Blob
    prostate: Blob  # unlabelled
    gallbladder: Blob  # unlabelled
    pancreas: Tube


@dataclass(frozen=True)
class HollowOrgans:
    stomach: Tube
    duodenum: Tube  # labelled small intestine
    colon: Tube
    rectum: Tube
    small_intestine: Tube


@dataclass(frozen=True)
class IliumProfile:
    """One iliac wing per height (right side; mirrored for the left), each (6,) mm.

    A circular arc from its posterior end (sacroiliac joint, sciatic notch) to its anterior end
    (iliac spines), bulging posterolaterally.
    """

    z: np.ndarray
    posterior_x: np.ndarray
    posterior_y: np.ndarray
    anterior_x: np.ndarray
    anterior_y: np.ndarray
    bulge: np.ndarray
    thickness: np.ndarray

    def at(self, heights) -> IliumProfile:
        """The profile interpolated at ``heights`` (nz,) mm: every field (nz,)."""
        values = {field.name: np.interp(heights, self.z, getattr(self, field.name))
                  for field in fields(self) if field.name != "z"}
        return replace(self, z=np.asarray(heights), **values)


@dataclass(frozen=True)
class SacrumProfile:
    """Sacrum per height, each (6,) mm: anterior surface y, half thickness, half width."""

    z: np.ndarray
    front: np.ndarray
    thickness: np.ndarray
    width: np.ndarray


@dataclass(frozen=True)
class PelvicBones:
    femurs: list[Femur]  # right, then left
    bone_rods: list[Tube]  # in drawing order: per side trochanter, shaft, pubic rami, ischium
    femur_rods: list[Tube]  # the trochanter and shaft tubes of both femurs (also in bone_rods)
    ilium: IliumProfile
    sacrum: SacrumProfile


def sample_solid_organs(sampler: ReferenceSampler) -> SolidOrgans:
    """Liver (three lobes and its veins), spleen, kidneys, bladder, prostate, gallbladder, pancreas."""
    uniform = sampler.rng.uniform
    liver = [
        sampler.blob((68, -5, 0.80), (72, 95, 90), long_axis=(-0.35, 0.1, 1), hint=(0.94, -0.34, 0.3), bump=0.08),
        sampler.blob((-20, 45, 0.88), (70, 38, 36), long_axis=(0.1, 0.3, 1), hint=(1, -0.15, 0)),
        sampler.blob((25, -10, 0.86), (30, 35, 35)),
    ]
    liver_vessels = [spline_tube(sampler.jitter_path(control), 2.0) for control in (
        [(22, -10, 0.95, 7), (60, 5, 0.90, 5), (95, 20, 0.85, 3)],  # hepatic veins
        [(22, -10, 0.95, 7), (35, 35, 0.91, 5), (45, 60, 0.87, 3)],
        [(22, -10, 0.95, 6), (-10, 30, 0.92, 4), (-40, 45, 0.90, 3)],
        [(35, 0, 0.77, 7), (65, 5, 0.76, 5), (95, 10, 0.74, 3)],  # portal branches
        [(35, 0, 0.77, 6), (30, 25, 0.80, 4), (20, 45, 0.82, 3)],
    )]
    spleen = sampler.blob((-85, -40, 0.83), (24, 55, 44), long_axis=(0, 0.3, 1), hint=(-0.7, -0.7, 0))
    spleen_hilum = child_blob(spleen, (-1.35, 0.15, 0.0), (0.75, 0.55, 0.7))
    kidneys = []
    for side, z_fraction in ((1, uniform(0.64, 0.67)), (-1, uniform(0.67, 0.70))):  # the left kidney sits higher
        kidney = sampler.blob((side * 72, -25, z_fraction), (30, 22, 54), long_axis=(-side * 0.25, -0.2, 1),
                              hint=(side * 0.87, -0.5, 0), size=0.08, bump=0.04)  # hilum faces anteromedially
        kidneys.append(Kidney(kidney, sinus=child_blob(kidney, (-0.62, 0.1, 0), (0.55, 0.45, 0.5)),
                              renal_pelvis=child_blob(kidney, (-0.85, 0.15, -0.05), (0.35, 0.3, 0.2))))
    fill = uniform(0.75, 1.25)
    bladder = sampler.blob((0, 30, 0.15), (42 * fill, 33 * fill, 34 * fill), hint=(1, 0, 0), size=0.08, bump=0.05)
    prostate = sampler.blob((0, 28, 0.0), (20, 16, 16), size=0.1, bumps=0)
    gallbladder = sampler.blob((42, 38, 0.70), (14, 14, 30), long_axis=(0.2, 0.5, 1), size=0.2, bumps=1)
    pancreas = sampler.jitter_path([(32, 10, 0.60, 19), (30, 15, 0.64, 20), (8, 30, 0.67, 15), (-22, 28, 0.69, 14),
                                    (-45, 18, 0.71, 13), (-66, 2, 0.73, 10)], xy=3.0)  # head in the duodenal C
    return SolidOrgans(liver, liver_vessels, spleen, spleen_hilum, kidneys, bladder, prostate, gallbladder,
                       spline_tube(pancreas, 2.0))


def sample_hollow_organs(rng: np.random.Generator, sampler: ReferenceSampler, solid: SolidOrgans) -> HollowOrgans:
    """Stomach, duodenum, colon, rectum, then small-intestine loops in the space left."""
    uniform = rng.uniform
    jitter = sampler.jitter_path
    stomach = hollow_organ(rng, jitter([(-45, -35, 0.93, 34), (-62, -10, 0.88, 40), (-60, 20, 0.81, 38),
                                        (-45, 45, 0.74, 32), (-15, 55, 0.69, 25), (15, 48, 0.67, 19),
                                        (33, 30, 0.69, 12)]),
                           fill=(15, 35), air=uniform(-0.1, 0.7), air_from=0.3, stool=True, step=5.0)
    duodenum = hollow_organ(rng, jitter([(36, 30, 0.69, 12), (52, 15, 0.665, 13), (58, -2, 0.61, 13),
                                         (45, -6, 0.565, 12), (15, 8, 0.55, 11), (-15, 10, 0.56, 11),
                                         (-35, 12, 0.60, 12)], xy=2.0),
                            fill=(5, 30), air=uniform(0.3, 1.2), step=3.0)
    colon = np.array([  # caecum, ascending, hepatic flexure, transverse, splenic flexure, descending, sigmoid
        (80, 22, 0.29, 27), (90, 8, 0.36, 24), (98, 0, 0.45, 22), (100, -2, 0.53, 21),
        (90, 8, 0.60, 21), (55, 50, 0.585, 20), (15, 60, 0.53, 19), (-25, 58, 0.56, 19),
        (-60, 40, 0.64, 19), (-88, 5, 0.73, 18), (-96, -2, 0.65, 17), (-100, -4, 0.55, 16),
        (-100, 0, 0.44, 16), (-92, 5, 0.34, 15), (-75, 30, 0.27, 15), (-40, 42, 0.29, 15),
        (-12, 25, 0.31, 15), (5, 0, 0.29, 15), (0, -36, 0.255, 16)])
    colon[5:9, 2] -= uniform(0.0, 0.06)  # the transverse colon sags by a varying amount
    levels = np.interp(np.arange(len(colon)), [0, 4, 7, 9, 13, 18], [0.3, 0.1, -0.4, 0.0, 0.5, 0.4])
    colon = hollow_organ(rng, jitter(colon), fill=(0, 40), air=levels + uniform(-0.3, 0.4), stool=True,
                         haustra=uniform(18, 26), step=4.5)
    rectum = hollow_organ(rng, jitter([(0, -36, 0.255, 17), (0, -55, 0.20, 20), (0, -62, 0.13, 21),
                                       (0, -52, 0.06, 16), (0, -38, 0.0, 11), (0, -32, -0.04, 9)], xy=3.0),
                          fill=(10, 40), air=uniform(0.2, 1.2), stool=True, step=3.5)
    scale = sampler.scale
    obstacles = [(colon.points, colon.radii), (stomach.points, stomach.radii),
                 (duodenum.points, duodenum.radii), (rectum.points, rectum.radii),
                 (solid.bladder.center[None], solid.bladder.radii.max(keepdims=True)),
                 (np.array([kidney.body.center for kidney in solid.kidneys]), np.array([50.0, 50.0])),
                 (sampler.mm([(0, sampler.spine_y(height), height) for height in np.linspace(0.3, 0.7, 9)]),
                  np.full(9, 30 * scale))]
    small_intestine = small_bowel_walk(rng, sampler, start=duodenum.points[-1], end=colon.points[0],
                                       obstacles=obstacles)
    return HollowOrgans(stomach, duodenum, colon, rectum, small_intestine)


def _vessel_paths(spine_y) -> list:
    """Reference control points of the aorta, IVC and their branches; ``spine_y(z_fraction)``."""

    def along_spine(x, dy, z_fractions, radii):
        return [(x, spine_y(height) + dy, height, radius) for height, radius in zip(z_fractions, radii)]

    return [
        along_spine(-10, 29, [1.03, 0.9, 0.8, 0.7, 0.6, 0.5, 0.455], [12, 12, 11.5, 11, 10.5, 10, 9.5]),  # aorta
        along_spine(22, 26, [1.03, 0.9, 0.8, 0.7, 0.6, 0.5, 0.44], [11, 12, 12, 12, 11, 10, 9]),  # IVC
        [(-8, spine_y(0.455) + 26, 0.455, 7), (-30, spine_y(0.38) + 20, 0.38, 6.5), (-62, 10, 0.22, 6),
         (-75, 30, 0.1, 5.5), (-78, 38, -0.03, 5)],  # left iliac artery
        [(-8, spine_y(0.455) + 26, 0.455, 7), (20, spine_y(0.38) + 22, 0.38, 6.5), (62, 10, 0.22, 6),
         (75, 30, 0.1, 5.5), (78, 38, -0.03, 5)],  # right iliac artery
        [(18, spine_y(0.44) + 18, 0.44, 8), (-25, spine_y(0.38) + 10, 0.38, 7.5), (-60, 2, 0.22, 7),
         (-70, 24, 0.1, 6), (-70, 32, -0.03, 6)],  # left iliac vein
        [(22, spine_y(0.44) + 18, 0.44, 8), (30, spine_y(0.38) + 12, 0.38, 7.5), (60, 2, 0.22, 7),
         (70, 24, 0.1, 6), (70, 32, -0.03, 6)],  # right iliac vein
        [(-8, spine_y(0.72) + 40, 0.72, 4.5), (-3, 14, 0.66, 4.5), (0, 18, 0.55, 4), (5, 30, 0.45, 3.5)],  # SMA
        [(10, 28, 0.45, 5), (8, 20, 0.6, 6.5), (6, 14, 0.68, 7.5), (20, 5, 0.74, 8), (35, 0, 0.77, 8)],  # SMV, portal
        [(6, 14, 0.68, 5.5), (-25, 14, 0.70, 5), (-50, 6, 0.715, 5), (-70, -12, 0.74, 4.5)],  # splenic vein
        [(-62, -18, 0.69, 5), (-30, -4, 0.68, 5), (-8, 9, 0.68, 4.5), (22, 2, 0.68, 5)],  # left renal vein
        [(60, -18, 0.655, 5), (25, -4, 0.665, 5)],  # right renal vein
    ]


def _muscle_paths(side: int, spine_y) -> list:
    """Reference control points of one side's psoas, back, pelvic and hip muscles."""
    return [
        [(side * 22, spine_y(0.78), 0.78, 5), (side * 30, spine_y(0.68) + 2, 0.68, 10),
         (side * 40, spine_y(0.55) + 4, 0.55, 16), (side * 48, spine_y(0.45) + 8, 0.45, 20),
         (side * 56, spine_y(0.36) + 14, 0.36, 22), (side * 68, 2, 0.25, 21),
         (side * 78, 24, 0.14, 18), (side * 80, 36, 0.05, 15), (side * 80, 42, -0.03, 14)],  # psoas
        [(side * 52, spine_y(0.80) - 25, 0.80, 5), (side * 58, spine_y(0.68) - 27, 0.68, 12),
         (side * 62, spine_y(0.55) - 26, 0.55, 13), (side * 68, spine_y(0.45) - 22, 0.45, 8)],  # quadratus lumborum
        [(side * 60, -5, 0.02, 11), (side * 62, -12, 0.12, 12), (side * 58, -22, 0.2, 8)],  # obturator internus
        [(side * 112, -30, 0.30, 18), (side * 118, -18, 0.18, 22), (side * 122, -8, 0.07, 16),
         (side * 128, -6, 0.02, 10)],  # gluteus medius and minimus
        [(side * 115, 25, 0.30, 7), (side * 105, 50, 0.12, 9), (side * 95, 58, -0.03, 10)],  # sartorius
        [(side * 125, 22, 0.25, 8), (side * 130, 20, 0.08, 12), (side * 132, 18, -0.03, 12)],  # tensor fasciae
        [(side * 104, 38, 0.12, 8), (side * 100, 44, -0.03, 13)],  # rectus femoris
        [(side * 40, 45, 0.05, 12), (side * 50, 35, -0.03, 18)],  # pectineus, adductors
        [(side * 65, -30, 0.03, 10), (side * 92, -32, -0.01, 11)],  # quadratus femoris
    ]


def sample_vessels_and_muscles(sampler: ReferenceSampler) -> tuple[list[Tube], list[Tube]]:
    """Aorta, IVC and their branches (unlabelled); psoas, back, pelvic and hip muscles: ([Tube], [Tube])."""
    vessels = [spline_tube(sampler.jitter_path(control, xy=1.5, radius=0.05), 3.0)
               for control in _vessel_paths(sampler.spine_y)]
    muscles = []
    for side in (1, -1):
        muscles += [spline_tube(sampler.jitter_path(control, xy=2.0, radius=0.06), 3.0)
                    for control in _muscle_paths(side, sampler.spine_y)]
    return vessels, muscles


def sample_pelvic_bones(rng: np.random.Generator, sampler: ReferenceSampler, spine: Spine) -> PelvicBones:
    """Femurs, pubis and ischium (as rods), ilium and sacrum profiles along z."""
    uniform, length, scale = rng.uniform, sampler.length, sampler.scale
    femurs = []
    for side in (1, -1):
        head = sampler.mm([(side * 88, 5, 0.09)])[0] + rng.normal(0, 2.5, 3)
        radius = 24 * scale * uniform(0.92, 1.08)
        neck = sampler.mm([(side * 118, -2, 0.035)])[0] + rng.normal(0, 2.5, 3)
        femurs.append(Femur(side=side, head=head, radius=radius, neck=neck, neck_radius=0.62 * radius))
    bone_rods, femur_rods = [], []
    for side, femur in zip((1, -1), femurs):
        trochanter = Tube(np.array([femur.neck + [side * 10 * scale, -10 * scale, 0.0]]), np.array([19.0 * scale]))
        shaft = [femur.neck + [side * 8 * scale, -4 * scale, -0.02 * length],
                 femur.neck + [side * 14 * scale, -2 * scale, -0.3 * length]]
        shaft = spline_tube(np.c_[np.array(shaft), [16 * scale, 15 * scale]], 3.0)
        femur_rods += [trochanter, shaft]
        bone_rods += [
            trochanter, shaft,
            spline_tube(sampler.mm([(side * 72, 22, 0.10, 8), (side * 40, 45, 0.085, 6.5),
                                    (side * 8, 58, 0.07, 7)]), 2.5),  # superior pubic ramus
            spline_tube(sampler.mm([(side * 6, 60, 0.08, 8), (side * 6, 58, 0.02, 8)]), 2.5),  # pubic body
            spline_tube(sampler.mm([(side * 8, 55, 0.03, 7), (side * 30, 35, -0.01, 6.5),
                                    (side * 52, 10, -0.04, 7)]), 2.5),  # inferior ramus
            spline_tube(sampler.mm([(side * 72, -18, 0.10, 11), (side * 64, -36, 0.02, 11),
                                    (side * 56, -42, -0.04, 10)]), 2.5),  # ischium
        ]
    flare = uniform(0.94, 1.06)
    ilium = IliumProfile(
        z=np.array([0.13, 0.20, 0.27, 0.34, 0.40, 0.455]) * length,
        posterior_x=np.array([62, 58, 52, 48, 52, 62.0]) * sampler.scale_x,
        posterior_y=np.array([-30, -50, -66, -72, -70, -62.0]) * sampler.scale_y,
        anterior_x=np.array([88, 100, 112, 120, 124, 116.0]) * sampler.scale_x * flare,
        anterior_y=np.array([5, 10, 12, 12, 8, -8.0]) * sampler.scale_y,
        bulge=np.array([5, 7, 9, 11, 11, 9.0]) * scale, thickness=np.array([22, 13, 8, 6, 5.5, 6.0]) * scale,
    )
    sacrum = SacrumProfile(z=np.array([0.06, 0.10, 0.15, 0.22, 0.28, spine.z_sacrum_top / length + 0.01]) * length,
                           front=(np.array([-68, -76, -84, -80, -66, -44.0]) + rng.normal(0, 3, 6)) * sampler.scale_y,
                           thickness=np.array([5, 7, 10, 14, 17, 16.0]) * sampler.scale_y,
                           width=np.array([8, 14, 25, 45, 58, 52.0]) * sampler.scale_x)
    return PelvicBones(femurs, bone_rods, femur_rods, ilium, sacrum)
