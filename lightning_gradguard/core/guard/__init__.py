"""Guard decisions: how healthy one step is, and what to do about it.

Holds the step judge (one stack of scalars, one cross-rank reduce or none when they travelled with a sharded
measurement, one host read: ``_step_judge``), the policy and
its plain-data records ``StepHealth``/``Decision``/``GuardEvent``/``GuardCause`` (``_policy``), and the detectors
it consults: finite divergence (``_divergence``), the stability rules and their ``StabilityFinding``
(``_stability``), the loss z-score (``_loss_spike``). Every object takes data and returns named findings; none
touches a model or an optimizer.

May import: :mod:`~lightning_gradguard.core.measure`, :mod:`~lightning_gradguard.core.clip` and ``_arg_checks``.
"""

from lightning_gradguard.core.guard._policy import (
    GuardAction,
    GuardCause,
    GuardDecision,
    GuardEvent,
    GuardPolicy,
    StepHealth,
)
from lightning_gradguard.core.guard._stability import StabilityFinding

__all__ = ["GuardAction", "GuardCause", "GuardDecision", "GuardEvent", "GuardPolicy", "StabilityFinding", "StepHealth"]
