"""Synthetic abdominal CT phantom: the built-in dataset, so the whole pipeline runs with no data.

:func:`make_phantom` draws one case from ``np.random.default_rng([seed, case_index])``: a
non-contrast CT volume in HU and the truth for our 11 organs, in RAS+ voxel axes (the x index
grows toward the patient's *right*, y toward anterior, z toward the head; this is what
``utils.volume_io`` hands out after canonical reorientation) with the affine ``diag(sx, sy, sz)``.

The anatomy is drawn in millimetres before any grid exists, so a case is the same body at any
``size`` or ``num_slices``; only the noise depends on the grid. Shapes are perturbed ellipsoids
("blobs") and tubes (balls along a spline), evaluated only inside their bounding boxes.

Drawing order, later overwriting earlier:
    1. body wall, slice by slice: skin, subcutaneous fat, muscle wall and ribs, the abdominal
       cavity (visceral fat), lung bases, diaphragm and heart above the diaphragm, CT table;
    2. organs, clipped to the cavity, in this priority: small intestine, colon, rectum, bladder,
       stomach, pancreas, spleen, liver, kidney (then the unlabelled gallbladder and prostate);
    3. vessels, muscles and bones, which set the label back to 0 except for the spinal cord and
       the femur heads.
"""

from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from utils.labels import ABDOMENCT1K_IDS, COLORS, DISPLAY_NAMES, ORGAN_IDS, PKU_EXAMPLE_IDS
from utils.volume_io import save_volume

LAYOUTS = ("full", "abdomenct1k", "pku")  # label conventions the phantom can write
# one seed per label layout, so bodies and case ids differ between folders; `make demo` and the
# notebooks use these: the partial layouts to train, "full" held out
PHANTOM_SEEDS = {"pku": 1, "abdomenct1k": 2, "full": 3}
REFERENCE_LENGTH_MM = 400.0  # anatomy below is written for a 400 mm span, then scaled per case

# Tissue zones of the body wall; organs are drawn only in the cavity.
_OUTSIDE, _SUBCUTIS, _WALL, _CAVITY, _LUNG, _MEDIASTINUM = range(6)
_AIR_HU = -1000.0


@dataclass
class Phantom:
    """One synthetic case.

    Attributes:
        hu: (X, Y, Z) int16 HU, RAS+ voxel axes (x toward the patient's right, y anterior,
            z superior).
        labels: (X, Y, Z) uint8, our 12-class ids (utils.labels.ORGANS), the full truth.
        left: (X, Y, Z) bool, True on the patient's left (x left of the midline); splits the
            paired kidneys and femur heads for the ``pku`` layout.
        affine: (4, 4) RAS affine, ``diag(sx, sy, sz)`` plus the origin.
        spacing: (sx, sy, sz) in mm.
    """

    hu: np.ndarray
    labels: np.ndarray
    left: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


# --------------------------------------------------------------------------- public API


def make_phantom(seed: int, case_index: int = 0, size: int = 512, num_slices: int | None = None) -> Phantom:
    """Draw one synthetic abdominal CT case, deterministic in ``(seed, case_index)``.

    Args:
        seed: dataset seed.
        case_index: case number within the dataset.
        size: in-plane voxels; the field of view is fixed per case (0.6-0.9 mm at 512), so a
            smaller size means larger voxels of the same body.
        num_slices: number of axial slices; default from the case's slice thickness (2.5-5 mm).
            The slices always span the same anatomy (350-450 mm, femur heads to lung bases).

    Returns:
        A :class:`Phantom` of shape ``(size, size, Z)``.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    if num_slices is not None and num_slices < 2:
        raise ValueError(f"num_slices must be at least 2, got {num_slices}")
    rng = np.random.default_rng([seed, case_index])
    anatomy = _sample_anatomy(rng)
    canvas = _Canvas(anatomy, size, num_slices)
    _draw_body(canvas, anatomy)
    _draw_organs(canvas, anatomy)
    _draw_vessels_muscles_bones(canvas, anatomy)
    hu = _finish_image(canvas, anatomy, rng)
    left = np.empty(canvas.shape, dtype=bool, order="F")
    left[...] = (canvas.x < 0)[:, None, None]  # patient's left: x below the midline in RAS
    return Phantom(hu=hu, labels=canvas.labels, left=left, affine=canvas.affine, spacing=canvas.spacing)


def layout_labels(phantom: Phantom, layout: str) -> np.ndarray:
    """The phantom's truth in one source's label convention.

    Args:
        phantom: a case from :func:`make_phantom`.
        layout: ``full`` (our ids), ``abdomenct1k`` (1 liver, 2 kidney, 3 spleen, 4 pancreas) or
            ``pku`` (``PKU_EXAMPLE_IDS``; spleen and pancreas not annotated).

    Returns:
        (X, Y, Z) uint8 mask; organs the layout does not annotate are 0.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if layout == "full":
        return phantom.labels.copy(order="K")
    lut = np.zeros(len(ORGAN_IDS), dtype=np.uint8)
    if layout == "abdomenct1k":
        for source_id, name in ABDOMENCT1K_IDS.items():
            lut[ORGAN_IDS[name]] = source_id
        return lut[phantom.labels]
    for name, source_id in PKU_EXAMPLE_IDS.items():
        if name in ORGAN_IDS:
            lut[ORGAN_IDS[name]] = source_id
    mask = lut[phantom.labels]
    for organ in ("kidney", "femur_head"):
        paired = phantom.labels == ORGAN_IDS[organ]
        mask[paired & phantom.left] = PKU_EXAMPLE_IDS[f"{organ}_left"]
        mask[paired & ~phantom.left] = PKU_EXAMPLE_IDS[f"{organ}_right"]
    return mask


def case_id(seed: int, case_index: int) -> str:
    """``Case_{seed * 1000 + case_index:05d}``; case_index must be below 1000 so ids stay unique."""
    if not 0 <= case_index < 1000 or seed < 0:
        raise ValueError(f"need seed >= 0 and 0 <= case_index < 1000, got {seed}, {case_index}")
    return f"Case_{seed * 1000 + case_index:05d}"


def write_phantom_dataset(out_dir, cases: int, layout: str, seed: int = 0, size: int = 512,
                          num_slices: int | None = None, workers: int = 1, progress: bool = True) -> list[str]:
    """Write ``cases`` phantoms as ``OUT/Image/<id>_0000.nii.gz`` (int16 HU) and ``OUT/Mask/<id>.nii.gz``.

    Masks hold ``layout`` ids (see :func:`layout_labels`). Each file is written atomically; a case
    whose two files both exist is skipped, so an interrupted run can be rerun.

    Returns:
        The case ids, in case order (skipped ones included).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    out = Path(out_dir)
    ids = [case_id(seed, index) for index in range(cases)]
    todo = [index for index, cid in enumerate(ids)
            if not (_image_path(out, cid).exists() and _mask_path(out, cid).exists())]
    jobs = [(out, seed, index, layout, size, num_slices) for index in todo]
    bar = tqdm(total=cases, initial=cases - len(todo), desc=f"phantom {layout}", unit="case", disable=not progress)
    with bar:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(_write_case, jobs):
                    bar.update()
        else:
            for job in jobs:
                _write_case(job)
                bar.update()
    return ids


def render_phantom_preview(phantom: Phantom, path) -> None:
    """Save a PNG: axial slices at the kidneys and the pelvis and a coronal slice, truth overlaid.

    Radiological display (patient's right on the image's left, anterior and head up), CT window
    [-400, 400] HU, organ colours and names from ``utils.labels``. Renders on matplotlib's Agg
    canvas directly, so the caller's backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colors = np.asarray(COLORS, dtype=np.float32) / 255.0
    fig = Figure(figsize=(13.5, 5.0), facecolor="black")
    FigureCanvasAgg(fig)
    for ax, (title, image, mask, aspect) in zip(fig.subplots(1, 3), _preview_views(phantom)):
        image, mask = image[::-1, ::-1], mask[::-1, ::-1]  # (rows, cols): anterior/head up, patient's right left
        overlay = np.concatenate([colors[mask], np.where(mask > 0, 0.4, 0.0)[..., None]], axis=-1)  # (H, W, 4)
        ax.imshow(np.clip((image + 400.0) / 800.0, 0, 1), cmap="gray", vmin=0, vmax=1, aspect=aspect,
                  interpolation="nearest")
        ax.imshow(overlay, aspect=aspect, interpolation="nearest")
        ax.set_title(title, color="white", fontsize=11)
        ax.text(0.01, 0.5, "R", color="white", transform=ax.transAxes, fontsize=10, va="center")
        ax.text(0.97, 0.5, "L", color="white", transform=ax.transAxes, fontsize=10, va="center")
        ax.set_axis_off()
    present = np.flatnonzero(np.bincount(phantom.labels.ravel(), minlength=len(COLORS))[1:]) + 1
    handles = [Patch(color=colors[i], label=DISPLAY_NAMES[i]) for i in present]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9,
               labelcolor="white", handlelength=1.2, columnspacing=1.0)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.08, wspace=0.03)
    _save_png_with_palette(fig, path)


