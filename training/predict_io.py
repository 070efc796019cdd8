"""What ``predict`` reads and writes besides the label NIfTI: its cases and its extra outputs.

Cases are NIfTI files or DICOM CT series folders; extra outputs are the per-organ statistics
JSON, the DICOM SEG and the RT Structure Set (the DICOM ones for DICOM input only).

    input_cases(inputs)                 a file, a folder of NIfTI files, a series folder, a folder of them
    check_formats(formats, cases)       refuses DICOM outputs for NIfTI input
    output_place(out, cases)            (output folder, label-file stem for a .nii.gz output, or None)
    read_case(path)                     (Volume, DICOM headers or None)
    write_extra_outputs(...)            <stem>_statistics.json, <stem>_seg.dcm, <stem>_rtstruct.dcm
    claim_case_files(stem, names, out)  checks and records one case's files before they are written
    write_label_descriptions(out_dir)   labels.txt (ITK-SNAP) and abdoseg_labels.ctbl (3D Slicer)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from utils.case_files import case_id_from_path, is_nifti, nifti_files
from utils.dicom_io import dicom_files, load_dicom_series
from utils.errors import UserError, one_line_reason
from utils.files import write_json, write_text
from utils.labels import COLORS, DISPLAY_NAMES, NUM_CLASSES, ORGANS
from utils.organ_statistics import organ_statistics
from utils.output_folder import OutputFolder
from utils.volume_io import Volume, load_ct, save_labels, save_volume, to_original

ITKSNAP_FILE = "labels.txt"
SLICER_FILE = "abdoseg_labels.ctbl"
FORMATS = ("nifti", "dicom-seg", "rtstruct")  # --format choices; the DICOM ones need DICOM input
SUFFIXES = {"dicom-seg": "_seg.dcm", "rtstruct": "_rtstruct.dcm"}


def input_cases(inputs, error: type[UserError] = UserError) -> list[Path]:
    """NIfTI files, or DICOM series folders, to predict (a folder's NIfTI files win)."""
    inputs = Path(inputs)
    if inputs.is_file():
        return [inputs]
    if not inputs.is_dir():
        raise error(f"{inputs}: no such file or folder")
    if any(is_nifti(p) for p in inputs.iterdir() if p.is_file()):
        return nifti_files(inputs, "CT images", error)
    if dicom_files(inputs):
        return [inputs]
    series = sorted(p for p in inputs.iterdir() if p.is_dir() and not p.name.startswith(".") and dicom_files(p))
    if not series:
        raise error(f"{inputs}: holds no .nii or .nii.gz files, no DICOM series and no folders of them")
    return series


def case_name(path: Path) -> str:
    """The case id: a series folder's name, or the NIfTI file's case id."""
    return path.name if path.is_dir() else case_id_from_path(path)


def check_formats(formats, cases: list[Path], error: type[UserError] = UserError) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(formats))  # unique, in order
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise error(f"--format {' '.join(unknown) or '(none)'}: choose from {', '.join(FORMATS)}")
    dicom_only = [f for f in formats if f != "nifti"]
    nifti_inputs = [f for f in cases if not f.is_dir()]
    if dicom_only and nifti_inputs:
        raise error(f"--format {' '.join(dicom_only)} needs DICOM input; {nifti_inputs[0]} is a NIfTI file")
    return formats


def output_place(out: Path, cases: list[Path], error: type[UserError] = UserError) -> tuple[Path, str | None]:
    """``(output folder, stem of the label file or None)``; refuses writing into an input.

    An ``out`` ending in ``.nii.gz`` names the label file of a single case; it may sit beside
    an input NIfTI file (not replace it), never inside a DICOM series folder.
    """
    single_stem = None
    if out.name.lower().endswith(".nii.gz"):
        if len(cases) != 1:
            raise error(f"{out}: a .nii.gz output names one file, but the input holds {len(cases)} cases")
        if out.resolve() == cases[0].resolve():
            raise error(f"{out}: the output file is the input; choose another name")
        out, single_stem = out.parent, out.name[:-len(".nii.gz")]
    resolved = out.resolve()
    for path in cases:
        folder = path.resolve() if path.is_dir() else path.parent.resolve()
        if single_stem is not None and not path.is_dir():
            continue  # a label file named explicitly may sit beside its input file
        if resolved == folder or (path.is_dir() and folder in resolved.parents):
            raise error(f"{out}: the output folder is (inside) the input folder {folder}; predictions "
                        "would overwrite or mix with the inputs, and abdoseg never writes into its inputs")
    return out, single_stem


def read_case(path: Path) -> tuple[Volume, list | None]:
    """``(volume, DICOM headers sorted like the slices, or None for a NIfTI file)``."""
    if path.is_dir():
        return load_dicom_series(path)
    return load_ct(path), None


