"""Which events are announced on the terminal: every one, until one kind of skip repeats for ever.

A data source that yields a bad batch every few steps (a corrupt shard, a loss that overflows on one class of inputs)
can make the guard skip hundreds of steps of one run, each correctly. Every skip stays in ``events``, in
TensorBoard (``gradguard/nan_guard_events``) and in the scalars; a terminal that prints hundreds of identical lines,
though, hides the one line that matters (a rollback, a halt). So :class:`AnnounceQuota` lets through

- every event that is not a skip (rollbacks, LR changes, warnings, halts: each is rare by construction, and each is
  news);
- the first :data:`BURST` skips of each cause, one line each;
- after that, the skips whose count for that cause reaches a power of two (the 8th, 16th, 32nd, ...), each with how
  many were not announced since the last line, so the terminal shows the fault's rate on a logarithmic clock;
- at the end of the fit (:meth:`AnnounceQuota.closing_line`), one line counting the skips not announced yet.

Nothing is ever silent: the first skip of every cause is on the terminal, a cause that keeps recurring keeps
reappearing there, and the end of the fit counts what was not shown.
"""

from __future__ import annotations

from typing import Any

#: skips of one cause announced one by one before the quota thins them out
BURST = 5


class AnnounceQuota:
    """Decides which event lines reach the terminal (every event is still recorded and written to TensorBoard).

    Example:
        >>> q = AnnounceQuota()
        >>> shown = [q.line(s, "skip", "nonfinite_loss", f"skip at {s}") for s in range(20)]
        >>> [s for s, line in enumerate(shown) if line is not None]
        [0, 1, 2, 3, 4, 7, 15]
        >>> shown[7].split("; ")[:2]
        ['skip at 7 (skip 8 for this cause', '2 more since step 4 not announced']
        >>> q.line(20, "rollback", "nonfinite_loss", "rollback at 20")
        'rollback at 20'
        >>> q.closing_line("NaNGuard")
        'NaNGuard: 4 more skipped steps were not announced (nonfinite loss 4, last at step 19); 20 in all'
    """

    def __init__(self, burst: int = BURST) -> None:
        self.burst = burst
        #: per cause: [skips so far, skips not announced since the last line, step of the last announced line,
        #: step of the last skip]
        self._skips: dict[str, list[int]] = {}

    def line(self, step: int, kind: str, cause: str, text: str) -> str | None:
        """``text`` as the terminal should show it, or None when this event is counted instead."""
        if kind != "skip":
            return text
        row = self._skips.setdefault(cause, [0, 0, step, step])
        row[0] += 1
        row[3] = step
        n = row[0]
        if n <= self.burst:
            row[2] = step
            return text
        if n & (n - 1):  # not a power of two: counted, shown later
            row[1] += 1
            return None
        quiet, since = row[1], row[2]
        row[1], row[2] = 0, step
        return (
            f"{text} (skip {n} for this cause; {quiet} more since step {since} not announced; each is in TensorBoard"
            " under gradguard/nan_guard_events)"
        )

    def closing_line(self, owner: str) -> str | None:
        """One line counting the skips not announced since their cause's last line (None when there are none); they
        count as announced afterwards."""
        pending = {cause: row for cause, row in self._skips.items() if row[1]}
        if not pending:
            return None
        total = sum(row[0] for row in self._skips.values())
        quiet = sum(row[1] for row in pending.values())
        parts = ", ".join(f"{c.replace('_', ' ')} {row[1]}, last at step {row[3]}" for c, row in pending.items())
        for row in pending.values():
            row[1], row[2] = 0, row[3]
        return f"{owner}: {quiet} more skipped steps were not announced ({parts}); {total} in all"

    def state_dict(self) -> dict[str, Any]:
        return {"skips": {cause: list(row) for cause, row in self._skips.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        rows = (state or {}).get("skips") or {}
        self._skips = {str(cause): [int(v) for v in row][:4] for cause, row in rows.items() if len(row) >= 4}
