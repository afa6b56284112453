"""Targets ``gold``: train on the dataset's own responses (the default; batches pass through)."""

from kdcore import hookimpl
from kdcore.targets import Targets


class GoldTargets(Targets):
    """The loader's micro-batches, unchanged: the same objects reach forward/backward, so
    ``targets: gold`` is bit-identical to a config without a ``targets`` key."""

    name = "gold"


@hookimpl
def kdcore_register_targets(register):
    register(GoldTargets)