def _preview_views(phantom: Phantom) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(title, HU (rows, cols), labels (rows, cols), pixel aspect) for the three preview panels."""
    labels, hu = phantom.labels, phantom.hu
    sx, sy, sz = phantom.spacing
    per_slice = np.stack([np.bincount(labels[:, :, k].ravel(), minlength=len(COLORS))
                          for k in range(labels.shape[2])])  # (Z, classes)
    z_kidney = int(np.argmax(per_slice[:, ORGAN_IDS["kidney"]]))
    z_pelvis = int(np.argmax(per_slice[:, ORGAN_IDS["femur_head"]] + per_slice[:, ORGAN_IDS["bladder"]]))
    y_kidney = np.nonzero(labels == ORGAN_IDS["kidney"])[1]
    y_bowel = np.nonzero(labels == ORGAN_IDS["small_intestine"])[1]
    y_cut = labels.shape[1] // 2
    if y_kidney.size and y_bowel.size:  # coronal through the kidneys' front and the bowel behind
        y_cut = int(0.6 * y_kidney.mean() + 0.4 * y_bowel.mean())
    return [
        ("axial, kidneys", hu[:, :, z_kidney].T, labels[:, :, z_kidney].T, sy / sx),
        ("axial, pelvis", hu[:, :, z_pelvis].T, labels[:, :, z_pelvis].T, sy / sx),
        ("coronal", hu[:, y_cut, :].T, labels[:, y_cut, :].T, sz / sx),
    ]


def _save_png_with_palette(fig, path) -> None:
    """Save a figure as an 8-bit palette PNG (small) whose palette includes the exact organ colours."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, facecolor="black")
    buffer.seek(0)
    rgb = Image.open(buffer).convert("RGB")
    free = 256 - len(COLORS) - 1
    adaptive = rgb.quantize(colors=free).getpalette()[: 3 * free]
    palette = Image.new("P", (1, 1))
    palette.putpalette(adaptive + [c for color in COLORS for c in color] + [255, 255, 255])
    rgb.quantize(palette=palette, dither=Image.Dither.NONE).save(path, optimize=True)


# --------------------------------------------------------------------------- writing


def _image_path(out: Path, cid: str) -> Path:
    return out / "Image" / f"{cid}_0000.nii.gz"


def _mask_path(out: Path, cid: str) -> Path:
    return out / "Mask" / f"{cid}.nii.gz"


def _write_case(job) -> str:
    """Generate and write one case (module level so worker processes can run it); atomic writes."""
    out, seed, index, layout, size, num_slices = job
    cid = case_id(seed, index)
    phantom = make_phantom(seed, index, size=size, num_slices=num_slices)
    save_volume(phantom.hu, phantom.affine, _image_path(out, cid), dtype=np.int16)
    save_volume(layout_labels(phantom, layout), phantom.affine, _mask_path(out, cid), dtype=np.uint8)
    return cid


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class _Blob:
    """A perturbed ellipsoid: inside where ``|local / radii| + bumps < 1``."""

    center: np.ndarray  # (3,) mm
    radii: np.ndarray  # (3,) mm along the local axes
    axes: np.ndarray  # (3, 3), columns: local axes in the world frame
    bump_amp: np.ndarray  # (K,)
    bump_freq: np.ndarray  # (K, 3) rad/mm
    bump_phase: np.ndarray  # (K, 3)

    def bounds(self, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned box around the region ``q < scale``."""
        reach = self.radii.max() * (scale + self.bump_amp.sum()) + 1.0
        return self.center - reach, self.center + reach


@dataclass(frozen=True)
class _Tube:
    """Balls along a centreline, with what fills each stretch (hollow organs)."""

    points: np.ndarray  # (N, 3) mm
    radii: np.ndarray  # (N,) mm
    fill_hu: np.ndarray | None = None  # (N,) lumen HU
    air_level: np.ndarray | None = None  # (N,) air above this height (-1 bottom .. 1 top of the lumen)
    stool: np.ndarray | None = None  # (N,) bool, mottled content


def _orthonormal(long_axis, hint) -> np.ndarray:
    """(3, 3) rotation whose columns are (hint orthogonalised, third, long_axis normalised)."""
    w = np.asarray(long_axis, float)
    w = w / np.linalg.norm(w)
    u = np.asarray(hint, float)
    u = u - u.dot(w) * w
    u = u / np.linalg.norm(u)
    return np.stack([u, np.cross(w, u), w], axis=1)


def _spline_path(control, step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample a cubic spline through ``control`` (M, 4: x, y, z, radius in mm) every ~step mm.

    Returns points (N, 3), radii (N,) and arc length (N,).
    """
    from scipy.interpolate import CubicSpline

    control = np.asarray(control, float)
    chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(control[:, :3], axis=0), axis=1))])
    samples = np.linspace(0.0, chord[-1], max(2, int(np.ceil(chord[-1] / step)) + 1))
    path = CubicSpline(chord, control, axis=0, bc_type="natural")(samples)
    return path[:, :3], np.maximum(path[:, 3], 1.0), samples


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# --------------------------------------------------------------------------- anatomy (no grid)


class _Sampler:
    """Draws the random parts of one case; reference coordinates -> millimetres.

    Reference frame: x toward the patient's right, y anterior (mm for a 340 x 250 mm abdomen,
    origin at the body centre), z as a fraction of the covered length (0 below the femur heads,
    1 at the lung bases). Scales ``kx, ky`` follow the abdominal cavity, not the fat.
    """

    def __init__(self, rng, kx, ky, length):
        self.rng, self.kx, self.ky, self.length = rng, kx, ky, length
        self.k = float(np.sqrt(kx * ky))
        self.spine = None  # (z mm, y mm) of the vertebral-body centre, once drawn

    def spine_y(self, z_fraction: float) -> float:
        """Reference y of the vertebral-body centre at a height given as a fraction of the length."""
        z, y = self.spine
        return float(np.interp(z_fraction * self.length, z, y)) / self.ky

    def mm(self, points) -> np.ndarray:
        """(M, 3+) reference [x, y, z-fraction, (radius)] -> mm."""
        p = np.array(points, float)
        scale = [self.kx, self.ky, self.length] + [self.k] * (p.shape[-1] - 3)
        return p * scale

    def jitter_path(self, control, xy=4.0, z=0.008, radius=0.08):
        """Reference control points (M, 4) with random displacement and width, in mm."""
        rng = self.rng
        c = np.array(control, float)
        c[:, :2] += rng.normal(0.0, xy, (len(c), 2))
        c[:, 2] += rng.normal(0.0, z, len(c))
        c[:, 3] *= rng.uniform(1 - radius, 1 + radius, len(c)) * rng.uniform(0.9, 1.1)
        return self.mm(c)

    def blob(self, center, radii, long_axis=(0, 0, 1), hint=(1, 0, 0), size=0.1, shift=6.0, tilt=0.08,
             bumps=3, bump=0.06) -> _Blob:
        """Reference centre (x, y, z-fraction), radii in mm of a 400 mm reference body."""
        rng = self.rng
        scale = np.array([self.kx, self.ky, self.length / REFERENCE_LENGTH_MM])
        center = self.mm([center])[0] + rng.normal(0.0, shift, 3) * scale
        radii = np.asarray(radii, float) * scale * rng.uniform(1 - size, 1 + size, 3)
        axes = _orthonormal(np.asarray(long_axis, float) + rng.normal(0, tilt, 3),
                            np.asarray(hint, float) + rng.normal(0, tilt, 3))
        amp = rng.uniform(0.3, 1.0, bumps) * bump
        freq = 2 * np.pi / (rng.uniform(1.0, 2.2, (bumps, 3)) * radii.mean())
        phase = rng.uniform(0, 2 * np.pi, (bumps, 3))
        return _Blob(center, radii, axes, amp, freq, phase)



def _child(parent: _Blob, offset, radii) -> _Blob:
    """A smooth blob in the parent's local frame (offset and radii in fractions of the parent's)."""
    center = parent.center + parent.axes @ (np.asarray(offset) * parent.radii)
    return _Blob(center, np.asarray(radii) * parent.radii, parent.axes, np.zeros(0), np.zeros((0, 3)), np.zeros((0, 3)))


def _sample_anatomy(rng: np.random.Generator) -> SimpleNamespace:
    """Every random choice of one case, in mm, independent of the voxel grid (fixed draw order)."""
    a = SimpleNamespace()
    s = _sample_body(rng, a)
    _sample_spine_and_thorax(rng, s, a)
    _sample_solid_organs(s, a)
    _sample_hollow_organs(rng, s, a)
    _sample_vessels_and_muscles(s, a)
    _sample_pelvic_bones(rng, s, a)
    return a


