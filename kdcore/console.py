"""What every kdcore command line shares: logging set-up and the error contract.

Errors caused by input (:class:`~kdcore.errors.KdcoreError`) print one ``PROG: error: ...`` line
and exit with status 2, without a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from .errors import KdcoreError


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


def command(prog: str, parser: Callable, run: Callable[..., int]) -> Callable[..., int]:
    """A console entry point ``main(argv=None) -> status``: ``parser().parse_args(argv)``, then
    ``run(args)`` under the error contract of :func:`run_command`."""

    def main(argv=None) -> int:
        args = parser().parse_args(argv)
        return run_command(prog, lambda: run(args))

    main.__doc__ = f"The ``{prog}`` command line."
    return main
