"""Output folders abdoseg owns: it writes only where it may, and never over a file it did not write.

A command claims its output folder with :func:`claim_output_folder`. The folder is accepted only if
it is new, empty, or carries abdoseg's marker file (``.abdoseg-output.json``) written by the
*same* command; anything else (a user's folder, another command's output, a folder equal to,
inside or around one of the command's inputs) is refused with one line. The returned
:class:`OutputFolder` then does every write, and keeps a record of what abdoseg wrote there:

* a file that exists but is not in the record is never written over or deleted, not even with
  ``overwrite=True`` (the user's file with a case's name stays as it is);
* a recorded file is replaced only with ``overwrite=True``, with ``replace=True`` for a file the
  command updates by design (a log, a manifest, ``last.pt``), or when this same object wrote it;
* every write is atomic (``utils/files.py``): a crash leaves the old file or the new one.

**Several processes.** A file is recorded *before* it is written, by a small record file of its
own in ``.abdoseg-records/`` (written atomically, named by a hash of the path, holding the path). Worker processes
can therefore write cases into one folder at the same time without sharing the marker: each
worker only adds record files, and only the parent, in :meth:`OutputFolder.close` (or the next
claim, after a crash), merges them into the marker. The marker is always replaced whole and
atomically, so a crash at any point leaves a readable marker; a record whose file never got
written is harmless (it names a file that does not exist).

Marker format (``.abdoseg-output.json``)::

    {"abdoseg_output": 1, "command": "predict", "files": ["Case_00001.nii.gz", "Case_00002/", ...]}

Paths are relative, with ``/``; a folder abdoseg made (a parent of a file it wrote, or a folder
written whole by :meth:`OutputFolder.atomic_folder`) ends with ``/``, and the files in it are
listed too. abdoseg writes into no folder it did not make.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from utils.errors import UserError
from utils.files import (TEMPORARY_PREFIX, atomic_path, read_json, temporary_name, write_bytes, write_json,
                         write_text)

MARKER_NAME = ".abdoseg-output.json"
RECORDS_NAME = ".abdoseg-records"
MARKER_VERSION = 1


@dataclass
class OutputFolder:
    """A claimed output folder; every write goes through it (see the module docstring).

    Picklable: a worker process gets a copy and writes through it; the parent calls
    :meth:`close` when the workers are done.

    Attributes:
        path: the folder, resolved (symlinks followed).
        command: the abdoseg command that owns it (``"predict"``, ``"preprocess"`` ...).
        overwrite: replace files abdoseg recorded here earlier (``--overwrite``).
    """

    path: Path
    command: str
    overwrite: bool = False
    _recorded_at_claim: frozenset[str] = field(default=frozenset(), init=False, repr=False)
    _written_now: set[str] = field(default_factory=set, init=False, repr=False)

    # ------------------------------------------------------------------ writing

    def prepare(self, relative: str | Path, replace: bool = False) -> Path:
        """Check that ``relative`` may be written, record it, and return its absolute path.

        Use the returned path only to write that one file atomically (or use the ``write_*``
        methods, which call this). Parent folders are created (and recorded) as needed.

        Args:
            relative: a path inside the folder (``"Case_1.nii.gz"``, ``"checkpoints/last.pt"``).
            replace: the command updates this file by design; replace it if abdoseg wrote it.

        Raises:
            UserError: the file (or a folder on its way) exists and abdoseg did not write it, or
                abdoseg wrote it in an earlier run and neither ``overwrite`` nor ``replace`` is set.
        """
        name = _relative_name(relative)
        target = self.path / name
        self._check_parents(name)
        if os.path.lexists(target):
            self._check_replaceable(name, replace)
        self._record([name, *self._new_parents(name)])
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_bytes(self, relative: str | Path, data: bytes, replace: bool = False) -> Path:
        """Write ``data`` to ``relative`` atomically (see :meth:`prepare`); returns the path."""
        return write_bytes(self.prepare(relative, replace), data)

    def write_text(self, relative: str | Path, text: str, replace: bool = False) -> Path:
        """Write UTF-8 ``text`` to ``relative`` atomically (see :meth:`prepare`); returns the path."""
        return write_text(self.prepare(relative, replace), text)

    def write_json(self, relative: str | Path, value, replace: bool = False) -> Path:
        """Write strict JSON to ``relative`` atomically (see :meth:`prepare`); returns the path."""
        return write_json(self.prepare(relative, replace), value)

    @contextlib.contextmanager
    def atomic_path(self, relative: str | Path, replace: bool = False) -> Iterator[Path]:
        """``with out.atomic_path("x.nii.gz") as tmp:`` write ``tmp``; on success it becomes the file.

        For writers that need a path (nibabel, ``torch.save``, matplotlib). Same checks as
        :meth:`prepare`; on an exception nothing is left behind.
        """
        with atomic_path(self.prepare(relative, replace)) as temporary:
            yield temporary

    @contextlib.contextmanager
    def atomic_folder(self, relative: str | Path, replace: bool = False) -> Iterator[Path]:
        """``with out.atomic_folder("Case_1") as tmp:`` fill folder ``tmp``; on success it becomes the folder.

        The folder and every file in it are recorded. An existing folder of that name is
        replaced only if abdoseg wrote all of it (and ``overwrite``/``replace`` allows it);
        otherwise it is left as it is and :class:`UserError` names what is not abdoseg's.
        """
        name = _relative_name(relative)
        target = self.path / name
        self._check_parents(name)
        if os.path.lexists(target):
            self._check_replaceable(name + "/", replace)
            self._check_all_recorded(target, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary, previous = temporary_name(target), temporary_name(target)
        try:
            temporary.mkdir()
            yield temporary
            contents = [f"{name}/{path.relative_to(temporary).as_posix()}" + ("/" if path.is_dir() else "")
                        for path in sorted(temporary.rglob("*"))]
            self._record([name + "/", *contents, *self._new_parents(name)])
            if os.path.lexists(target):  # checked above: every entry in it is abdoseg's
                os.replace(target, previous)  # move the old one aside, so a crash never leaves half
            os.replace(temporary, target)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
            shutil.rmtree(previous, ignore_errors=True)

    def remove(self, relative: str | Path) -> None:
        """Delete a file or folder abdoseg recorded here (a folder only if all of it is recorded).

        Raises:
            UserError: ``relative`` (or something inside it) was not written by abdoseg.
        """
        name = _relative_name(relative)
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            if not self.is_recorded(name + "/"):
                raise UserError("abdoseg did not write this folder, so it does not delete it", target)
            self._check_all_recorded(target, name)
            shutil.rmtree(target)
        elif os.path.lexists(target):
            if not self.is_recorded(name):
                raise UserError("abdoseg did not write this file, so it does not delete it", target)
            target.unlink()

    # ------------------------------------------------------------------ the record

    def is_recorded(self, relative: str) -> bool:
        """Whether abdoseg recorded ``relative`` (a folder ends with ``/``) in this folder."""
        return (relative in self._written_now or relative in self._recorded_at_claim
                or self._record_file(relative).exists())

    def recorded(self) -> set[str]:
        """Every path recorded here: the marker's list and the records not yet merged into it."""
        return set(_read_marker(self.path)["files"]) | set(_read_records(self.path))

    def close(self) -> None:
        """Merge the record files into the marker (call once, in the parent, after the workers)."""
        records = _read_records(self.path)
        if not records:
            return
        marker = _read_marker(self.path)
        files = sorted(set(marker["files"]) | set(records))
        write_json(self.path / MARKER_NAME, {**marker, "files": files})
        for record_file in records.values():
            with contextlib.suppress(FileNotFoundError):
                record_file.unlink()
        with contextlib.suppress(OSError):
            (self.path / RECORDS_NAME).rmdir()  # only when empty

    # ------------------------------------------------------------------ internals

    def _record(self, names: list[str]) -> None:
        """Record ``names`` before they are written: one atomic record file per name (any process)."""
        for name in names:
            if not self.is_recorded(name):
                write_json(self._record_file(name), name, indent=None)
        self._written_now.update(names)

    def _record_file(self, name: str) -> Path:
        digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:24]
        return self.path / RECORDS_NAME / f"{digest}.json"

    def _check_replaceable(self, name: str, replace: bool) -> None:
        target = self.path / name.rstrip("/")
        if not self.is_recorded(name):
            what = "folder" if target.is_dir() else "file"
            raise UserError(f"a {what} abdoseg did not write is in the way; abdoseg never overwrites it "
                            "(move it away or choose another output folder)", target)
        if not (self.overwrite or replace or name in self._written_now):
            raise UserError(f"already written by an earlier '{self.command}' run; pass --overwrite to "
                            "replace what abdoseg wrote", target)

    def _check_parents(self, name: str) -> None:
        """Every existing folder between ``self.path`` and ``name`` must be one abdoseg made."""
        parts = PurePosixPath(name).parts[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            path = self.path / parent
            if os.path.lexists(path) and not (path.is_dir() and not path.is_symlink()
                                              and self.is_recorded(parent + "/")):
                raise UserError("abdoseg did not make this folder, so it writes nothing into it (move it "
                                "away or choose another output folder)", path)

    def _new_parents(self, name: str) -> list[str]:
        parts = PurePosixPath(name).parts[:-1]
        return ["/".join(parts[:depth]) + "/" for depth in range(1, len(parts) + 1)]

    def _check_all_recorded(self, folder: Path, name: str) -> None:
        for path in sorted(folder.rglob("*")):
            entry = f"{name}/{path.relative_to(folder).as_posix()}" + ("/" if path.is_dir() else "")
            if not self.is_recorded(entry):
                raise UserError("abdoseg did not write this, so it neither replaces nor deletes the folder "
                                "holding it (move it away or choose another output folder)", path)


def claim_output_folder(folder: str | Path, command: str, inputs: Iterable[str | Path] = (),
                        overwrite: bool = False) -> OutputFolder:
    """Take ``folder`` as the output folder of ``command``, or refuse it with one line.

    Args:
        folder: the output folder; created (with its parents) when it does not exist.
        command: the abdoseg command writing there (``"phantom"``, ``"preprocess"``, ``"train"``,
            ``"predict"``, ``"evaluate"``, ``"demo"`` ...).
        inputs: the command's input files and folders. The output may not be an input folder,
            lie inside one or contain one, nor contain an input file (paths compared resolved,
            so symlinks count).
        overwrite: let the returned folder replace files abdoseg recorded there earlier.

    Returns:
        An :class:`OutputFolder` whose marker names ``command``.

    Raises:
        UserError: the folder is a file, not empty and not abdoseg's, another command's output,
            overlaps an input, has a damaged marker, or cannot be created.
    """
    path = Path(folder).expanduser().resolve()
    _check_not_an_input(Path(folder), path, inputs)
    if path.exists() and not path.is_dir():
        raise UserError("is a file, not a folder; choose a folder for the output", folder)
    marker_path = path / MARKER_NAME
    if marker_path.is_file():
        marker = _read_marker(path)
        if marker["command"] != command:
            raise UserError(f"holds the output of 'abdoseg {marker['command']}'; choose a new or empty folder "
                            f"for '{command}'", folder)
    else:
        _check_empty(folder, path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the output folder: {err.strerror}", folder) from None
        marker = {"abdoseg_output": MARKER_VERSION, "command": command, "files": []}
        write_json(marker_path, marker)
    output = OutputFolder(path, command, overwrite)
    output.close()  # merge the records a crashed run left
    output._recorded_at_claim = frozenset(_read_marker(path)["files"])
    return output


def _check_not_an_input(given: Path, path: Path, inputs: Iterable[str | Path]) -> None:
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if source.is_dir() or not source.exists():
            if path == source or source in path.parents:
                relation = "is" if path == source else "lies inside"
                raise UserError(f"{given}: {relation} the input folder {item}; abdoseg never writes into its inputs, "
                                "choose another output folder", given)
            if path in source.parents:
                raise UserError(f"{given}: contains the input folder {item}; choose an output folder outside the "
                                "inputs", given)
        elif path == source or path in source.parents:
            raise UserError(f"{given}: contains the input file {item}; choose an output folder outside the inputs",
                            given)


def _check_empty(given: Path, path: Path) -> None:
    """A folder without a marker is accepted only when empty (abdoseg's own temporaries aside)."""
    if not path.is_dir():
        return
    entries = sorted(entry.name for entry in path.iterdir() if not entry.name.startswith(TEMPORARY_PREFIX))
    if entries:
        shown = ", ".join(repr(name) for name in entries[:3]) + (" ..." if len(entries) > 3 else "")
        raise UserError(f"is not empty and abdoseg did not make it ({len(entries)} entries: {shown}); "
                        "choose a new or empty folder", given)


def _read_marker(path: Path) -> dict:
    marker_path = path / MARKER_NAME
    marker = read_json(marker_path, "abdoseg output marker")
    valid = (isinstance(marker, dict) and isinstance(marker.get("command"), str)
             and isinstance(marker.get("files"), list) and all(isinstance(f, str) for f in marker["files"]))
    if not valid:
        raise UserError("is not a valid abdoseg output marker; choose a new or empty output folder",
                        marker_path)
    return marker


def _read_records(path: Path) -> dict[str, Path]:
    """Recorded names from the record files (name -> the record file holding it)."""
    folder = path / RECORDS_NAME
    records: dict[str, Path] = {}
    if not folder.is_dir():
        return records
    for record_file in sorted(folder.glob("*.json")):
        name = read_json(record_file, "abdoseg output record")
        if not isinstance(name, str):
            raise UserError("is not a valid abdoseg output record", record_file)
        records[name] = record_file
    return records


def _relative_name(relative: str | Path) -> str:
    """``relative`` as a clean relative POSIX path inside the folder, or ValueError (a bug)."""
    name = PurePosixPath(Path(relative).as_posix())
    if (name.is_absolute() or not name.parts or ".." in name.parts
            or name.parts[0] in (MARKER_NAME, RECORDS_NAME) or name.name.startswith(TEMPORARY_PREFIX)):
        raise ValueError(f"{relative!r} is not a path abdoseg may write inside an output folder")
    return name.as_posix()
