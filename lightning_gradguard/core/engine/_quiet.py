"""Which events are announced on the terminal: every one, until one kind of skip or warning repeats for ever.

A data source that yields a bad batch every few steps (a corrupt shard, a loss that overflows on one class of inputs)
can make the guard skip hundreds of steps of one run, each correctly. A long run whose loss is non-stationary by
nature gets the same warning again and again: the zoo's DQN (a TD loss that climbs after target syncs) drew 132
"the loss climbed" warnings in 24,000 steps, its REINFORCE (a surrogate loss that rises towards 0 as the policy
converges) 83 in 20,000, each correct and none news after the first few. Every event stays in ``events``, in TensorBoard
(``gradguard/nan_guard_events``) and in the scalars; a terminal that prints hundreds of identical lines, though, hides
the one line that matters (a rollback, a halt). So :class:`AnnounceQuota` lets through

- every event that acts on the run other than a skip (rollbacks, LR changes, halts: each is rare by construction, and
  each is news);
- the first :data:`BURST` skips of each cause, and the first :data:`BURST` warnings of each rule, one line each;
- after that, those whose count for their cause (a warning: its rule) reaches a power of two (the 8th, 16th,
  32nd, ...), each with how many were not announced since the last line, so the terminal shows the rate on a
  logarithmic clock;
- at the end of the fit (:meth:`AnnounceQuota.closing_line`), one line counting what was not announced yet.

Nothing is ever silent: the first skip of every cause and the first warning of every rule are on the terminal (a
network that died warns under a rule of its own), one that keeps recurring keeps reappearing there, and the end of
the fit counts what was not shown.
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
        >>> warned = [q.line(s, "warn", "instability", f"warn at {s}", rule="loss_climbing") for s in range(30, 40)]
        >>> [s for s, line in zip(range(30, 40), warned) if line is not None]
        [30, 31, 32, 33, 34, 37]
        >>> q.closing_line("NaNGuard")
        'NaNGuard: 2 more warnings were not announced (instability loss climbing 2, last at step 39); 10 in all'
    """

    def __init__(self, burst: int = BURST) -> None:
        self.burst = burst
        #: per cause: [skips so far, skips not announced since the last line, step of the last announced line,
        #: step of the last skip]
        self._skips: dict[str, list[int]] = {}
        #: the same per warning rule (key ``"cause rule"``)
        self._warns: dict[str, list[int]] = {}

    def line(self, step: int, kind: str, cause: str, text: str, rule: str | None = None) -> str | None:
        """``text`` as the terminal should show it, or None when this event is counted instead. ``rule``: a
        warning's stability rule (warnings of different rules count apart)."""
        if kind == "skip":
            return self._thin(self._skips, cause, step, text, "skip", "for this cause")
        if kind == "warn":
            key = f"{cause} {rule}" if rule else cause
            return self._thin(self._warns, key, step, text, "warning", "of this kind")
        return text

    def _thin(self, rows: dict[str, list[int]], key: str, step: int, text: str, noun: str, of: str) -> str | None:
        row = rows.setdefault(key, [0, 0, step, step])
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
            f"{text} ({noun} {n} {of}; {quiet} more since step {since} not announced; each is in TensorBoard"
            " under gradguard/nan_guard_events)"
        )

    def closing_line(self, owner: str) -> str | None:
        """One line counting the skips and the warnings not announced since their cause's (rule's) last line (None
        when there are none); they count as announced afterwards."""
        parts = [
            text
            for rows, what in ((self._skips, "skipped steps"), (self._warns, "warnings"))
            if (text := self._pending(rows, what))
        ]
        return f"{owner}: " + "; and ".join(parts) if parts else None

    @staticmethod
    def _pending(rows: dict[str, list[int]], what: str) -> str:
        pending = {key: row for key, row in rows.items() if row[1]}
        if not pending:
            return ""
        total = sum(row[0] for row in rows.values())
        quiet = sum(row[1] for row in pending.values())
        parts = ", ".join(f"{c.replace('_', ' ')} {row[1]}, last at step {row[3]}" for c, row in pending.items())
        for row in pending.values():
            row[1], row[2] = 0, row[3]
        return f"{quiet} more {what} were not announced ({parts}); {total} in all"

    def state_dict(self) -> dict[str, Any]:
        return {
            "skips": {cause: list(row) for cause, row in self._skips.items()},
            "warnings": {key: list(row) for key, row in self._warns.items()},
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        def rows(name: str) -> dict[str, list[int]]:
            saved = (state or {}).get(name) or {}
            return {str(key): [int(v) for v in row][:4] for key, row in saved.items() if len(row) >= 4}

        self._skips, self._warns = rows("skips"), rows("warnings")
