"""The decisions every rank takes together at each optimizer step: skip a non-finite step,
stop after too many of them, stop cleanly when the scheduler asks (SIGTERM/SIGINT).

A step is *non-finite* when its global loss or its global gradient norm (before clipping) is
NaN or ±inf on any rank. It is skipped: the gradients are dropped, and neither the weights, the
optimizer state nor the learning-rate schedule move; its batch counts as consumed (the data
position advances with the step counter, so the run equals one that left that batch out).
``train.max_consecutive_skips`` skipped steps in a row stop the run with a
:class:`~kdcore.errors.TrainingError`; the weights then are those of the last finite step, and
the last checkpoint is untouched.

SIGTERM and SIGINT (what SLURM, Kubernetes and cloud schedulers send before they kill a job)
only set a flag while the guard is active; the trainer checkpoints at the next step boundary
and exits normally. A second signal of the same kind acts as it would without the guard.
Each decision is one all-reduce of a flag (skip: in the optimizer step; stop: at the step
boundary), so all ranks skip and stop together.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from typing import Dict, Optional

from .distributed import DistInfo, any_rank
from .errors import TrainingError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StepGuard:
    """Counts skipped steps, remembers a stop request, and installs the signal handlers
    (as a context manager, in the main thread only)."""

    def __init__(self, dist: DistInfo, max_consecutive: int):
        self.dist, self.max_consecutive = dist, max_consecutive
        self.skipped = 0  # skipped steps in the whole run
        self.consecutive = 0  # skipped steps in a row, up to the last one
        self.last_skipped = False
        self.stop_requested = False  # a signal reached some rank (agreed by all ranks at a step boundary)
        self.signal_name: Optional[str] = None  # the signal this process received
        self._previous: Dict[int, object] = {}

    # -- per step -------------------------------------------------------------------------
    def skip(self, loss: float, grad_norm: float, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is skipped (one all-reduce: all ranks agree)."""
        bad_here = not (math.isfinite(loss) and math.isfinite(grad_norm))
        bad = any_rank([bad_here], self.dist)[0]
        self.last_skipped = bad
        if bad:
            self.skipped += 1
            self.consecutive += 1
            if self.dist.is_main:
                log.warning("step %d: loss %s, gradient norm %s (on some rank): step skipped (%d in a row, %d in all)",
                            step, loss, grad_norm, self.consecutive, self.skipped)
        else:
            self.consecutive = 0
        return bad

    def should_stop(self) -> bool:
        """At a step boundary: whether a signal reached any rank (one all-reduce)."""
        self.stop_requested = self.stop_requested or any_rank([self.signal_name is not None], self.dist)[0]
        return self.stop_requested

    def check(self, step: int, last_checkpoint) -> None:
        """Stop the run after ``max_consecutive`` skipped steps in a row."""
        if self.consecutive >= self.max_consecutive:
            raise TrainingError(
                f"{self.consecutive} steps in a row (up to step {step}) had a non-finite loss or gradient; stopped "
                f"(train.max_consecutive_skips={self.max_consecutive}). The weights never took such a step; the last "
                f"checkpoint is {last_checkpoint or 'none'}. Lower train.lr, check the data, or raise the limit")

    def record(self) -> Dict[str, int]:
        """What a checkpoint keeps, so a resumed run counts on."""
        return {"skipped_steps": self.skipped, "consecutive_skips": self.consecutive}

    def restore(self, state: Dict) -> None:
        self.skipped = _count(state.get("skipped_steps"))
        self.consecutive = _count(state.get("consecutive_skips"))

    # -- signals ----------------------------------------------------------------------------
    def __enter__(self) -> "StepGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # a second signal: what it would have done anyway
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signal_name = name
        print(f"received {name}: saving a checkpoint at the end of this step, then stopping "
              f"(send {name} again to stop at once)", flush=True)


def _count(value) -> int:
    return value if type(value) is int and value >= 0 else 0
