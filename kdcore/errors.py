"""User-facing errors.

Anything the user can fix (a config key, a path, an incompatible model pair) raises a
subclass of :class:`KdcoreError`. The CLI prints its message on one line group and exits
non-zero without a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class KdcoreError(Exception):
    """Base class of errors caused by user input."""


class ConfigError(KdcoreError):
    """A config file, override or component node is invalid."""


class PluginError(KdcoreError):
    """Plugin discovery or registration failed (duplicate or unknown names)."""


class DataError(KdcoreError):
    """A data file is missing or malformed."""


class ModelError(KdcoreError):
    """A model or tokenizer cannot be loaded, or two models are incompatible."""


class ModelUnavailable(ModelError):
    """A hub model that is neither local nor cached (e.g. offline): nothing can be inspected."""


class CheckpointError(KdcoreError):
    """A checkpoint is missing, incomplete or corrupt, or cannot be written."""


class TrainingError(KdcoreError):
    """A run cannot go on because of what its input does (losses that stay non-finite, weights
    that became non-finite): stopped with the last good checkpoint intact."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
