"""User-facing errors.

Every mistake a user can make (a bad recipe, a missing file, a corrupt checkpoint)
raises a subclass of :class:`AlloyError`. The CLI prints its one-line message and
exits with code 2; a traceback is reserved for bugs in alloykit itself.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AlloyError(Exception):
    """A user error: one line naming the object, the value and the fix."""

    exit_code = 2


class RecipeError(AlloyError):
    """The recipe (YAML or Python object) is malformed or inconsistent."""


class CheckpointError(AlloyError):
    """An input checkpoint is missing, unreadable, corrupt or incompatible."""


class PlanError(AlloyError):
    """The inputs cannot be merged as asked (missing tensors, shape mismatch...)."""


class OutputError(AlloyError):
    """The output folder cannot be written (exists, no space, I/O error)."""


class NonFiniteError(AlloyError):
    """An input or output tensor holds NaN or Inf and the user asked to fail on it."""


def did_you_mean(value: str, choices: Iterable[str], n: int = 1) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice (up to ``n``: 'x' or 'y'), or '' if none is close."""
    close = difflib.get_close_matches(str(value), sorted(choices), n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
