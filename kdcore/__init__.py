"""kdcore: knowledge distillation of causal language models, composed from plugins.

Public API: the plugin markers and base classes, and ``names(kind)`` / ``build(kind, node,
**context)`` to list and construct registered components exactly as a config file would.
"""

from .hookspecs import hookimpl, hookspec
from .criterion import Criterion
from .aligner import Aligner, Alignment
from .projector import Projector
from .task import Example, Task
from .tuner import Tuner
from .components import build, names
from .errors import KdcoreError
from .schema import Range

__version__ = "0.1.0"

__all__ = [
    "hookimpl", "hookspec", "Criterion", "Aligner", "Alignment", "Projector", "Task", "Example", "Tuner",
    "build", "names", "KdcoreError", "Range", "__version__",
]