def _sample_body(rng, a) -> _Sampler:
    """Body outline, field of view, tissue HU, noise; returns the sampler scaled to this body."""
    u = rng.uniform
    a.A0 = u(140, 185)  # lateral half-width, mm
    a.B0 = a.A0 * u(0.66, 0.78)  # anterior-posterior half-depth
    a.fat0 = u(10, 38)
    a.length = u(350, 450)
    a.spacing_xy = float(np.clip(2 * a.A0 * 1.08 / u(0.8, 0.93) / 512, 0.6, 0.9))  # the hips fill 80-93 %
    a.slice_thickness = round(u(2.5, 5.0) * 4) / 4
    a.offset = np.array([u(-10, 10), u(-5, 12)])  # body centre in the field of view
    a.origin_z = -u(200, 700)
    a.p_ant, a.p_post = u(2.0, 2.4), u(2.6, 3.6)  # superellipse exponents: the back is flatter
    a.lobes = (u(0, 0.015, 4), np.arange(2, 6), u(0, 2 * np.pi, 4))
    a.waves = (u(0, 0.03, 2), u(0.8, 1.6, 2), u(0, 2 * np.pi, 2))  # slow width changes along z
    a.belly = u(0.0, 0.06)
    a.fat_ant, a.fat_lat = u(0.0, 0.5), u(0.0, 0.4)
    a.table_sag, a.table_press = u(0.0004, 0.001), u(0.93, 0.98)
    kx = (a.A0 - 2 - a.fat0 - 14) / 132
    ky = (a.B0 - 2 - 1.1 * a.fat0 - 11) / 93
    s = _Sampler(rng, float(np.clip(kx, 0.7, 1.3)), float(np.clip(ky, 0.7, 1.3)), a.length)
    a.kx, a.ky, a.k = s.kx, s.ky, s.k
    a.hu = SimpleNamespace(
        fat=-100 + u(-10, 10), muscle=50 + u(-8, 8), liver=55 + u(-10, 10), spleen=45 + u(-10, 10),
        pancreas=40 + u(-10, 10), kidney=35 + u(-10, 10), blood=40 + u(-5, 5), bone=800 + u(-100, 150),
        marrow=220 + u(-60, 80), urine=8 + u(-5, 5), bile=12 + u(-5, 5), lung=-860 + u(-30, 30),
    )
    a.noise_std = u(10, 18)
    a.blur_mm = u(0.45, 0.75)
    rotations = [_orthonormal(rng.normal(0, 1, 3), rng.normal(0, 1, 3)) for _ in range(2)]
    a.texture = (rng.standard_normal((48, 48, 48), dtype=np.float32), rotations)  # smooth random field
    L = a.length
    a.pelvic_cavity = (np.array([0.0, 0.12, 0.22, 0.32, 0.40]) * L,  # z; lateral, anterior, posterior reach
                       np.array([55, 62, 88, 125, 400.0]) * s.kx,
                       np.array([72, 80, 88, 95, 400.0]) * s.ky,
                       np.array([72, 80, 92, 110, 400.0]) * s.ky)
    return s


def _sample_spine_and_thorax(rng, s: _Sampler, a) -> None:
    """Spine curve and segments, ribs, diaphragm domes, heart."""
    u, L = rng.uniform, a.length
    a.spine_z = np.array([0.30, 0.36, 0.45, 0.55, 0.70, 0.85, 1.05]) * L  # vertebral-body centre y (lordosis)
    a.spine_y = (np.array([-52.0, -44, -33, -30, -33, -40, -46]) + rng.normal(0, 3, 7)) * s.ky
    s.spine = (a.spine_z, a.spine_y)
    a.z_s1 = u(0.32, 0.35) * L
    a.vertebra_period = 36.0 * L / REFERENCE_LENGTH_MM * u(0.93, 1.07)
    a.z_conus = u(0.58, 0.64) * L
    a.rib_phi = np.array([0.5, 0.8, 1.6, 2.2, 2.75])  # angle from the posterior midline
    a.rib_low = np.array([0.78, 0.66, 0.64, 0.74, 0.86]) * L + rng.normal(0, 0.01 * L, 5)  # lowest rib there
    a.rib_slope, a.rib_pitch, a.rib_phase = u(0.35, 0.5), 34 * L / REFERENCE_LENGTH_MM * u(0.9, 1.1), u(0, 1)
    a.dome_right = u(0.95, 0.98) * L
    a.dome_left = a.dome_right - u(0.01, 0.04) * L
    a.heart = s.blob((-20, 40, 1.08), (75, 55, 64), size=0.08, bumps=0)
    a.mediastinum_y = s.spine_y(0.95) + 40


def _sample_solid_organs(s: _Sampler, a) -> None:
    """Liver (three lobes and its veins), spleen, kidneys, bladder, pancreas, gallbladder, prostate."""
    u = s.rng.uniform
    a.liver = [
        s.blob((68, -5, 0.80), (72, 95, 90), long_axis=(-0.35, 0.1, 1), hint=(0.94, -0.34, 0.3), bump=0.08),
        s.blob((-20, 45, 0.88), (70, 38, 36), long_axis=(0.1, 0.3, 1), hint=(1, -0.15, 0)),
        s.blob((25, -10, 0.86), (30, 35, 35)),
    ]
    a.liver_vessels = [_Tube(*_spline_path(s.jitter_path(c), 2.0)[:2]) for c in (
        [(22, -10, 0.95, 7), (60, 5, 0.90, 5), (95, 20, 0.85, 3)],  # hepatic veins
        [(22, -10, 0.95, 7), (35, 35, 0.91, 5), (45, 60, 0.87, 3)],
        [(22, -10, 0.95, 6), (-10, 30, 0.92, 4), (-40, 45, 0.90, 3)],
        [(35, 0, 0.77, 7), (65, 5, 0.76, 5), (95, 10, 0.74, 3)],  # portal branches
        [(35, 0, 0.77, 6), (30, 25, 0.80, 4), (20, 45, 0.82, 3)],
    )]
    spleen = s.blob((-85, -40, 0.83), (24, 55, 44), long_axis=(0, 0.3, 1), hint=(-0.7, -0.7, 0))
    a.spleen = (spleen, _child(spleen, (-1.35, 0.15, 0.0), (0.75, 0.55, 0.7)))  # minus a concave hilum
    a.kidneys = []
    for side, zf in ((1, u(0.64, 0.67)), (-1, u(0.67, 0.70))):  # the left kidney sits higher
        kidney = s.blob((side * 72, -25, zf), (30, 22, 54), long_axis=(-side * 0.25, -0.2, 1),
                        hint=(side * 0.87, -0.5, 0), size=0.08, bump=0.04)  # hilum faces anteromedially
        sinus = _child(kidney, (-0.62, 0.1, 0), (0.55, 0.45, 0.5))
        renal_pelvis = _child(kidney, (-0.85, 0.15, -0.05), (0.35, 0.3, 0.2))
        a.kidneys.append((kidney, sinus, renal_pelvis))
    fill = u(0.75, 1.25)
    a.bladder = s.blob((0, 30, 0.15), (42 * fill, 33 * fill, 34 * fill), hint=(1, 0, 0), size=0.08, bump=0.05)
    a.prostate = s.blob((0, 28, 0.0), (20, 16, 16), size=0.1, bumps=0)
    a.gallbladder = s.blob((42, 38, 0.70), (14, 14, 30), long_axis=(0.2, 0.5, 1), size=0.2, bumps=1)
    pancreas = s.jitter_path([(32, 10, 0.60, 19), (30, 15, 0.64, 20), (8, 30, 0.67, 15), (-22, 28, 0.69, 14),
                              (-45, 18, 0.71, 13), (-66, 2, 0.73, 10)], xy=3.0)  # head in the duodenal C
    a.pancreas = _Tube(*_spline_path(pancreas, 2.0)[:2])


def _sample_hollow_organs(rng, s: _Sampler, a) -> None:
    """Stomach, duodenum, colon, rectum, then small-intestine loops in the space left."""
    u = rng.uniform
    a.stomach = _hollow(rng, s.jitter_path([(-45, -35, 0.93, 34), (-62, -10, 0.88, 40), (-60, 20, 0.81, 38),
                                            (-45, 45, 0.74, 32), (-15, 55, 0.69, 25), (15, 48, 0.67, 19),
                                            (33, 30, 0.69, 12)]),
                        fill=(15, 35), air=u(-0.1, 0.7), air_from=0.3, stool=True, step=5.0)
    a.duodenum = _hollow(rng, s.jitter_path([(36, 30, 0.69, 12), (52, 15, 0.665, 13), (58, -2, 0.61, 13),
                                             (45, -6, 0.565, 12), (15, 8, 0.55, 11), (-15, 10, 0.56, 11),
                                             (-35, 12, 0.60, 12)], xy=2.0),
                         fill=(5, 30), air=u(0.3, 1.2), step=3.0)
    colon = np.array([  # caecum, ascending, hepatic flexure, transverse, splenic flexure, descending, sigmoid
        (80, 22, 0.29, 27), (90, 8, 0.36, 24), (98, 0, 0.45, 22), (100, -2, 0.53, 21),
        (90, 8, 0.60, 21), (55, 50, 0.585, 20), (15, 60, 0.53, 19), (-25, 58, 0.56, 19),
        (-60, 40, 0.64, 19), (-88, 5, 0.73, 18), (-96, -2, 0.65, 17), (-100, -4, 0.55, 16),
        (-100, 0, 0.44, 16), (-92, 5, 0.34, 15), (-75, 30, 0.27, 15), (-40, 42, 0.29, 15),
        (-12, 25, 0.31, 15), (5, 0, 0.29, 15), (0, -36, 0.255, 16)])
    colon[5:9, 2] -= u(0.0, 0.06)  # the transverse colon sags by a varying amount
    levels = np.interp(np.arange(len(colon)), [0, 4, 7, 9, 13, 18], [0.3, 0.1, -0.4, 0.0, 0.5, 0.4])
    a.colon = _hollow(rng, s.jitter_path(colon), fill=(0, 40), air=levels + u(-0.3, 0.4), stool=True,
                      haustra=u(18, 26), step=4.5)
    a.rectum = _hollow(rng, s.jitter_path([(0, -36, 0.255, 17), (0, -55, 0.20, 20), (0, -62, 0.13, 21),
                                           (0, -52, 0.06, 16), (0, -38, 0.0, 11), (0, -32, -0.04, 9)], xy=3.0),
                       fill=(10, 40), air=u(0.2, 1.2), stool=True, step=3.5)
    obstacles = [(a.colon.points, a.colon.radii), (a.stomach.points, a.stomach.radii),
                 (a.duodenum.points, a.duodenum.radii), (a.rectum.points, a.rectum.radii),
                 (a.bladder.center[None], a.bladder.radii.max(keepdims=True)),
                 (np.array([k.center for k, _, _ in a.kidneys]), np.array([50.0, 50.0])),
                 (s.mm([(0, s.spine_y(f), f) for f in np.linspace(0.3, 0.7, 9)]), np.full(9, 30 * s.k))]
    a.small_intestine = _small_bowel_walk(rng, s, start=a.duodenum.points[-1], end=a.colon.points[0],
                                          obstacles=obstacles)


