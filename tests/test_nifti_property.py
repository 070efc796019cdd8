"""Property test of the NIfTI reader: random headers and small bodies load consistently or are refused.

Each example writes one NIfTI-1 file byte by byte (so nibabel's writer cannot tidy the header)
with random dimensions, datatype, pixdim, units, scaling, qform/sform codes and affines, and a
body that is exact, truncated or too long. ``load_ct`` and ``load_mask`` must then either load
(shape as the header says, finite affine, positive spacing) or raise ``NiftiError``: never another
exception, and never allocate more than a few tens of MB for a file of a few kB.
"""

import collections
import gzip
import math
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils.volume_io import NiftiError, load_ct, load_mask

MAX_PEAK_BYTES = 64 * 1024**2  # the files are at most a few kB
MAX_BODY_BYTES = 6000
DATATYPES = [2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280,  # integers and floats nibabel reads
             32, 128, 1792, 2304, 1536,                   # complex64, RGB24, complex128, RGBA32, float128
             1, 0, 999]                                   # binary, unknown, not a NIfTI code
ODD_FLOATS = st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e-9, 1e30, 3.4e38, 1e300, -1024.0])
DIM_SIZES = st.one_of(st.integers(2, 7), st.sampled_from([0, 1, 300, 32767, -1]))


def plain_spec(ndim: int, sizes: list[int], datatype: int) -> dict:
    """A valid header: sform and qform codes 1, 2 x 1.5 x 3 mm, unscaled, body exactly as implied."""
    return {"dims": [ndim, *sizes, *[1] * (7 - ndim)], "datatype": datatype,
            "pixdim": [1.0, 2.0, 1.5, 3.0, 1.0, 1.0, 1.0, 1.0], "xyzt_units": 2,
            "scl_slope": math.nan, "scl_inter": math.nan, "qform_code": 1, "sform_code": 1,
            "quatern": [0.0, 0.0, 0.0], "qoffset": [-10.0, 3.0, 7.0],
            "srow": [[2.0, 0, 0, -10.0], [0, 1.5, 0, 3.0], [0, 0, 3.0, 7.0]],
            "vox_offset": 352.0, "body": "exact", "body_delta": 1, "seed": 0, "compressed": False,
            "check_intensity": False}


# What a field becomes when an example perturbs it.
ODD_FIELDS = {
    "dims": st.builds(lambda ndim, sizes: [ndim] + [size if i < ndim else 1 for i, size in enumerate(sizes)],
                      st.sampled_from([0, 2, 3, 4, 5, 8, -1]), st.lists(DIM_SIZES, min_size=7, max_size=7)),
    "datatype": st.sampled_from(DATATYPES),
    "pixdim": st.lists(st.one_of(st.sampled_from([1.0, 0.5]), ODD_FLOATS), min_size=8, max_size=8),
    "xyzt_units": st.sampled_from([0, 1, 3, 10, 5, 7, 255]),
    "scl_slope": st.one_of(st.sampled_from([0.5, 1.0, 2.0, 1e20]), ODD_FLOATS),
    "scl_inter": st.one_of(st.sampled_from([0.0, -1024.0, 1e20]), ODD_FLOATS),
    "qform_code": st.sampled_from([0, 2, 7, -1]),
    "sform_code": st.sampled_from([0, 4, 9, -3]),
    "quatern": st.lists(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), ODD_FLOATS), min_size=3, max_size=3),
    "qoffset": st.lists(ODD_FLOATS, min_size=3, max_size=3),
    "srow": st.lists(st.lists(st.one_of(st.sampled_from([0.0, 1.0, -2.0]), ODD_FLOATS), min_size=4,
                              max_size=4), min_size=3, max_size=3),
    "vox_offset": st.sampled_from([0.0, 348.0, 353.0, 368.0, 1e9, -16.0, math.nan]),
    "body": st.sampled_from(["short", "long", "empty"]),
}


@st.composite
def nifti_specs(draw) -> dict:
    """One file's header fields and body (a dict for :func:`write_nifti`): a valid header with
    0 to 3 fields made odd, a random body, compressed or not."""
    ndim = draw(st.sampled_from([3, 3, 4]))
    sizes = [draw(st.integers(2, 7)) for _ in range(3)] + [1] * (ndim - 3)
    spec = plain_spec(ndim, sizes, draw(st.sampled_from([2, 4, 16, 512, 64, 256, 8, 1280])))
    for field in draw(st.sets(st.sampled_from(sorted(ODD_FIELDS)), max_size=3)):
        spec[field] = draw(ODD_FIELDS[field])
    spec.update(body_delta=draw(st.integers(1, 300)), seed=draw(st.integers(0, 2**16)),
                compressed=draw(st.booleans()), check_intensity=draw(st.booleans()))
    return spec


