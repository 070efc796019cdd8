"""Patient-level splitting: scans of one patient stay on one side of the train/validation split,
and identical images (the same preprocessed array under two case ids) are flagged.

A patient key is either a regular expression over case ids with exactly one group (the patient,
e.g. ``r"^(PAT\\d+)_"`` for ``PAT007_scan2``) or a CSV file with columns ``case,patient``. Cases the
key does not match are their own patient. Pure functions, plus a CSV reader at the edge.
"""

from __future__ import annotations

import csv
import hashlib
import re
import warnings
from pathlib import Path

import numpy as np

from utils.errors import UserError


class PatientKeyError(UserError):
    """A patient key (regex or CSV) that cannot be used; the message names it."""


def is_csv_key(key: str) -> bool:
    """True when the patient key names a CSV file (ends with ``.csv``), else it is a regex."""
    return key.lower().endswith(".csv")


def compile_patient_regex(pattern: str) -> re.Pattern:
    """The regex of a patient key; raises PatientKeyError unless it compiles with exactly one group."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise PatientKeyError(f"patient key {pattern!r}: not a regular expression ({err})") from None
    if compiled.groups != 1:
        raise PatientKeyError(f"patient key {pattern!r}: needs exactly one group (the patient), "
                              f"has {compiled.groups}")
    return compiled


def read_patient_csv(path) -> dict[str, str]:
    """``{case id: patient}`` from a CSV with a header ``case,patient``.

    Raises:
        PatientKeyError: a missing file, other columns, an empty cell, or a case listed twice
            with different patients.
    """
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
            fields = rows[0].keys() if rows else []
    except OSError as err:
        raise PatientKeyError(f"{path}: cannot read the patient CSV ({err.strerror})") from None
    if not rows or not {"case", "patient"} <= set(fields):
        raise PatientKeyError(f"{path}: the patient CSV needs a header 'case,patient' and at least one row")
    patients: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        case, patient = (row.get("case") or "").strip(), (row.get("patient") or "").strip()
        if not case or not patient:
            raise PatientKeyError(f"{path}: line {line}: empty case or patient")
        if patients.get(case, patient) != patient:
            raise PatientKeyError(f"{path}: case {case} is listed with patients {patients[case]} and {patient}")
        patients[case] = patient
    return patients


def patients_of(case_ids, key: str) -> dict[str, str]:
    """``{case id: patient}`` under a patient key; an empty key or an unmatched case id makes the
    case its own patient."""
    case_ids = list(case_ids)
    if not key:
        return {case: case for case in case_ids}
    if is_csv_key(key):
        listed = read_patient_csv(key)
        return {case: listed.get(case, case) for case in case_ids}
    pattern = compile_patient_regex(key)
    result = {}
    for case in case_ids:
        match = pattern.search(case)
        result[case] = match.group(1) if match and match.group(1) else case
    return result


def array_hash(array: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and bytes (C order): equal arrays, equal hashes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.shape}{array.dtype.str}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def identical_images(hashes: dict[str, str]) -> list[list[str]]:
    """Groups (sorted, two or more case ids) whose image hashes are equal, from ``{case id: hash}``."""
    groups: dict[str, list[str]] = {}
    for case, digest in hashes.items():
        groups.setdefault(digest, []).append(case)
    return sorted(sorted(cases) for cases in groups.values() if len(cases) > 1)


def warn_identical_images(hashes: dict[str, str]) -> list[list[str]]:
    """:func:`identical_images`, with a UserWarning naming them (one image under two case ids
    leaks between training and validation unless a patient key joins them)."""
    groups = identical_images(hashes)
    if groups:
        shown = "; ".join(" = ".join(group) for group in groups[:5])
        warnings.warn(f"{len(groups)} group(s) of cases have identical preprocessed images: {shown}"
                      f"{' ...' if len(groups) > 5 else ''}; the same scan twice? a patient key "
                      "(--set patient_key=...) keeps them on one side", UserWarning, stacklevel=2)
    return groups