def _sample_vessels_and_muscles(s: _Sampler, a) -> None:
    """Aorta, IVC and their branches (unlabelled), psoas, back, pelvic and hip muscles."""
    yv = s.spine_y

    def along_spine(x, dy, fractions, radii):
        return [(x, yv(f) + dy, f, r) for f, r in zip(fractions, radii)]

    a.vessels = [_Tube(*_spline_path(s.jitter_path(c, xy=1.5, radius=0.05), 3.0)[:2]) for c in (
        along_spine(-10, 29, [1.03, 0.9, 0.8, 0.7, 0.6, 0.5, 0.455], [12, 12, 11.5, 11, 10.5, 10, 9.5]),  # aorta
        along_spine(22, 26, [1.03, 0.9, 0.8, 0.7, 0.6, 0.5, 0.44], [11, 12, 12, 12, 11, 10, 9]),  # IVC
        [(-8, yv(0.455) + 26, 0.455, 7), (-30, yv(0.38) + 20, 0.38, 6.5), (-62, 10, 0.22, 6), (-75, 30, 0.1, 5.5),
         (-78, 38, -0.03, 5)],  # left iliac artery
        [(-8, yv(0.455) + 26, 0.455, 7), (20, yv(0.38) + 22, 0.38, 6.5), (62, 10, 0.22, 6), (75, 30, 0.1, 5.5),
         (78, 38, -0.03, 5)],  # right iliac artery
        [(18, yv(0.44) + 18, 0.44, 8), (-25, yv(0.38) + 10, 0.38, 7.5), (-60, 2, 0.22, 7), (-70, 24, 0.1, 6),
         (-70, 32, -0.03, 6)],  # left iliac vein
        [(22, yv(0.44) + 18, 0.44, 8), (30, yv(0.38) + 12, 0.38, 7.5), (60, 2, 0.22, 7), (70, 24, 0.1, 6),
         (70, 32, -0.03, 6)],  # right iliac vein
        [(-8, yv(0.72) + 40, 0.72, 4.5), (-3, 14, 0.66, 4.5), (0, 18, 0.55, 4), (5, 30, 0.45, 3.5)],  # SMA
        [(10, 28, 0.45, 5), (8, 20, 0.6, 6.5), (6, 14, 0.68, 7.5), (20, 5, 0.74, 8), (35, 0, 0.77, 8)],  # SMV, portal
        [(6, 14, 0.68, 5.5), (-25, 14, 0.70, 5), (-50, 6, 0.715, 5), (-70, -12, 0.74, 4.5)],  # splenic vein
        [(-62, -18, 0.69, 5), (-30, -4, 0.68, 5), (-8, 9, 0.68, 4.5), (22, 2, 0.68, 5)],  # left renal vein
        [(60, -18, 0.655, 5), (25, -4, 0.665, 5)],  # right renal vein
    )]
    a.muscles = []
    for side in (1, -1):
        a.muscles += [_Tube(*_spline_path(s.jitter_path(c, xy=2.0, radius=0.06), 3.0)[:2]) for c in (
            [(side * 22, yv(0.78), 0.78, 5), (side * 30, yv(0.68) + 2, 0.68, 10), (side * 40, yv(0.55) + 4, 0.55, 16),
             (side * 48, yv(0.45) + 8, 0.45, 20), (side * 56, yv(0.36) + 14, 0.36, 22), (side * 68, 2, 0.25, 21),
             (side * 78, 24, 0.14, 18), (side * 80, 36, 0.05, 15), (side * 80, 42, -0.03, 14)],  # psoas
            [(side * 52, yv(0.80) - 25, 0.80, 5), (side * 58, yv(0.68) - 27, 0.68, 12),
             (side * 62, yv(0.55) - 26, 0.55, 13), (side * 68, yv(0.45) - 22, 0.45, 8)],  # quadratus lumborum
            [(side * 60, -5, 0.02, 11), (side * 62, -12, 0.12, 12), (side * 58, -22, 0.2, 8)],  # obturator internus
            [(side * 112, -30, 0.30, 18), (side * 118, -18, 0.18, 22), (side * 122, -8, 0.07, 16),
             (side * 128, -6, 0.02, 10)],  # gluteus medius and minimus
            [(side * 115, 25, 0.30, 7), (side * 105, 50, 0.12, 9), (side * 95, 58, -0.03, 10)],  # sartorius
            [(side * 125, 22, 0.25, 8), (side * 130, 20, 0.08, 12), (side * 132, 18, -0.03, 12)],  # tensor fasciae
            [(side * 104, 38, 0.12, 8), (side * 100, 44, -0.03, 13)],  # rectus femoris
            [(side * 40, 45, 0.05, 12), (side * 50, 35, -0.03, 18)],  # pectineus, adductors
            [(side * 65, -30, 0.03, 10), (side * 92, -32, -0.01, 11)],  # quadratus femoris
        )]


def _sample_pelvic_bones(rng, s: _Sampler, a) -> None:
    """Femurs, pubis and ischium (as rods), ilium and sacrum profiles along z."""
    u, L, k = rng.uniform, a.length, s.k
    a.femurs = []
    for side in (1, -1):
        head = s.mm([(side * 88, 5, 0.09)])[0] + rng.normal(0, 2.5, 3)
        radius = 24 * k * u(0.92, 1.08)
        neck = s.mm([(side * 118, -2, 0.035)])[0] + rng.normal(0, 2.5, 3)
        a.femurs.append(SimpleNamespace(side=side, head=head, radius=radius, neck=neck, neck_radius=0.62 * radius))
    a.bone_rods = []
    for side, femur in zip((1, -1), a.femurs):
        trochanter = femur.neck + [side * 10 * k, -10 * k, 0.0]
        shaft = [femur.neck + [side * 8 * k, -4 * k, -0.02 * L], femur.neck + [side * 14 * k, -2 * k, -0.3 * L]]
        a.bone_rods += [
            _Tube(np.array([trochanter]), np.array([19.0 * k])),
            _Tube(*_spline_path(np.c_[np.array(shaft), [16 * k, 15 * k]], 3.0)[:2]),
            _Tube(*_spline_path(s.mm([(side * 72, 22, 0.10, 8), (side * 40, 45, 0.085, 6.5),
                                      (side * 8, 58, 0.07, 7)]), 2.5)[:2]),  # superior pubic ramus
            _Tube(*_spline_path(s.mm([(side * 6, 60, 0.08, 8), (side * 6, 58, 0.02, 8)]), 2.5)[:2]),  # pubic body
            _Tube(*_spline_path(s.mm([(side * 8, 55, 0.03, 7), (side * 30, 35, -0.01, 6.5),
                                      (side * 52, 10, -0.04, 7)]), 2.5)[:2]),  # inferior ramus
            _Tube(*_spline_path(s.mm([(side * 72, -18, 0.10, 11), (side * 64, -36, 0.02, 11),
                                      (side * 56, -42, -0.04, 10)]), 2.5)[:2]),  # ischium
        ]
    # Ilium per height (x mirrored to the right side): a circular arc from its posterior end
    # (sacroiliac joint, sciatic notch) to its anterior end (iliac spines), bulging posterolaterally.
    a.ilium_z = np.array([0.13, 0.20, 0.27, 0.34, 0.40, 0.455]) * L
    flare = u(0.94, 1.06)
    a.ilium = {
        "x0": np.array([62, 58, 52, 48, 52, 62.0]) * s.kx, "y0": np.array([-30, -50, -66, -72, -70, -62.0]) * s.ky,
        "x1": np.array([88, 100, 112, 120, 124, 116.0]) * s.kx * flare, "y1": np.array([5, 10, 12, 12, 8, -8.0]) * s.ky,
        "bulge": np.array([5, 7, 9, 11, 11, 9.0]) * k, "thick": np.array([22, 13, 8, 6, 5.5, 6.0]) * k,
    }
    # Sacrum per height: anterior surface y, half thickness, half width.
    a.sacrum_z = np.array([0.06, 0.10, 0.15, 0.22, 0.28, a.z_s1 / L + 0.01]) * L
    a.sacrum = {"front": (np.array([-68, -76, -84, -80, -66, -44.0]) + rng.normal(0, 3, 6)) * s.ky,
                "thick": np.array([5, 7, 10, 14, 17, 16.0]) * s.ky,
                "width": np.array([8, 14, 25, 45, 58, 52.0]) * s.kx}


def _hollow(rng, control, fill, air, air_from=0.0, stool=False, haustra=None, step=4.0) -> _Tube:
    """A hollow organ along ``control`` (mm): random fluid HU, air above ``air`` (scalar or per control point)."""
    points, radii, arc = _spline_path(control, step)
    n = len(points)
    position = np.linspace(0, 1, n)
    if haustra is not None:
        radii = radii * (1 + 0.1 * np.cos(2 * np.pi * arc / haustra))
    air = np.interp(position, np.linspace(0, 1, len(control)), np.broadcast_to(air, len(control)))
    air = np.where(position >= air_from, air, 2.0)
    fill_hu = np.interp(position, np.linspace(0, 1, 6), rng.uniform(*fill, 6))
    return _Tube(points, radii, fill_hu.astype(np.float32), air, np.full(n, stool))


