"""Writing and reading files safely: every file abdoseg writes goes through here.

Writes are atomic: the bytes go to a hidden temporary name in the target's folder, then one
``os.replace`` puts them in place, so a crash or a kill leaves the old file or the new one, never
half of one. Files get the user's normal mode (the umask decides, like any tool), not the 0600 of
``tempfile.mkstemp``. JSON is written strictly (no ``NaN``: non-finite numbers become ``null``)
and read with one error type that names the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from utils.errors import UserError

TEMPORARY_PREFIX = ".abdoseg-tmp-"  # every temporary file or folder abdoseg makes starts so


def temporary_name(path: str | Path) -> Path:
    """A hidden, unique name in ``path``'s folder for writing ``path`` before the rename."""
    path = Path(path)
    return path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp`` (same suffix as ``p``); on success it becomes ``p``.

    On an exception the temporary file is removed and ``p`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (umask mode); returns the path."""
    with atomic_path(path) as temporary:
        with open(temporary, "xb") as handle:  # "x": never follow an existing name
            handle.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON (non-finite floats become ``null``) atomically."""
    return write_text(path, json.dumps(json_safe(value), indent=indent, allow_nan=False) + "\n")


def json_safe(value):
    """``value`` with NaN and infinities replaced by ``None`` (recursively), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(value.item())
    return value


def read_json(path: str | Path, what: str = "JSON file"):
    """Parse the JSON file at ``path``; a missing or malformed file is a :class:`UserError`.

    Args:
        what: what the file is, for the message ("label map", "manifest" ...).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} not found", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {what}: {err}", path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"not a valid {what}: {err.msg} at line {err.lineno}", path) from None
