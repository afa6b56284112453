"""Tuner ``full``: every student parameter trains (the default)."""

from kdcore import hookimpl
from kdcore.tuner import Tuner


class FullFineTuning(Tuner):
    name = "full"


@hookimpl
def kdcore_register_tuners(register):
    register(FullFineTuning)