def _small_bowel_walk(rng, s: _Sampler, start, end, obstacles) -> _Tube:
    """Loops of small intestine: a self-avoiding random walk in the mid and lower abdomen.

    Each step picks, among a few random turns, the one heading into the least crowded space,
    staying in an ellipsoidal region and heading for the ileocaecal valve in its last part.
    """
    center = s.mm([(0, 18, 0.41)])[0]
    half = s.mm([(92, 68, 0.19)])[0]
    mean_radius = 12.0 * s.k
    volume = 4 / 3 * np.pi * np.prod(half)
    length = 0.9 * volume / (np.pi * mean_radius**2) * rng.uniform(0.85, 1.15)
    step = 4.0
    steps = int(length / step)
    cell = 14.0
    origin = center - half - 40
    dims = np.ceil((2 * half + 80) / cell).astype(int)
    crowd = np.zeros(dims, np.float32)

    def cells(p):
        return tuple(np.clip(((p - origin) / cell).astype(int), 0, dims - 1).T)

    for points, radii in obstacles:  # mark other organs as crowded
        for p, r in zip(points, radii):
            offsets = np.stack(np.meshgrid(*[np.arange(-r, r + cell, cell)] * 3, indexing="ij"), -1).reshape(-1, 3)
            offsets = offsets[np.linalg.norm(offsets, axis=1) <= r]
            crowd[cells(p + offsets)] += 2.0
    p = np.asarray(start, float)
    d = np.array([-0.3, 0.0, -1.0])
    d /= np.linalg.norm(d)
    path = [p.copy()]
    for i in range(steps):
        trials = d + 0.35 * rng.normal(0, 1, (8, 3))
        trials /= np.linalg.norm(trials, axis=1, keepdims=True)
        ahead = p + 3 * step * trials
        outside = np.linalg.norm((ahead - center) / half, axis=1)
        score = crowd[cells(ahead)] + 60.0 * np.maximum(outside - 0.85, 0)
        homing = max(0.0, (i / steps - 0.8) / 0.2)
        score += homing * 0.08 * np.linalg.norm(ahead - end, axis=1)
        d = trials[int(np.argmin(score))]
        p = p + step * d
        path.append(p.copy())
        crowd[cells(p[None])] += 1.0
    path.append(np.asarray(end, float))
    points = np.array(path)
    n = len(points)
    segments = (n + 14) // 15  # content changes every ~60 mm
    kind = rng.choice(3, segments, p=[0.55, 0.25, 0.2])  # fluid, collapsed, air-fluid
    radius = np.where(kind == 1, 0.6, 1.0) * rng.uniform(0.8, 1.15, segments) * mean_radius
    fill = np.where(kind == 1, 35.0, rng.uniform(0, 30, segments))
    air = np.where(kind == 2, rng.uniform(0.2, 0.6, segments), 2.0)
    seg = np.minimum(np.arange(n) // 15, segments - 1)
    radii = np.convolve(np.pad(radius[seg], 4, mode="edge"), np.ones(9) / 9, mode="valid")
    return _Tube(points, radii, fill[seg].astype(np.float32), air[seg], np.zeros(n, bool))


# --------------------------------------------------------------------------- rendering


class _Canvas:
    """The volume being drawn: HU (float32), labels, tissue zones, and voxel centres in mm.

    Arrays are (X, Y, Z) in Fortran order, so an axial slice ``[:, :, k]`` is contiguous.
    Coordinates are relative to the body centre: x toward the patient's right, y anterior,
    z from the bottom of the covered anatomy.
    """

    def __init__(self, a, size: int, num_slices: int | None):
        sx = a.spacing_xy * 512 / size
        nz = num_slices if num_slices is not None else int(round(a.length / a.slice_thickness)) + 1
        sz = a.length / (nz - 1)
        self.shape = (size, size, nz)
        self.spacing = (float(sx), float(sx), float(sz))
        centered = (np.arange(size) - (size - 1) / 2) * sx
        self.x = (centered - a.offset[0]).astype(np.float32)
        self.y = (centered - a.offset[1]).astype(np.float32)
        self.z = (np.arange(nz) * sz).astype(np.float32)
        self.affine = np.diag([sx, sx, sz, 1.0])
        self.affine[:3, 3] = [centered[0], centered[0], a.origin_z]
        self.hu = np.full(self.shape, _AIR_HU, np.float32, order="F")
        self.labels = np.zeros(self.shape, np.uint8, order="F")
        self.zone = np.zeros(self.shape, np.uint8, order="F")

    def box(self, lo, hi):
        """Index slices of the voxels with centres in [lo, hi] (mm) and their coordinates, or None."""
        bounds = []
        for axis, low, high in zip((self.x, self.y, self.z), lo, hi):
            i0, i1 = int(np.searchsorted(axis, low)), int(np.searchsorted(axis, high, side="right"))
            if i1 <= i0:
                return None
            bounds.append((i0, i1))
        sl = tuple(slice(i0, i1) for i0, i1 in bounds)
        return sl, self.x[sl[0]], self.y[sl[1]], self.z[sl[2]]


def _f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _blob_field(blob: _Blob, x, y, z) -> np.ndarray:
    """Implicit value of ``blob`` on the grid x (nx,), y (ny,), z (nz,): (nx, ny, nz) float32, < 1 inside."""
    d = (x - np.float32(blob.center[0]), y - np.float32(blob.center[1]), z - np.float32(blob.center[2]))
    q = None
    for a in range(3):
        w = blob.axes[:, a] / blob.radii[a]
        local = _f32(w[0] * d[0])[:, None, None] + _f32(w[1] * d[1])[None, :, None]
        local = local + _f32(w[2] * d[2])[None, None, :]  # (nx, ny, nz) coordinate along local axis a
        np.square(local, out=local)
        q = local if q is None else np.add(q, local, out=q)
    np.sqrt(q, out=q)
    for amp, freq, phase in zip(blob.bump_amp, blob.bump_freq, blob.bump_phase):
        plane = _f32(amp * np.sin(freq[0] * d[0] + phase[0]))[:, None, None] * _f32(np.sin(freq[1] * d[1] + phase[1]))[None, :, None]
        q += plane * _f32(np.sin(freq[2] * d[2] + phase[2]))[None, None, :]
    return q


def _blobs_field(canvas: _Canvas, blobs) -> tuple | None:
    """Union (minimum) of several blobs over their joint bounding box: (slices, x, y, z, q)."""
    lo = np.min([b.bounds()[0] for b in blobs], axis=0)
    hi = np.max([b.bounds()[1] for b in blobs], axis=0)
    box = canvas.box(lo, hi)
    if box is None:
        return None
    sl, x, y, z = box
    q = np.full((len(x), len(y), len(z)), np.inf, np.float32)
    for blob in blobs:
        inner = canvas.box(*blob.bounds())
        if inner is None:
            continue
        sub = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(inner[0], sl))
        np.minimum(q[sub], _blob_field(blob, *inner[1:]), out=q[sub])
    return sl, x, y, z, q


def _tube_field(canvas: _Canvas, points, radii) -> tuple | None:
    """Balls along a centreline: (slices, x, y, z, dist, nearest), dist = min |p - c_n| / r_n (< 1 inside)."""
    lo = (points - radii[:, None]).min(axis=0)
    hi = (points + radii[:, None]).max(axis=0)
    box = canvas.box(lo, hi)
    if box is None:
        return None
    sl, x, y, z = box
    dist = np.full((len(x), len(y), len(z)), np.inf, np.float32)
    nearest = np.zeros(dist.shape, np.int32)
    for n, (c, r) in enumerate(zip(points, radii)):
        ranges = []
        for axis, center in zip((x, y, z), c):
            ranges.append((int(np.searchsorted(axis, center - r)), int(np.searchsorted(axis, center + r, side="right"))))
        if any(i1 <= i0 for i0, i1 in ranges):
            continue
        (i0, i1), (j0, j1), (k0, k1) = ranges
        inv = 1.0 / r
        dd = (_f32(((x[i0:i1] - c[0]) * inv) ** 2)[:, None, None] + _f32(((y[j0:j1] - c[1]) * inv) ** 2)[None, :, None])
        dd = dd + _f32(((z[k0:k1] - c[2]) * inv) ** 2)[None, None, :]
        current = dist[i0:i1, j0:j1, k0:k1]
        better = dd < current
        current[better] = dd[better]
        nearest[i0:i1, j0:j1, k0:k1][better] = n
    np.sqrt(dist, out=dist)
    return sl, x, y, z, dist, nearest


def _texture(a, x, y, z) -> np.ndarray:
    """Smooth random field at points x, y, z (each (n,) mm): (n,) float32, mean 0, std ~1, blobs of 3-8 mm.

    Two octaves of value noise on rotated lattices with unrelated cell sizes, so that no grid shows.
    """
    lattice, rotations = a.texture
    out = np.zeros(len(x), np.float32)
    for rotation, cell, offset in zip(rotations, (3.1, 4.9), (0.0, 17.3)):
        r = rotation.T.astype(np.float32) / np.float32(cell)
        u = [r[i, 0] * x + r[i, 1] * y + r[i, 2] * z + np.float32(offset) for i in range(3)]
        out += _value_noise(lattice, *u)
    return out * np.float32(1.6 / np.sqrt(2))  # interpolation shrinks the lattice's unit std


def _value_noise(lattice, u, v, w) -> np.ndarray:
    """Smoothly interpolated lattice values at lattice coordinates u, v, w (each (n,)), periodic."""
    size = lattice.shape[0]
    corners, weights = [], []
    for c in (u, v, w):
        i = np.floor(c)
        t = c - i
        t = t * t * (3 - 2 * t)  # smooth weights hide the lattice cells
        corners.append(i.astype(np.int64) % size)
        weights.append((1 - t, t))
    out = np.zeros(len(u), np.float32)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = weights[0][dx] * weights[1][dy] * weights[2][dz]
                out += w * lattice[(corners[0] + dx) % size, (corners[1] + dy) % size, (corners[2] + dz) % size]
    return out