def _fill_header(block: np.ndarray, spec: dict) -> None:
    """Copy the fields of ``spec`` into a NIfTI-1 header's struct array, as given (no checks)."""
    block["dim"] = spec["dims"]
    block["datatype"] = spec["datatype"]
    block["bitpix"] = 8 * {2: 1, 256: 1, 4: 2, 512: 2, 8: 4, 16: 4, 768: 4, 32: 8, 64: 8, 1024: 8, 1280: 8,
                           128: 3, 2304: 4, 1792: 16, 1536: 16}.get(spec["datatype"], 1)
    block["pixdim"] = spec["pixdim"]
    block["xyzt_units"] = spec["xyzt_units"]
    block["scl_slope"], block["scl_inter"] = spec["scl_slope"], spec["scl_inter"]
    block["qform_code"], block["sform_code"] = spec["qform_code"], spec["sform_code"]
    block["quatern_b"], block["quatern_c"], block["quatern_d"] = spec["quatern"]
    block["qoffset_x"], block["qoffset_y"], block["qoffset_z"] = spec["qoffset"]
    block["srow_x"], block["srow_y"], block["srow_z"] = spec["srow"]
    block["vox_offset"] = spec["vox_offset"]


def write_nifti(spec: dict, folder: Path) -> Path:
    """Write ``spec`` as a raw NIfTI-1 file (header, 4 extension bytes, body); returns its path."""
    header = nib.Nifti1Header()
    block = header.structarr
    with np.errstate(over="ignore"):  # 1e300 stored in a float32 field becomes inf, on purpose
        _fill_header(block, spec)
    implied = max(0, math.prod(spec["dims"][1:spec["dims"][0] + 1])) * int(block["bitpix"]) // 8
    exact = min(implied, MAX_BODY_BYTES)
    length = {"exact": exact, "short": max(0, exact - spec["body_delta"]),
              "long": exact + spec["body_delta"], "empty": 0}[spec["body"]]
    body = np.random.default_rng(spec["seed"]).integers(0, 256, length, dtype=np.uint8).tobytes()
    content = header.binaryblock + b"\0\0\0\0" + body
    if spec["compressed"]:
        path = folder / "volume.nii.gz"
        path.write_bytes(gzip.compress(content))
    else:
        path = folder / "volume.nii"
        path.write_bytes(content)
    return path


def load_both(path: Path, check_intensity: bool) -> str:
    """Load `path` as CT, then as its own mask; check what loaded; returns the outcome."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # oblique / no-orientation warnings are allowed
        try:
            volume = load_ct(path, check_intensity=check_intensity)
        except NiftiError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            return "refused"
        dims = nib.load(path).header["dim"]
        assert volume.original_shape == tuple(int(d) for d in dims[1:4])
        assert sorted(volume.data.shape) == sorted(volume.original_shape)
        assert volume.data.dtype in (np.int16, np.float32)
        assert np.isfinite(volume.affine).all() and np.isfinite(volume.original_affine).all()
        assert all(math.isfinite(s) and s > 0 for s in volume.spacing)
        if volume.data.dtype == np.float32:
            assert np.isfinite(volume.data).all()
        try:
            labels = load_mask(path, volume)
        except NiftiError as err:
            assert str(path) in str(err)
            return "loaded"
        assert labels.shape == volume.data.shape and labels.dtype in (np.uint8, np.int32)
        return "loaded"


def test_random_headers_load_consistently_or_are_refused():
    outcomes = collections.Counter()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              database=None)
    @given(spec=nifti_specs())
    def check(spec):
        with tempfile.TemporaryDirectory() as folder:
            path = write_nifti(spec, Path(folder))
            tracemalloc.start()
            try:
                outcomes[load_both(path, spec["check_intensity"])] += 1
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < MAX_PEAK_BYTES, f"{peak / 1e6:.0f} MB for a {path.stat().st_size}-byte file"

    check()
    # both sides of the property were exercised, not only refusals
    assert outcomes["loaded"] >= 5 and outcomes["refused"] >= 20, outcomes


@pytest.mark.parametrize("compressed", [False, True])
def test_header_claiming_gigabytes_is_refused_before_reading(tmp_path, compressed):
    """A 1.5 kB file whose header claims 1.5 GB: refused with the sizes, nothing allocated."""
    spec = {**plain_spec(3, [1024, 1024, 768], datatype=4), "compressed": compressed}
    path = write_nifti(spec, tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(NiftiError, match="header implies 1.5 GB of voxel data") as err:
            load_ct(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024**2 and str(path) in str(err.value)
