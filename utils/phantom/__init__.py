"""Synthetic abdominal CT phantom: the built-in dataset, so the whole pipeline runs with no data.

:func:`make_phantom` draws one case from ``np.random.default_rng([seed, case_index])``: a
non-contrast CT volume in HU and the truth for our 11 organs, in RAS+ voxel axes (the x index
grows toward the patient's *right*, y toward anterior, z toward the head; this is what
``utils.volume_io`` hands out after canonical reorientation) with the affine ``diag(sx, sy, sz)``.

The anatomy is drawn in millimetres before any grid exists, so a case is the same body at any
``size`` or ``num_slices``; only the noise depends on the grid. Shapes are perturbed ellipsoids
("blobs") and tubes (balls along a spline), evaluated only inside their bounding boxes.

Drawing order, later overwriting earlier:
    1. body wall, slice by slice (``body_wall``): skin, subcutaneous fat, muscle wall and ribs,
       the abdominal cavity (visceral fat), lung bases, diaphragm and heart, CT table;
    2. organs, clipped to the cavity (``organs``), in this priority: small intestine, colon,
       rectum, bladder, stomach, pancreas, spleen, liver, kidney (then the unlabelled gallbladder
       and prostate);
    3. vessels, muscles and bones (``skeleton``, ``spine``), which set the label back to 0 except
       for the spinal cord and the femur heads;
    4. blur and noise (``intensity``).

Modules: ``anatomy`` and ``placement``/``bowel`` (every random choice, in mm), ``shapes``,
``canvas`` (the voxel grid), the drawing modules above, ``generate`` (:func:`make_phantom`),
``layouts`` (label conventions), ``writer`` (NIfTI folders), ``sets`` (written and preprocessed;
import ``utils.phantom.sets`` itself, it pulls in the preprocessing stack). Figures of a phantom
live in ``training.phantom_preview`` (``render_phantom_preview``).
"""

from utils.phantom.generate import Phantom, make_phantom
from utils.phantom.layouts import LAYOUTS, layout_labels
from utils.phantom.writer import PHANTOM_SEEDS, TEST_SEEDS, case_id, write_phantom_dataset

__all__ = ["LAYOUTS", "PHANTOM_SEEDS", "TEST_SEEDS", "Phantom", "case_id", "layout_labels", "make_phantom",
           "write_phantom_dataset"]