def _bone_hu(a, edge, radius) -> np.ndarray:
    """Cortex (~2.5 mm) at the surface, marrow inside; ``edge`` is 0 at the centre, 1 at the surface."""
    return np.where((1 - edge) * radius < 2.5, a.hu.bone, a.hu.marrow).astype(np.float32)


# ----- 1. body wall, slice by slice


def _body_profile(a, theta, z: float):
    """Body wall of the slice at height z (mm), per angle ``theta`` (NB,), all in mm.

    Returns the skin radius, the subcutaneous fat and muscle wall thicknesses, and the deep fat
    (intermuscular, ischioanal) that fills the low pelvis between the wall and the pelvic ring.
    """
    zf = z / a.length
    amp, period, phase = a.waves
    A = a.A0 * (1 + 0.07 * _smoothstep((0.32 - zf) / 0.17) + 0.03 * _smoothstep((zf - 0.6) / 0.25)
                + amp[0] * np.cos(2 * np.pi * zf / period[0] + phase[0]))
    B = a.B0 * (1 + a.belly * np.exp(-(((zf - 0.42) / 0.15) ** 2)) + amp[1] * np.cos(2 * np.pi * zf / period[1] + phase[1]))
    c, s = np.cos(theta), np.sin(theta)
    p = np.where(s > 0, a.p_ant, a.p_post)
    radius = (np.abs(c / A) ** p + np.abs(s / B) ** p) ** (-1 / p)
    lobe_amp, lobe_m, lobe_phase = a.lobes
    radius = radius * (1 + (lobe_amp[:, None] * np.cos(lobe_m[:, None] * theta + lobe_phase[:, None])).sum(0))
    fat = a.fat0 * (1 + a.fat_ant * np.clip(s, 0, None) + a.fat_lat * c**2 - 0.3 * np.clip(-s, 0, None))
    fat = fat * (1 + 0.25 * _smoothstep((0.3 - zf) / 0.2) - 0.3 * _smoothstep((zf - 0.6) / 0.3))
    muscle = 11 + 5 * c**2 + 7 * _smoothstep((zf - 0.62) / 0.12)  # thicker over the ribs
    pelvis = _smoothstep((0.34 - zf) / 0.14)
    muscle = muscle + pelvis * (38 * np.clip(-s, 0, None) ** 1.5 + 10 * c**2)  # gluteus maximus, abductors
    cz, ca, cb_ant, cb_post = a.pelvic_cavity  # pelvic ring: the cavity is no wider than this
    cav_a, cav_ant, cav_post = (float(np.interp(z, cz, v)) for v in (ca, cb_ant, cb_post))
    cav_b = np.where(s > 0, cav_ant, cav_post)
    cavity = (np.abs(c / cav_a) ** 2.2 + np.abs(s / cav_b) ** 2.2) ** (-1 / 2.2)
    deep = np.maximum(radius - 2 - fat - muscle - cavity, 0.0)
    return radius, fat, muscle, deep


def _draw_body(canvas: _Canvas, a) -> None:
    """Skin, fat, muscle wall, ribs, cavity, lung bases, diaphragm, heart and the CT table, per slice."""
    extent = a.A0 * 1.25
    i0, i1 = np.searchsorted(canvas.x, -extent), np.searchsorted(canvas.x, extent, side="right")
    j0, j1 = np.searchsorted(canvas.y, -a.B0 * 1.25 - 25), np.searchsorted(canvas.y, a.B0 * 1.25, side="right")
    maps = _slice_maps(canvas.x[i0:i1, None], canvas.y[None, j0:j1], canvas.spacing, a)
    for k, z in enumerate(canvas.z):
        hu, zone, depth, fat_inner, wall_inner = _wall_slice(a, maps, float(z))
        _add_ribs(a, maps, float(z), hu, zone, depth, fat_inner, wall_inner)
        if z > maps.diaphragm.min() - 10:
            _add_thorax(a, maps, float(z), hu, zone)
        canvas.hu[i0:i1, j0:j1, k] = hu
        canvas.zone[i0:i1, j0:j1, k] = zone


def _slice_maps(xx, yy, spacing, a) -> SimpleNamespace:
    """What every slice shares, on the in-plane crop xx (nx, 1), yy (1, ny) in mm: polar angle bins,
    table, rib angles, diaphragm height and the mediastinum."""
    m = SimpleNamespace(xx=xx, yy=yy, r=np.hypot(xx, yy), nb=720)
    theta = np.arctan2(yy, xx)
    m.bins = ((theta + np.pi) / (2 * np.pi) * m.nb).astype(np.int32) % m.nb
    m.theta_bins = (np.arange(m.nb) + 0.5) / m.nb * 2 * np.pi - np.pi
    m.lateral = np.abs(np.cos(theta)) > 0.75
    m.linea_alba = (np.abs(xx) < 2.0) & (yy > 0)
    table_top = -a.B0 * 1.02 * a.table_press + a.table_sag * xx**2  # the back is flattened on it
    m.above_table = yy > table_top
    below = table_top - yy
    table = np.where((below > 1) & (below < 4), 250.0, _AIR_HU)  # carbon shells around a foam core
    table = np.where((below >= 4) & (below < 14), -950.0, table)
    table = np.where((below >= 14) & (below < 17), 250.0, table)
    m.table = np.where(np.abs(xx) < a.A0 * 1.2, table, _AIR_HU).astype(np.float32)
    m.phi = np.abs(np.arctan2(xx, -yy))  # angle from the posterior midline
    m.arc = m.phi * 0.8 * (a.A0 + a.B0) / 2
    m.rib_low = np.interp(m.phi, a.rib_phi, a.rib_low)
    xr, yr = xx / a.kx, yy / a.ky
    dome = np.maximum(a.dome_right - ((xr - 55) ** 2 + (yr + 5) ** 2) / 260,
                      a.dome_left - ((xr + 55) ** 2 + (yr + 10) ** 2) / 260)
    rho = np.sqrt((xr / 132) ** 2 + (yr / 93) ** 2)
    m.diaphragm = dome - 35 * np.clip((rho - 0.75) / 0.25, 0, 1) ** 2 - 0.3 * np.clip(-yr - 30, 0, None)  # recesses
    gx, gy = np.gradient(m.diaphragm, spacing[0], axis=0), np.gradient(m.diaphragm, spacing[1], axis=1)
    m.diaphragm_band = 5.0 * np.sqrt(1 + gx**2 + gy**2)  # 5 mm muscle, measured across the sloping sheet
    m.mediastinum = ((xx / (28 * a.kx)) ** 2 + ((yy - a.mediastinum_y * a.ky) / (28 * a.ky)) ** 2) < 1
    return m


def _wall_slice(a, m, z: float):
    """HU (nx, ny) and zone of one slice from skin to cavity; also the depth below the skin and
    the depths where the subcutaneous fat and the muscle wall end (mm, each (nx, ny))."""
    h = a.hu
    radius, fat, muscle, deep = _body_profile(a, m.theta_bins, z)
    depth = radius[m.bins] - m.r
    depth[~m.above_table] = -1.0
    fat_inner = (2 + fat)[m.bins]
    wall_inner = fat_inner + muscle[m.bins]
    zone = (depth > 0).astype(np.uint8) + (depth > fat_inner) + (depth > wall_inner + deep[m.bins])
    spine_y = np.interp(z, a.spine_z, a.spine_y)
    zone[(zone == _CAVITY) & (np.abs(m.xx) < 55 * a.k) & (m.yy < spine_y - 10 * a.k)] = _WALL  # the back, behind the spine
    hu = np.array([_AIR_HU, h.fat, h.muscle, h.fat + 8], np.float32)[zone]
    hu[(depth > 0) & (depth < 2)] = h.muscle - 10  # skin
    hu[(zone == _WALL) & (depth > wall_inner)] = h.fat + 5  # deep fat of the low pelvis
    hu[(zone == _WALL) & m.linea_alba] = h.fat + 60
    if 0.3 * a.length < z < 0.74 * a.length:  # fat planes between the three lateral wall muscles
        layer = (depth - fat_inner) / (wall_inner - fat_inner)
        hu[m.lateral & ((np.abs(layer - 0.36) < 0.045) | (np.abs(layer - 0.68) < 0.045))] = h.fat + 20
    hu = np.where(zone == _OUTSIDE, m.table, hu)
    return hu, zone, depth, fat_inner, wall_inner


def _add_ribs(a, m, z: float, hu, zone, depth, fat_inner, wall_inner) -> None:
    """Oval rib sections in the muscle wall: oblique bands descending from back to front."""
    ribbed = (zone == _WALL) & (z > m.rib_low) & (m.phi > 0.5)
    if not ribbed.any():
        return
    idx = np.nonzero(ribbed)
    middle = (fat_inner + 0.5 * np.minimum(wall_inner - fat_inner, 20.0))[idx]
    phase = ((z + a.rib_slope * m.arc[idx]) / a.rib_pitch + a.rib_phase) % 1.0
    e = ((depth[idx] - middle) / 5.0) ** 2 + ((phase - 0.5) / (6.0 / a.rib_pitch)) ** 2
    rib = e < 1
    bone = np.where(m.phi[idx] > 2.3, 130.0, np.where(e > 0.5, a.hu.bone, a.hu.marrow))  # costal cartilage in front
    hu[idx[0][rib], idx[1][rib]] = bone[rib]


