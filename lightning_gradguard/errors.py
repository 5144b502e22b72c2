"""The one library error: a run that gradguard had to halt."""

from __future__ import annotations

__all__ = ["DivergenceError"]


class DivergenceError(RuntimeError):
    """Raised after ``trainer.fit`` when a gradguard callback halted a diverging run.

    Attributes:
        step: the optimizer step (``trainer.global_step``) at which the run was halted.
        reason: a short, readable reason (e.g. ``"non-finite gradient norm after 3 rollbacks"``).
        report_path: path of the diagnostic report written before halting, if any.
    """

    def __init__(self, reason: str, step: int | None = None, report_path: str | None = None) -> None:
        self.reason = reason
        self.step = step
        self.report_path = report_path
        where = f" at step {step}" if step is not None else ""
        report = f" (diagnostic report: {report_path})" if report_path else ""
        super().__init__(f"training diverged{where}: {reason}{report}")

    def __reduce__(self):  # keep picklable across processes (DDP spawn)
        return (type(self), (self.reason, self.step, self.report_path))
