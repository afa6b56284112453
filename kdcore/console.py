"""What every kdcore command line shares: logging set-up and the error contract.

Errors caused by input (:class:`~kdcore.errors.KdcoreError`) and by the disk (full, read-only,
not permitted) print one ``PROG: error: ...`` line and exit with status 2, without a traceback;
Ctrl-C outside a training loop exits with 130 (inside one it checkpoints and stops: kdcore.guard).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Callable

from .errors import KdcoreError


# Errors of the disk, of permissions or of a path the user gave, never of the program: one
# message, like bad input.
PATH_ERRORS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                         errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST})


def setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kdcore").setLevel(logging.INFO)
    try:  # transformers' per-file progress bars drown kdcore's own
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's ``body`` under the error contract; returns the exit status."""
    setup_logging()
    try:
        return body()
    except KdcoreError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in PATH_ERRORS:
            raise
        where = f": {_shorten(str(exc.filename))}" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror}{where}", file=sys.stderr)
        return 2


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def command(prog: str, parser: Callable, run: Callable[..., int]) -> Callable[..., int]:
    """A console entry point ``main(argv=None) -> status``: ``parser().parse_args(argv)``, then
    ``run(args)`` under the error contract of :func:`run_command`."""

    def main(argv=None) -> int:
        args = parser().parse_args(argv)
        return run_command(prog, lambda: run(args))

    main.__doc__ = f"The ``{prog}`` command line."
    return main
