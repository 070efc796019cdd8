"""The one exception type for a user's mistake: bad input, a bad option, a folder abdoseg may not use.

Every error abdoseg raises on purpose derives from :class:`UserError`, which carries what it is
about (a file, a folder or an option). The command line prints it as one line and exits with 2;
any other exception is a bug in abdoseg (exit 1, traceback saved).
"""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """Input or settings that cannot be used; the message names ``about`` and what is wrong.

    Args:
        message: one line saying what is wrong.
        about: the file, folder or option the error is about (``Path`` or ``"--option"``); when
            given and not already in the message, the message starts with it.
    """

    def __init__(self, message: str, about: str | Path | None = None):
        self.about = about
        if about is not None and str(about) not in message:
            message = f"{about}: {message}"
        super().__init__(message)


def one_line_reason(err: BaseException) -> str:
    """One line for a failed case: a UserError's or OSError's own message, else ``Type: message``
    (``MemoryError``, ``TypeError: ...``: not the user's mistake, so the type is shown)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, (UserError, OSError)) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