def write_extra_outputs(labels: np.ndarray, volume: Volume, headers: list | None, stem: Path, formats,
                        statistics: bool) -> dict:
    """Write ``<stem>_statistics.json`` (if asked) and the DICOM formats asked for.

    Returns ``{"statistics"?: path, "seg"?: path, "rtstruct"?: path}``. An organ-free
    prediction gives no SEG or RTSTRUCT (both need one segment or ROI) and a warning.
    """
    from training.dicom_export import write_dicom_seg, write_rtstruct
    done = {}
    if statistics:
        values = {"case": stem.name, "input": volume.path, **organ_statistics(labels, volume.data, volume.spacing)}
        done["statistics"] = str(write_json(stem.with_name(stem.name + "_statistics.json"), values))
    for name, writer in (("dicom-seg", write_dicom_seg), ("rtstruct", write_rtstruct)):
        if name not in formats:
            continue
        written = writer(labels, volume, headers, stem.with_name(stem.name + SUFFIXES[name]))
        if written is None:
            warnings.warn(f"{volume.path}: no organ predicted, so no {name} written", UserWarning, stacklevel=2)
        else:
            done["seg" if name == "dicom-seg" else "rtstruct"] = str(written)
    return done


def claim_case_files(stem: Path, names: list[str], out: OutputFolder | None, overwrite: bool,
                     error: type[UserError] = UserError) -> None:
    """Check and record the files of one case before any is written (UserError if one may not be).

    In a claimed folder, :meth:`OutputFolder.prepare` decides; a file the user named
    (``--out x.nii.gz``) is replaced only with `overwrite`.
    """
    for name in names:
        if out is not None:
            out.prepare(name)
        elif (stem.parent / name).exists() and not overwrite:
            raise error(f"{stem.parent / name}: already exists; pass --overwrite to replace it")


def write_label_descriptions(out_dir) -> list[Path]:
    """Write the label names and colours for viewers into `out_dir` (a folder or an OutputFolder).

    ``labels.txt``: ITK-SNAP label description file (``IDX R G B A VIS MSH "LABEL"``), and
    ``abdoseg_labels.ctbl``: 3D Slicer colour table (``id name R G B A``). Both from
    ``utils.labels``. Returns the two paths.
    """
    itk_lines = ["# ITK-SNAP Label Description File (abdoseg)",
                 "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL"]
    slicer_lines = ["# 3D Slicer color table (abdoseg)", f"# {NUM_CLASSES} values"]
    for organ_id, (name, (red, green, blue)) in enumerate(zip(ORGANS, COLORS)):
        visible = alpha = 0 if organ_id == 0 else 1
        text = "Clear Label" if organ_id == 0 else DISPLAY_NAMES[organ_id]
        itk_lines.append(f"{organ_id:>5} {red:>5} {green:>4} {blue:>4} {alpha:>8} "
                         f"{visible:>2} {visible:>2}    \"{text}\"")
        slicer_lines.append(f"{organ_id} {name} {red} {green} {blue} {255 if organ_id else 0}")
    texts = {ITKSNAP_FILE: "\n".join(itk_lines) + "\n", SLICER_FILE: "\n".join(slicer_lines) + "\n"}
    if isinstance(out_dir, OutputFolder):  # the same every run: replaced by design
        return [out_dir.write_text(name, text, replace=True) for name, text in texts.items()]
    return [write_text(Path(out_dir) / name, text) for name, text in texts.items()]  # write_text makes the folder


def read_case_or_error(path: Path) -> tuple[tuple, str | None]:
    """``((volume, DICOM headers or None), None)``, or ``((None, None), one-line error)``."""
    try:
        return read_case(path), None  # a named caller, so load warnings point here, not into futures
    except Exception as err:  # noqa: BLE001 (the per-case guard): any error, MemoryError too
        return (None, None), (one_line_reason(err) if str(path) in str(err) else f"{path}: {one_line_reason(err)}")


def write_case(labels: np.ndarray, probabilities: np.ndarray | None, volume: Volume, stem: Path,
                headers=None, formats=("nifti",), statistics: bool = False, out: OutputFolder | None = None,
                overwrite: bool = False) -> dict:
    """Write one case's outputs; returns ``{"file"?, "probabilities"?, ...}`` or ``{"file", "error"}``."""
    label_path = stem.with_name(stem.name + ".nii.gz")
    suffixes = [".nii.gz"] * ("nifti" in formats) + ["_probabilities.nii.gz"] * (probabilities is not None) \
        + ["_statistics.json"] * statistics + [SUFFIXES[name] for name in formats if name in SUFFIXES]
    names = [stem.name + suffix for suffix in suffixes]
    try:
        claim_case_files(stem, names, out, overwrite, UserError)
        done = {"file": str(label_path)} if "nifti" in formats else {}
        if "nifti" in formats:
            save_labels(labels, volume, label_path)
        if probabilities is not None:
            probability_path = stem.with_name(stem.name + "_probabilities.nii.gz")
            # (12, X, Y, Z) -> (X, Y, Z, 12) -> the file's own axis order (I, J, K, 12)
            on_disk = to_original(np.moveaxis(probabilities, 0, -1), volume)
            save_volume(on_disk, volume.original_affine, probability_path, dtype=np.uint8)
            done["probabilities"] = str(probability_path)
        return {**done, **write_extra_outputs(labels, volume, headers, stem, formats, statistics)}
    except Exception as err:  # noqa: BLE001 (the per-case guard)
        return {"file": volume.path, "error": f"{stem}: could not write ({one_line_reason(err)})"}


def collect_written(future, summary: dict) -> None:
    """Add a finished :func:`write_case` (a future, or None) to predict's summary."""
    done = future.result() if future is not None else {}
    if "error" in done:
        summary["failed"].append(done)
    else:
        summary["written"].extend([done["file"]] if "file" in done else [])
        for key in ("probabilities", "seg", "rtstruct", "statistics"):
            summary[key].extend([done[key]] if key in done else [])
