"""User-facing errors.

Anything a user can fix (a bad file, a wrong option) is raised as :class:`UserInputError`
with a one-line message that names the file and says what to do. The CLI prints the message
without a traceback and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path


class UserInputError(Exception):
    """An error caused by the user's input; the message is shown as is."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)