def _add_thorax(a, m, z: float, hu, zone) -> None:
    """Above the diaphragm: lung, mediastinal fat and heart; the diaphragm itself is muscle."""
    h = a.hu
    cavity = zone == _CAVITY
    above = cavity & (z > m.diaphragm)
    sheet = cavity & ~above & (z > m.diaphragm - m.diaphragm_band)
    zone[sheet], hu[sheet] = _WALL, h.muscle
    zone[above], hu[above] = _LUNG, h.lung
    middle = above & m.mediastinum
    heart_e = 1 - ((z - a.heart.center[2]) / a.heart.radii[2]) ** 2
    heart = np.zeros_like(above)
    if heart_e > 0:
        heart = (((m.xx - a.heart.center[0]) / a.heart.radii[0]) ** 2
                 + ((m.yy - a.heart.center[1]) / a.heart.radii[1]) ** 2 < heart_e) & above
    zone[middle | heart] = _MEDIASTINUM
    hu[middle] = h.fat + 10
    hu[heart] = h.blood


# ----- 2. organs


def _paint_blob_organ(canvas, field, label, hu):
    """Paint ``q < 1`` of a blob field inside the cavity; returns that mask."""
    sl, x, y, z, q = field
    inside = (q < 1) & (canvas.zone[sl] == _CAVITY)
    canvas.hu[sl][inside] = hu
    canvas.labels[sl][inside] = label
    return inside


def _paint_hollow(canvas, a, tube: _Tube, label: int, wall_mm: float) -> None:
    """A hollow organ: wall, fluid or mottled content, and air in the non-dependent (anterior) part."""
    field = _tube_field(canvas, tube.points, tube.radii)
    if field is None:
        return
    sl, x, y, z, dist, nearest = field
    ii, jj, kk = np.nonzero((dist < 1) & (canvas.zone[sl] == _CAVITY))
    n = nearest[ii, jj, kk]
    radius = tube.radii[n]
    lumen = dist[ii, jj, kk] < 1 - wall_mm / radius
    hu = tube.fill_hu[n]
    stool = np.flatnonzero(tube.stool[n])
    if stool.size:
        pattern = _texture(a, x[ii[stool]], y[jj[stool]], z[kk[stool]])
        hu[stool] += 25 * pattern
        hu[stool] = np.where(pattern > 1.5, -650.0 + 100 * pattern, hu[stool])  # gas bubbles in stool
    height = (y[jj] - tube.points[n, 1]) / radius
    hu = np.where(lumen & (height > tube.air_level[n]), _AIR_HU, hu)
    hu = np.where(lumen, hu, a.hu.muscle - 8)
    canvas.hu[sl][ii, jj, kk] = hu
    canvas.labels[sl][ii, jj, kk] = label


def _draw_organs(canvas: _Canvas, a) -> None:
    h = a.hu
    _paint_hollow(canvas, a, a.small_intestine, ORGAN_IDS["small_intestine"], 2.5)
    _paint_hollow(canvas, a, a.duodenum, ORGAN_IDS["small_intestine"], 2.5)
    _paint_hollow(canvas, a, a.colon, ORGAN_IDS["colon"], 2.5)
    _paint_hollow(canvas, a, a.rectum, ORGAN_IDS["rectum"], 3.0)
    field = _blobs_field(canvas, [a.bladder])
    if field is not None:
        inside = _paint_blob_organ(canvas, field, ORGAN_IDS["bladder"], h.urine)
        wall = inside & (field[4] > 1 - 3.0 / a.bladder.radii.mean())
        canvas.hu[field[0]][wall] = h.muscle - 10
    _paint_hollow(canvas, a, a.stomach, ORGAN_IDS["stomach"], 4.0)
    field = _tube_field(canvas, a.pancreas.points, a.pancreas.radii)
    if field is not None:
        sl, x, y, z, dist, _ = field
        ii, jj, kk = np.nonzero((dist < 1) & (canvas.zone[sl] == _CAVITY))
        lobules = _texture(a, x[ii], y[jj], z[kk])
        canvas.hu[sl][ii, jj, kk] = np.where(lobules > 1.2, 0.8 * h.pancreas + 0.2 * h.fat, h.pancreas)
        canvas.labels[sl][ii, jj, kk] = ORGAN_IDS["pancreas"]
    spleen, hollow = a.spleen
    field = _blobs_field(canvas, [spleen])
    if field is not None:
        sl, x, y, z, q = field
        q[_blob_field(hollow, x, y, z) < 1] = np.inf  # concave hilum
        _paint_blob_organ(canvas, (sl, x, y, z, q), ORGAN_IDS["spleen"], h.spleen)
    field = _blobs_field(canvas, a.liver)
    if field is not None:
        _paint_blob_organ(canvas, field, ORGAN_IDS["liver"], h.liver)
        for vessel in a.liver_vessels:  # hepatic and portal veins: slightly darker, still liver
            vf = _tube_field(canvas, vessel.points, vessel.radii)
            if vf is not None:
                inside = (vf[4] < 1) & (canvas.labels[vf[0]] == ORGAN_IDS["liver"])
                canvas.hu[vf[0]][inside] = h.liver - 12
    for kidney, sinus, pelvis in a.kidneys:
        box = canvas.box(*kidney.bounds(1.35))
        if box is None:
            continue
        sl, x, y, z = box
        q = _blob_field(kidney, x, y, z)
        perirenal = (q < 1.35) & (canvas.zone[sl] == _CAVITY)  # fat inside Gerota's fascia
        canvas.hu[sl][perirenal] = h.fat + 5
        canvas.labels[sl][perirenal] = 0
        inside = _paint_blob_organ(canvas, (sl, x, y, z, q), ORGAN_IDS["kidney"], h.kidney)
        hilum = inside & (_blob_field(sinus, x, y, z) < 1)
        canvas.hu[sl][hilum] = h.fat + 15
        canvas.labels[sl][hilum] = 0
        renal_pelvis = (_blob_field(pelvis, x, y, z) < 1) & (canvas.zone[sl] == _CAVITY)
        canvas.hu[sl][renal_pelvis] = h.urine
        canvas.labels[sl][renal_pelvis] = 0
    for blob, value in ((a.gallbladder, h.bile), (a.prostate, h.muscle - 12)):
        field = _blobs_field(canvas, [blob])
        if field is not None:
            _paint_blob_organ(canvas, field, 0, value)


# ----- 3. vessels, muscles, bones


def _paint_tube(canvas, tube, hu, min_zone, label=0):
    """Paint a tube where the zone is at least ``min_zone``; ``hu`` is a value or f(dist, radius)."""
    field = _tube_field(canvas, tube.points, tube.radii)
    if field is None:
        return None
    sl, x, y, z, dist, nearest = field
    inside = (dist < 1) & (canvas.zone[sl] >= min_zone)
    canvas.hu[sl][inside] = hu if np.isscalar(hu) else hu(dist[inside], tube.radii[nearest[inside]])
    canvas.labels[sl][inside] = label
    return field


def _draw_vessels_muscles_bones(canvas: _Canvas, a) -> None:
    h = a.hu
    for muscle in a.muscles:
        _paint_tube(canvas, muscle, h.muscle, _WALL)
    _draw_pelvis(canvas, a)
    for vessel in a.vessels:
        _paint_tube(canvas, vessel, h.blood, _SUBCUTIS)
    for rod in a.bone_rods:
        _paint_tube(canvas, rod, lambda dist, radius: _bone_hu(a, dist, radius), _SUBCUTIS)
    for femur in a.femurs:
        _draw_femur_head(canvas, a, femur)
    _draw_spine(canvas, a)


def _draw_femur_head(canvas, a, femur) -> None:
    """Acetabular cup (bone, label 0), then the femur head and neck (label femur head)."""
    r = femur.radius
    box = canvas.box(femur.head - r - 14, femur.head + r + 14)
    if box is None:
        return
    sl, x, y, z = box
    dx, dy, dz = (x - femur.head[0])[:, None, None], (y - femur.head[1])[None, :, None], (z - femur.head[2])[None, None, :]
    dist = np.sqrt(dx**2 + dy**2 + dz**2)
    cup_axis = np.array([-femur.side * 0.8, 0.0, 0.6])  # the acetabulum covers the head medially and above
    facing = (dx * cup_axis[0] + dz * cup_axis[2]) / np.maximum(dist, 1e-3)
    cup = (dist > r + 2) & (dist < r + 10) & (facing > 0.0) & (canvas.zone[sl] != _OUTSIDE)
    canvas.hu[sl][cup] = np.where(np.abs(dist - r - 6) > 2.5, a.hu.bone, a.hu.marrow)[cup]
    canvas.labels[sl][cup] = 0
    label = ORGAN_IDS["femur_head"]
    neck = _Tube(*_spline_path(np.c_[np.stack([femur.head, femur.neck]), [femur.neck_radius] * 2], 2.0)[:2])
    _paint_tube(canvas, neck, lambda d, radius: _bone_hu(a, d, radius), _SUBCUTIS, label=label)
    head = (dist < r) & (canvas.zone[sl] != _OUTSIDE)
    canvas.hu[sl][head] = _bone_hu(a, dist / r, r)[head]
    canvas.labels[sl][head] = label


def _draw_pelvis(canvas, a) -> None:
    """Iliac wings (with iliacus inside and gluteal muscle outside), then the sacrum."""
    for side in (1, -1):
        _draw_ilium(canvas, a, side)
    _draw_sacrum(canvas, a)


