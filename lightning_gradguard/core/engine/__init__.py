"""The guard engine: the orchestration (snapshot -> judge -> decide -> act -> record) written once.

Holds :class:`GuardEngine` (``_engine``), the :class:`GuardHost` interface every adapter implements (``_host``),
the guard options checked in one place (``_options``) and the ``gradguard/`` scalar tags with their log10 twins
(``_scalars``). The Lightning callback, the plain-loop guard and the Fabric adapter each implement a host and call
the engine; none of them re-implements a step of it.

May import: every other layer of :mod:`lightning_gradguard.core` (measure, clip, guard, recover), never lightning.
"""

from lightning_gradguard.core.engine._engine import EngineField, GuardEngine
from lightning_gradguard.core.engine._host import GuardHost
from lightning_gradguard.core.engine._options import GuardOptions, check_guard_options

__all__ = ["EngineField", "GuardEngine", "GuardHost", "GuardOptions", "check_guard_options"]
