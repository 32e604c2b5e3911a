"""User-facing errors.

Anything a user can get wrong (a path, an option, a file) raises :class:`CnnkitError` with one
sentence that says what is wrong and how to fix it. The command line prints that sentence and
exits with code 2; the Python API lets it propagate.
"""

from __future__ import annotations


class CnnkitError(Exception):
    """An error caused by user input, reported as one sentence (CLI exit code 2)."""

    exit_code = 2


class DataError(CnnkitError):
    """A dataset, folder or file cannot be used."""


class ImageDecodeError(DataError):
    """One image cannot be read (missing, corrupt, truncated, not an image, too large)."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read image '{path}': {reason}")


class ModelError(CnnkitError):
    """A model name, checkpoint or weight file cannot be used."""


class TargetError(ModelError):
    """What one input should be explained or attacked for is not in its output (a detection
    index beyond its detections): the input is skipped when it is one of several."""


class TrainingError(CnnkitError):
    """Training cannot go on (for example the loss keeps diverging)."""