def _draw_ilium(canvas, a, side: int) -> None:
    """One iliac wing: per slice, a plate along a circular arc whose ends and bulge follow ``a.ilium``."""
    il = a.ilium
    reach = il["thick"].max() / 2 + 35  # plate, iliacus and gluteal muscle around the arc
    lateral = (min(il["x0"].min(), il["x1"].min()) - reach, il["x1"].max() + il["bulge"].max() + reach)
    xs = lateral if side > 0 else (-lateral[1], -lateral[0])
    ys = (min(il["y0"].min(), il["y1"].min()) - reach, max(il["y0"].max(), il["y1"].max()) + reach)
    box = canvas.box([xs[0], ys[0], a.ilium_z[0]], [xs[1], ys[1], a.ilium_z[-1]])
    if box is None:
        return
    sl, x, y, z = box
    p = {key: np.interp(z, a.ilium_z, v) for key, v in il.items()}  # each (nz,)
    tx, ty = p["x1"] - p["x0"], p["y1"] - p["y0"]
    chord = np.hypot(tx, ty)
    nx, ny = ty / chord, -tx / chord  # outward normal (posterolateral)
    radius = (chord**2 / 4 + p["bulge"] ** 2) / (2 * p["bulge"])
    cx = (p["x0"] + p["x1"]) / 2 - nx * (radius - p["bulge"])
    cy = (p["y0"] + p["y1"]) / 2 - ny * (radius - p["bulge"])
    cos_span = np.sqrt(1 - (chord / (2 * radius)) ** 2)
    ZX = lambda v: _f32(v)[None, None, :]  # noqa: E731  per-slice values broadcast over (x, y)
    X, Y, Z = side * x[:, None, None], y[None, :, None], z[None, None, :]  # X mirrored: + is lateral
    dx, dy = X - ZX(cx), Y - ZX(cy)
    rho = np.sqrt(dx**2 + dy**2)
    along = ((X - ZX(p["x0"])) * ZX(tx) + (Y - ZX(p["y0"])) * ZX(ty)) / ZX(chord**2)  # 0 back .. 1 front
    crest = a.ilium_z[-1] - 30 * a.k * (2 * along - 1) ** 2  # the iliac crest arches, highest mid-wing
    sector = (dx * ZX(nx) + dy * ZX(ny) > ZX(cos_span) * rho) & (Z < crest)
    offset = rho - ZX(radius)  # mm from the plate's mid-surface, + outward
    half = ZX(p["thick"]) / 2
    zone = canvas.zone[sl]
    iliacus = sector & (offset < 0) & (offset > -half - 16) & (Z > a.ilium_z[1]) & (zone >= _WALL)
    gluteal = sector & (offset > 0) & (offset < half + 30) & (zone >= _WALL)
    muscle = iliacus | gluteal
    canvas.hu[sl][muscle] = a.hu.muscle
    canvas.labels[sl][muscle] = 0
    plate = sector & (np.abs(offset) < half) & (zone != _OUTSIDE)
    canvas.hu[sl][plate] = np.where(np.abs(offset) > half - 2, a.hu.bone, a.hu.marrow)[plate]
    canvas.labels[sl][plate] = 0


def _draw_sacrum(canvas, a) -> None:
    """Sacrum and coccyx: per slice a wide, thin-winged bar with the sacral canal."""
    sc = a.sacrum
    box = canvas.box([-80 * a.kx, -150, a.sacrum_z[0]], [80 * a.kx, 0, a.sacrum_z[-1]])
    if box is None:
        return
    sl, x, y, z = box
    front, thick, width = (_f32(np.interp(z, a.sacrum_z, sc[key]))[None, None, :] for key in ("front", "thick", "width"))
    across = (x[:, None, None] / width) ** 2  # (nx, 1, nz): 0 at the midline, 1 at the edge of the alae
    half = thick * (1 - 0.5 * across)  # the alae are thinner than the sacral body
    center = front - thick - 0.3 * thick * across
    v = np.abs(y[None, :, None] - center) / half
    inner = np.sqrt(np.clip(1 - across**2, 0, None))
    bone = (v < inner) & (across < 1) & (canvas.zone[sl] != _OUTSIDE)
    cortex = (v > inner - 2.5 / half) | (across > 0.9)
    canal_r = _f32(np.clip(thick / 16.0, 0.3, 1.0)) * a.k
    canal = (((x[:, None, None] / (10 * canal_r)) ** 2 + ((y[None, :, None] - (front - 1.45 * thick)) / (6 * canal_r)) ** 2 < 1)
             & (z[None, None, :] > 0.15 * a.length))
    canvas.hu[sl][bone] = np.where(cortex, a.hu.bone, a.hu.marrow)[bone]
    canvas.hu[sl][bone & canal] = 10.0
    canvas.labels[sl][bone] = 0


def _draw_spine(canvas, a) -> None:
    """Vertebrae above the sacrum (bodies, discs, arches, processes), canal, spinal cord."""
    k = a.k
    yv_all = a.spine_y
    box = canvas.box([-60 * k, yv_all.min() - 90 * k, 0], [60 * k, yv_all.max() + 25 * k, canvas.z[-1] + 1])
    if box is None:
        return
    sl, x, y, z = box
    zf = z / a.length
    yv = _f32(np.interp(z, a.spine_z, a.spine_y))
    thoracic = _smoothstep((zf - 0.78) / 0.1)
    rx = _f32((23 - 5 * thoracic) * k)
    ry = _f32((16 - 2 * thoracic) * k)
    phase = ((z - a.z_s1) / a.vertebra_period) % 1.0
    lumbar_up = z > a.z_s1
    disc = lumbar_up & (phase < 0.22)
    canal_y = yv - ry - 10 * k
    crx, cry = _f32((11 - 3 * thoracic) * k), _f32((9 - 1 * thoracic) * k)
    X, Y = x[:, None, None], y[None, :, None]
    ZX = lambda v: v[None, None, :]  # noqa: E731  per-slice values broadcast over (x, y)
    zone = canvas.zone[sl]
    inside_body = zone != _OUTSIDE
    hu, labels = canvas.hu[sl], canvas.labels[sl]

    def put(mask, value):
        mask = mask & inside_body
        hu[mask] = value if np.isscalar(value) else np.broadcast_to(value, mask.shape)[mask]
        labels[mask] = 0

    size = _f32(k * (0.35 + 0.65 * _smoothstep((zf - 0.2) / 0.15)))  # paraspinal muscles thin over the sacrum
    paraspinal = (np.abs((np.abs(X) - 30 * ZX(size)) / (26 * ZX(size))) ** 2.5
                  + np.abs((Y - ZX(canal_y) + 22 * ZX(size)) / (21 * ZX(size))) ** 2.5) < 1
    put(paraspinal & (zone >= _WALL), a.hu.muscle)
    body_e = (X / ZX(rx)) ** 2 + ((Y - ZX(yv)) / ZX(ry)) ** 2
    arch_e = (X / ZX(crx + 6 * k)) ** 2 + ((Y - ZX(canal_y)) / ZX(cry + 6 * k)) ** 2
    canal_e = (X / ZX(crx)) ** 2 + ((Y - ZX(canal_y)) / ZX(cry)) ** 2
    bony = ZX(lumbar_up & ~disc)
    put((body_e < 1) & bony, np.where(body_e > 0.8, a.hu.bone, a.hu.marrow))
    put((body_e < 1.08) & ZX(disc), 85.0)
    arch = ZX(lumbar_up)
    put((arch_e < 1) & arch, np.where(arch_e > 0.55, a.hu.bone, a.hu.marrow))
    spinous_top = ZX(canal_y - cry - 4 * k)
    spinous = (np.abs(X) < 3.5 * k) & (Y < spinous_top) & (Y > spinous_top - 24 * k) & ZX(lumbar_up & (phase > 0.3) & (phase < 0.85))
    put(spinous, a.hu.bone)
    tp_len = _f32((38 - 16 * thoracic) * k)
    transverse = ((np.abs(X) > ZX(crx)) & (np.abs(X) < ZX(tp_len)) & (np.abs(Y - ZX(canal_y) - 4 * k) < 3.5 * k)
                  & ZX(lumbar_up & (phase > 0.45) & (phase < 0.65)))
    put(transverse, a.hu.bone)
    put((canal_e < 1) & ZX(lumbar_up), 10.0)
    taper = _f32(np.clip((z - a.z_conus) / 20.0, 0, 1))
    cord_e = (X / ZX(5.5 * k * taper + 1e-3)) ** 2 + ((Y - ZX(canal_y + 1)) / ZX(4.5 * k * taper + 1e-3)) ** 2
    cord = (cord_e < 1) & ZX(z > a.z_conus) & inside_body
    hu[cord] = 35.0
    labels[cord] = ORGAN_IDS["spinal_cord"]


# ----- 4. image formation


def _finish_image(canvas: _Canvas, a, rng) -> np.ndarray:
    """Blur in-plane (reconstruction kernel) with correlated Gaussian noise; returns int16 HU, F order."""
    from scipy.ndimage import gaussian_filter1d

    sigma = a.blur_mm / canvas.spacing[0]
    radius = max(1, int(np.ceil(3 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    noise_gain = float((kernel**2).sum())  # std of white noise after the separable blur
    scale = np.float32(a.noise_std / noise_gain)
    out = np.empty(canvas.shape, np.int16, order="F")
    chunk = 8
    for k0 in range(0, canvas.shape[2], chunk):
        slab = canvas.hu[:, :, k0:k0 + chunk]
        slab = slab + scale * rng.standard_normal(slab.shape, dtype=np.float32)
        slab = gaussian_filter1d(slab, sigma, axis=0, truncate=3.0, mode="nearest")
        slab = gaussian_filter1d(slab, sigma, axis=1, truncate=3.0, mode="nearest")
        np.clip(np.rint(slab), -1024, 3071, out=slab)
        out[:, :, k0:k0 + chunk] = slab
    return out
