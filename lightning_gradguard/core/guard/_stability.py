"""The stability controller: notice a learning rate that is too high before anything turns non-finite.

Clipping can hide a too-high learning rate for a long time: when the clipper cuts almost every step, the step size
is set by the threshold, not by the data, and the run stops learning without ever diverging. Only a lower LR helps.
:class:`StabilityController` keeps the last two windows of ``window`` healthy steps and summarises them as a
:class:`WindowPair` (the median loss and gradient norm of each window, the share of clipped steps in the newer one,
and the run's first loss and norm, highest loss, lowest window median and step count). Six named rules read that pair,
in this order; the first that fires gives a :class:`StabilityFinding` (so a run must be both unstable *and* not
improving):

1. ``norm_rising``: the newer window's median norm is above ``norm_growth`` x the older one's, and the loss is not
   improving;
2. ``loss_climbing``: the newer window's median loss is above ``loss_growth`` x the older one's;
3. ``loss_above_best``: the newer window's median loss is above ``loss_growth`` x the lowest window median seen so
   far (a slow climb over several windows). For both climbing rules the older window must already be ``rising`` x
   above that lowest median (a climb spans windows: one bad batch that the clipper cut can double a single window's
   median, and that is no reason to cut the LR), and the loss above ``floor`` x the run's first loss (so that noise
   around a loss near zero never counts);
4. ``worse_than_untrained``: the median loss of both windows is above ``start_margin`` x the run's first loss (the
   untrained model's): a too-high LR from the first step, which clipping may keep finite but never makes learn;
5. ``killed_at_start``: after a blow-up (a loss above ``blowup`` x the first), the median loss of both windows is
   back at the untrained level, not improving, while the gradient norm collapsed far below its first value (units
   killed by the violent first updates: the model sits at chance);
6. ``sustained_clipping``: at least ``clip_fraction`` of the newer window's steps were clipped, its median loss is
   not below the older window's, and it is above ``start_margin`` x the first loss. Clipping alone is no evidence: a
   threshold that lags a norm growing as the model learns clips most steps of a healthy run (measured on the LSTM
   example at its stable LR, and in the demo's plateau at the untrained loss after a rollback).

A finding names its rule, the numbers it used (``evidence``), a plain-words ``reason`` ("learning rate looks too
high: ..."), the exponent of the cut (``lr_power``: the guard lowers the LR by ``lr_factor ** lr_power``) and where
the cut should go (``target``): ``"start"`` (the untrained state: rules 4 and 5), ``"before_climb"`` (the newest
trusted state from before the two windows: rules 2 and 3) or ``"in_place"`` (keep the state). Then the controller
starts over (two fresh windows are needed before it can fire again). A cut that follows the previous one within
``repeat_windows`` windows doubles ``lr_power``: an LR 10x too high is found in a few cuts, not in ten; the first cut
of a model worse than untrained is squared. Healthy runs improve their loss from one window to the next, so the
controller stays quiet on them. Host floats only: the guard reads the loss, the norm and the clip flags once per step
anyway.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

#: where a stability cut should go: the untrained state, the newest trusted state before the climb, or nowhere
StabilityTarget = Literal["start", "before_climb", "in_place"]

_PREFIX = "learning rate looks too high: "


def _median(values: tuple[float, ...]) -> float:
    """``statistics.median`` of a non-empty tuple (the same arithmetic, without its checks and conversions)."""
    data = sorted(values)
    i = len(data) // 2
    return data[i] if len(data) % 2 else (data[i - 1] + data[i]) / 2


@dataclass(frozen=True)
class WindowPair:
    """The statistics of the last two windows that the stability rules read (host floats).

    Attributes:
        old_loss, new_loss: the median loss of the older / newer window.
        old_norm, new_norm: the median gradient norm of the older / newer window.
        clipped_share: the share of the newer window's steps that the clipper cut.
        start_loss: the run's first loss (the untrained model's; its absolute value), 0.0 when unknown.
        start_norm: the run's first gradient norm, 0.0 when unknown.
        peak: the highest loss seen.
        best: the lowest window median seen before the newer window (inf: none yet).
        steps: the healthy steps seen.
        window: the steps per window.
    """

    old_loss: float
    new_loss: float
    old_norm: float
    new_norm: float
    clipped_share: float
    start_loss: float
    start_norm: float
    peak: float
    best: float
    steps: int
    window: int

    @property
    def not_improving(self) -> bool:
        """The newer window's median loss is not below the older one's."""
        return self.new_loss >= self.old_loss


@dataclass(frozen=True)
class StabilityFinding:
    """Why the stability controller says the LR should come down, and how.

    Attributes:
        rule: the rule that fired (``"norm_rising"``, ``"loss_climbing"``, ``"loss_above_best"``,
            ``"worse_than_untrained"``, ``"killed_at_start"`` or ``"sustained_clipping"``).
        evidence: the numbers the rule compared.
        reason: the plain-words reason, ``"learning rate looks too high: ..."``.
        lr_power: the exponent of the cut (the guard lowers the LR by ``lr_factor ** lr_power``). A rule gives its
            base exponent (2 for a model worse than untrained, else 1); :meth:`StabilityController.update` doubles
            it for cuts in quick succession.
        target: where the cut should go: ``"start"`` (restart from the untrained state), ``"before_climb"`` (back to
            the newest trusted state from before the two windows) or ``"in_place"`` (cut the LR, keep the state).
    """

    rule: str
    evidence: dict[str, float] = field(hash=False, compare=True)
    reason: str
    lr_power: int = 1
    target: StabilityTarget = "in_place"

    @property
    def worse_than_start(self) -> bool:
        """The model is worse than untrained (``target == "start"``)."""
        return self.target == "start"

    @property
    def damaged(self) -> bool:
        """The loss climbed: the state is worse than two windows ago (``target == "before_climb"``)."""
        return self.target == "before_climb"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "evidence": dict(self.evidence),
            "reason": self.reason,
            "lr_power": self.lr_power,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StabilityFinding:
        return cls(
            rule=str(state["rule"]),
            evidence={str(k): v for k, v in dict(state.get("evidence") or {}).items()},
            reason=str(state.get("reason", "")),
            lr_power=int(state.get("lr_power", 1)),
            target=state.get("target", "in_place"),
        )


class StabilityController:
    """Says when the LR should come down, and by how much (see the module docstring).

    Args:
        window: steps per window (two windows are compared).
        clip_fraction: share of clipped steps in a window that counts as sustained clipping.
        norm_growth: growth of the median gradient norm between windows that counts as rising.
        loss_growth: growth of the median loss (over the previous window, or over the lowest window median seen)
            that counts as climbing.
        floor: a climbing loss must also be above this fraction of the run's first loss (a loss near zero that
            doubles from 0.004 to 0.008 is noise, not instability).
        start_margin: two windows in a row with a median loss above this multiple of the run's first loss: the
            model is worse than untrained (a too-high LR from the first step).
        stuck_margin, collapse: two windows with a median loss of at least ``stuck_margin`` x the first loss, no
            progress from one to the next, and the median gradient norm ``collapse`` x below the first norm: a
            network killed in its first steps (dead units; the loss sits at the untrained level), provided a loss
            above ``blowup`` x the first one was seen (the violent update that killed them). A warm-up from a tiny LR
            or a slow start at a sane LR also leave the loss where it started (the deep-CNN example at its stable LR
            sits at chance for 50 steps on one seed), but without that blow-up.
        rising: a climbing loss must already be above this multiple of its best window median in the window before.
        repeat_windows: a cut within this many windows of the previous one doubles the exponent of the cut
            (``lr_power``: 1, 2, 4, ...), a geometric search for a stable LR.

    Attributes:
        interventions: the findings returned so far.
        last_finding: the last finding returned (None: none yet).

    Example:
        >>> ctl = StabilityController(window=4)
        >>> [ctl.update(1.0, 1.0, clipped=False) for _ in range(8)][-1] is None
        True
        >>> findings = [ctl.update(1.0 + i, 1.0, clipped=True) for i in range(8)]
        >>> [(f.rule, f.target, f.lr_power) for f in findings if f]
        [('sustained_clipping', 'in_place', 1)]
        >>> ctl.last_finding.reason.split(":")[0]
        'learning rate looks too high'
    """

    #: the rules, in the order they are evaluated (method names; the first that fires wins)
    RULES: ClassVar[tuple[str, ...]] = (
        "norm_rising",
        "loss_climbing",
        "loss_above_best",
        "worse_than_untrained",
        "killed_at_start",
        "sustained_clipping",
    )

    def __init__(
        self,
        window: int = 25,
        clip_fraction: float = 0.8,
        norm_growth: float = 10.0,
        loss_growth: float = 2.0,
        floor: float = 0.1,
        repeat_windows: int = 4,
        start_margin: float = 1.1,
        rising: float = 1.2,
        stuck_margin: float = 0.85,
        collapse: float = 3.0,
        blowup: float = 2.0,
    ) -> None:
        self.window = int(window)
        self.clip_fraction = float(clip_fraction)
        self.norm_growth = float(norm_growth)
        self.loss_growth = float(loss_growth)
        self.floor = float(floor)
        self.repeat_windows = int(repeat_windows)
        self.start_margin = float(start_margin)
        self.rising = float(rising)
        self.stuck_margin = float(stuck_margin)
        self.collapse = float(collapse)
        self.blowup = float(blowup)
        self.interventions = 0
        self.last_finding: StabilityFinding | None = None
        self._start: float | None = None  # the first loss seen (the untrained model's)
        self._start_norm: float | None = None  # the first gradient norm seen
        self._peak = -math.inf  # the highest loss seen
        self._best = math.inf  # the lowest window median seen
        self._steps = 0  # healthy steps seen
        self._last_fire: int | None = None
        self._streak = 0
        self._rules: tuple[Callable[[WindowPair], StabilityFinding | None], ...] = tuple(
            getattr(self, name) for name in self.RULES
        )
        self.reset()

    def reset(self) -> None:
        """Start over: two fresh windows before the next judgement (the start loss and best median are kept)."""
        self._rows: deque[tuple[float, float, bool]] = deque(maxlen=2 * self.window)
        self._count = 0
        self._every = max(1, self.window // 5)

    def update(self, loss: float, grad_norm: float, clipped: bool) -> StabilityFinding | None:
        """Add one healthy step; returns the finding that says why the LR should come down, or None."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return None
        if self._start is None:
            self._start, self._start_norm = abs(loss), grad_norm
        self._steps += 1
        if loss > self._peak:  # (max() without the call)
            self._peak = loss
        self._rows.append((loss, grad_norm, bool(clipped)))
        self._count += 1
        if len(self._rows) < 2 * self.window or self._count % self._every:
            return None  # judged every window/5 steps: the medians move slowly, and sorting costs
        pair = self._pair()
        self._best = min(self._best, pair.new_loss)
        finding = self.assess(pair)
        if finding is None:
            return None
        repeated = self._last_fire is not None and self._steps - self._last_fire <= self.repeat_windows * self.window
        self._streak = self._streak + 1 if repeated else 0
        if repeated:  # cuts in quick succession: 2, 4, 8, ... (the rule's own exponent is for a first cut)
            finding = replace(finding, lr_power=2**self._streak)
        self._last_fire = self._steps
        self.interventions += 1
        self.last_finding = finding
        self.reset()
        return finding

    def _pair(self) -> WindowPair:
        """The two windows in the buffer (full), summarised."""
        w = self.window
        losses, norms, clips = zip(*self._rows)
        return WindowPair(
            old_loss=_median(losses[:w]),
            new_loss=_median(losses[w:]),
            old_norm=_median(norms[:w]),
            new_norm=_median(norms[w:]),
            clipped_share=sum(clips[w:]) / w,
            start_loss=self._start or 0.0,
            start_norm=self._start_norm if self._start_norm is not None else 0.0,
            peak=self._peak,
            best=self._best,
            steps=self._steps,
            window=self.window,
        )

    def assess(self, pair: WindowPair) -> StabilityFinding | None:
        """The first of :attr:`RULES` that fires on ``pair`` (with its base ``lr_power``), or None. Changes no
        state."""
        for rule in self._rules:
            finding = rule(pair)
            if finding is not None:
                return finding
        return None

    # ------------------------------------------------------------------ the rules, in evaluation order
    def _climbing(self, w: WindowPair) -> bool:
        """Already rising in the older window (one bad batch that the clipper cut can leave a window's loss twice
        the last one's for a while; a loss that keeps climbing is above its best in both windows), above the floor."""
        above_floor = w.new_loss > self.floor * w.start_loss and w.new_loss > 0
        return above_floor and w.best < math.inf and w.old_loss > self.rising * w.best

    def norm_rising(self, w: WindowPair) -> StabilityFinding | None:
        """The median gradient norm grew ``norm_growth`` x between the windows while the loss did not improve."""
        if not (w.new_norm > self.norm_growth * w.old_norm and w.not_improving):
            return None
        return StabilityFinding(
            "norm_rising",
            {"old_norm": w.old_norm, "new_norm": w.new_norm, "old_loss": w.old_loss, "new_loss": w.new_loss},
            _PREFIX + f"the gradient norm keeps rising (median {w.old_norm:.4g} -> {w.new_norm:.4g} over "
            f"{w.window} steps) while the loss does not improve",
        )

    def loss_climbing(self, w: WindowPair) -> StabilityFinding | None:
        """A climbing loss: the newer window's median is ``loss_growth`` x the older one's."""
        if not (self._climbing(w) and w.new_loss > self.loss_growth * w.old_loss):
            return None
        return StabilityFinding(
            "loss_climbing",
            {"old_loss": w.old_loss, "new_loss": w.new_loss, "best": w.best},
            _PREFIX + f"the loss keeps climbing (median {w.old_loss:.4g} -> {w.new_loss:.4g} over {w.window} steps)",
            target="before_climb",
        )

    def loss_above_best(self, w: WindowPair) -> StabilityFinding | None:
        """A slow climb: the newer window's median is ``loss_growth`` x the lowest window median seen."""
        if not (self._climbing(w) and w.new_loss > self.loss_growth * w.best):
            return None
        return StabilityFinding(
            "loss_above_best",
            {"old_loss": w.old_loss, "new_loss": w.new_loss, "best": w.best},
            _PREFIX + f"the loss climbed from its best (window median {w.best:.4g} -> {w.new_loss:.4g})",
            target="before_climb",
        )

    def worse_than_untrained(self, w: WindowPair) -> StabilityFinding | None:
        """Both windows' median loss above ``start_margin`` x the run's first loss."""
        start = w.start_loss
        if not (w.old_loss > self.start_margin * start and w.new_loss > self.start_margin * start and start > 0):
            return None
        return StabilityFinding(
            "worse_than_untrained",
            {"start_loss": start, "old_loss": w.old_loss, "new_loss": w.new_loss, "clipped_share": w.clipped_share},
            _PREFIX + f"after {w.steps} steps the loss is still above the untrained model's ({start:.4g}; medians of "
            f"the last two windows {w.old_loss:.4g}, {w.new_loss:.4g}; the clipper cut {w.clipped_share:.0%})",
            lr_power=2,  # a model made worse than untrained is an LR an order of magnitude off, not 2x
            target="start",
        )

    def killed_at_start(self, w: WindowPair) -> StabilityFinding | None:
        """After a blow-up, the loss sits at the untrained level and the gradient norm collapsed (dead units)."""
        start = w.start_loss
        if not (
            min(w.old_loss, w.new_loss) >= self.stuck_margin * start > 0
            and w.new_loss >= 0.99 * w.old_loss
            and w.new_norm * self.collapse < w.start_norm
            and w.peak > self.blowup * start
        ):
            return None
        return StabilityFinding(
            "killed_at_start",
            {
                "start_loss": start,
                "old_loss": w.old_loss,
                "new_loss": w.new_loss,
                "start_norm": w.start_norm,
                "new_norm": w.new_norm,
                "peak": w.peak,
            },
            _PREFIX + f"after {w.steps} steps the loss has not moved from the untrained model's ({start:.4g}; medians "
            f"{w.old_loss:.4g}, {w.new_loss:.4g}) and the gradient norm collapsed ({w.start_norm:.4g} -> median "
            f"{w.new_norm:.4g}): units killed in the first steps",
            lr_power=2,
            target="start",
        )

    def sustained_clipping(self, w: WindowPair) -> StabilityFinding | None:
        """The clipper cut ``clip_fraction`` of the newer window while the loss, above ``start_margin`` x the first
        loss, stopped falling."""
        if not (
            w.clipped_share >= self.clip_fraction and w.not_improving and w.new_loss > self.start_margin * w.start_loss
        ):
            return None
        return StabilityFinding(
            "sustained_clipping",
            {"clipped_share": w.clipped_share, "old_loss": w.old_loss, "new_loss": w.new_loss},
            _PREFIX + f"the clipper cut {w.clipped_share:.0%} of the last {w.window} steps and the loss stopped "
            f"falling (median {w.old_loss:.4g} -> {w.new_loss:.4g})",
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        last = self.last_finding
        return {
            "rows": [list(r) for r in self._rows],
            "count": self._count,
            "interventions": self.interventions,
            "start": self._start,
            "start_norm": self._start_norm,
            "peak": self._peak if math.isfinite(self._peak) else None,
            "best": self._best if math.isfinite(self._best) else None,
            "steps": self._steps,
            "last_fire": self._last_fire,
            "streak": self._streak,
            # the last cut, under the keys older versions wrote and read (informational: no rule reads them)
            "lr_power": last.lr_power if last is not None else 1,
            "worse_than_start": last is not None and last.worse_than_start,
            "damaged": last is not None and last.damaged,
            "last_finding": last.to_dict() if last is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (also one written before findings existed: it has no ``last_finding``, and
        its ``lr_power``/``worse_than_start``/``damaged`` described a cut already carried out)."""
        self.reset()
        for row in state.get("rows", []):
            self._rows.append((float(row[0]), float(row[1]), bool(row[2])))
        self._count = int(state.get("count", len(self._rows)))
        self.interventions = int(state.get("interventions", 0))
        start, best, last = state.get("start"), state.get("best"), state.get("last_fire")
        self._start = None if start is None else float(start)
        peak = state.get("peak")
        self._peak = -math.inf if peak is None else float(peak)
        start_norm = state.get("start_norm")
        self._start_norm = None if start_norm is None else float(start_norm)
        self._best = math.inf if best is None else float(best)
        self._steps = int(state.get("steps", self._count))
        self._last_fire = None if last is None else int(last)
        self._streak = int(state.get("streak", 0))
        finding = state.get("last_finding")
        self.last_finding = StabilityFinding.from_dict(finding) if finding else None
