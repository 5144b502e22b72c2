"""The plain-loop guard's step judgement is the shared core one (:mod:`lightning_gradguard.core.step_judge`).

Kept as a module so that existing imports keep working; the plain guard passes its
:class:`~lightning_gradguard.plain.distributed.MaxReducer` (``torch.distributed`` or Fabric's ``all_reduce``).
"""

from lightning_gradguard.core.step_judge import StepJudge, Verdict, total_norm64

__all__ = ["StepJudge", "Verdict", "total_norm64"]
