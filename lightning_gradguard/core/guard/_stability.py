"""The stability controller: notice a learning rate that is too high before anything turns non-finite.

Clipping can hide a too-high learning rate for a long time, and a too-high LR in the first steps can leave a network
damaged (saturated or dead units) without a single non-finite number. :class:`StabilityController` keeps the last
two windows of ``window`` healthy steps of one loss stream and summarises them as a :class:`WindowPair` (median,
spread and LR of each window, the share of clipped steps, the run's first loss and norm, the highest loss and when it
came, the largest median of three consecutive losses, the lowest window median and its LR). Eight named rules read that
pair, in this order; the first that fires gives a :class:`StabilityFinding`.

**Evidence before action.** A healthy run can look like a sick one on any single statistic: a curriculum, an annealed
loss weight, a moving RL target or a GAN make the loss climb; fine-tuning starts at a low, noisy loss; a threshold
that lags a norm growing as the model learns clips most steps. So each rule *acts* (the guard cuts the LR, maybe
from an earlier state) only when independent signals agree, and otherwise *warns* (an event, no change to the run):

1. ``norm_rising`` (warns): the newer window's median norm is above ``norm_growth`` x the older one's while the loss
   is not improving and is not in the band near zero (above ``floor`` x the first loss); a new task or a loss weight
   that grows does that too. An older window whose median norm is zero (a masked start) is no reference. Near zero a
   converged run's norm often grows while its loss barely moves (Adam on a nearly fitted training set; a late rise
   of the gradient norm in healthy runs is also documented for weight decay with normalisation layers: Defazio,
   "Why Gradients Rapidly Increase Near the End of Training", arXiv 2506.02285, 2025).
2. ``loss_climbing``: the newer window's median loss is above the older one's by ``loss_growth - 1`` times the loss
   scale (``max(|median|, spread, floor x |first loss|)``: losses near zero or negative keep a scale);
3. ``loss_above_best``: the same against the lowest window median seen (a slow climb over several windows), where
   the unit is also half of what the run learned (first loss minus best) when that is less, never below the best
   window's spread: a loss with a high floor (a language model's cross-entropy) cannot double. For both
   climbing rules the older window must already be above that best (a climb spans windows). They **act** only when
   the learning rate itself grew by ``lr_growth`` x since the best window (a warm-up or ramp pushed the model past
   its stable LR: the LR is demonstrably what changed); at a constant or falling LR they warn.
4. ``worse_than_untrained``: during the first ``start_windows`` windows, the median loss of both windows is above
   ``start_margin`` x the run's first loss (the untrained model's). It **acts** (restart from the untrained state)
   only after a sustained blow-up in the first updates (steps 1 to ``blowup_steps``): three consecutive losses whose
   median was
   ``blowup_sustained`` x above the first loss, the newer window's median and its batch-to-batch spread (a
   too-high LR wrecked the model in its first updates); else it warns, and only when both medians clear the first
   loss by more than their window's batch-to-batch spread (the first loss is one batch, uncertain by about that).
5. ``killed_at_start``: during the first ``start_windows`` windows, after a blow-up in the first updates (a loss above
   ``blowup`` x the first and above ``blowup`` x the newer window's median) the loss sits at the untrained level
   (``stuck_margin``), not improving, while the median gradient norm collapsed ``collapse`` x below the first norm
   (units killed by the violent first updates: the model sits at chance). It **acts** (restart).
6. ``never_learned``: after a blow-up in the first updates (the run's highest loss, in its first ``blowup_steps``
   steps, ``blowup_sustained`` x above today's level), a start period (``start_windows - 1`` windows since the run
   began or since the last acting finding) in which no window median came below ``stuck_margin`` x the first loss
   by more than the batch-to-batch spread (the first loss is one batch, uncertain by about that):
   the run has not learned since its LR wrecked it. It **acts** (restart). Without the blow-up, not learning is no
   finding (fine-tuning barely moves its loss; a GAN's losses do not fall).
7. ``dead_network`` (warns): the loss is flat (both windows' medians within their spread, the spread under
   ``flat`` of the level) and not far below where the run started (less than ``dead_collapse`` x), with the median
   gradient norm below the early gradient level (the largest median of three consecutive norms in the run's first
   window): the output no longer depends on the input (a classifier at chance has the same loss on every batch). A
   deep network sitting on a plateau at chance before it learns shows those signs too, so the rule also needs a
   confirmation or a cause. The confirmation: most of the model's gradient tensors vanished (the median over recent
   steps of the share of tensors whose gradient norm is at most float32's epsilon x the step's largest one is at
   least ``dead_share``: dead ReLUs pass exactly zero upstream). The cause: the run's highest loss came in its first
   ``blowup_steps`` steps, ``blowup`` x above today's level (an exploding initialisation or a violent first update),
   and the gradient norm collapsed ``dead_collapse`` x below the early level. The share is measured only while the
   signs hold (:attr:`StabilityController.wants_vanished`), so a healthy run pays nothing for it. A second proof
   needs no flat loss: most gradient tensors vanished at *every* one of the last ``window`` steps (per tensor, not a
   share per step: a multi-head model whose heads take turns has many zero gradients at each step, but none for a
   whole window), with the loss not moving, not far below the start, and the norm below its early level. A dead network
   whose output bias still learns at a high LR has a loss that moves with the bias; it is still dead. Never silent:
   a run that died says so.
8. ``sustained_clipping`` (warns): at least ``clip_fraction`` of the newer window's steps were clipped, its median
   loss is not below the older window's and above ``start_margin`` x the first loss.

An acting finding must be found at ``confirm`` judgements in a row (judged every ``window/5`` steps) before it is
returned: repeated evidence. A finding names its rule, the numbers it used (``evidence``), a plain-words ``reason``,
whether it acts (``act``), the exponent of the cut (``lr_power``: the guard lowers the LR by ``lr_factor **
lr_power``) and where the cut should go (``target``: ``"start"``, ``"before_climb"`` or ``"in_place"``). After an
acting finding the controller starts over (two fresh windows are needed before it can fire again); a cut that
follows the previous one within ``repeat_windows`` windows doubles ``lr_power``. A warning does not reset the
windows; the same rule warns again only after ``repeat_windows`` windows. Host floats only: the guard reads the loss,
the norm and the clip flags once per step anyway. No input makes it raise.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

#: where a stability cut should go: the untrained state, the newest trusted state before the climb, or nowhere
StabilityTarget = Literal["start", "before_climb", "in_place"]

_PREFIX = "learning rate looks too high: "  # findings whose evidence points at the LR (acting ones)
_UNSTABLE = "the run looks unstable: "  # warnings with nothing that shows the LR is at fault (cause "instability")


def _median(values: tuple[float, ...] | list[float]) -> float:
    """``statistics.median`` of a non-empty tuple (the same arithmetic, without its checks and conversions)."""
    data = sorted(values)
    i = len(data) // 2
    return data[i] if len(data) % 2 else (data[i - 1] + data[i]) / 2


#: the median absolute deviation of normal noise times this is its mean absolute deviation (sqrt(2/pi) / 0.6745)
_MAD_TO_MEAN_DEV = math.sqrt(2.0 / math.pi) / 0.6744897501960817


def _spread(values: tuple[float, ...], center: float) -> float:
    """The batch-to-batch spread of a window's losses around its median ``center``: the median absolute deviation,
    in the units of the mean absolute deviation (the same number on normal noise). A robust measure: a spike of a
    few batches inside a window is an anomaly, not the window's noise, and must not become the scale every later
    climb is measured in (an LR spike whose first steps fell into the best window, its median still the lowest,
    gave that window a spread of 52 around a median of 0.48: the loss then climbed 0.48 -> 4.1 and the network sat
    dead at chance with no event). Where more than half the losses equal the median (a loss that is 0 on most
    batches) the median deviation is 0 and the mean absolute deviation is used."""
    if not values:
        return 0.0
    deviations = sorted(abs(v - center) for v in values)
    n = len(deviations)
    i = n // 2
    mad = deviations[i] if n % 2 else (deviations[i - 1] + deviations[i]) / 2
    if mad > 0:
        return mad * _MAD_TO_MEAN_DEV
    return sum(deviations) / n


def _finite(x: float) -> bool:
    return x - x == 0.0


def _rank_z(lower: tuple[float, ...], upper: tuple[float, ...]) -> float:
    """How far ``upper``'s values sit above ``lower``'s, as the z-score of the Mann-Whitney U statistic (the count of
    pairs where the value of ``upper`` is the larger, ties counting half; normal approximation without the tie
    correction): about 0 for two samples of one distribution, +6 for 25 values all above 25 others. NaN when either
    is empty. A rank test, so a single spike counts as one value and a bimodal loss (mixup) whose median jumps
    between its modes from one window to the next is no shift."""
    n1, n2 = len(lower), len(upper)
    if not n1 or not n2:
        return math.nan
    ranked = sorted(lower)
    u = 0.0
    for v in upper:
        below = bisect_left(ranked, v)
        u += below + 0.5 * (bisect_right(ranked, v) - below)
    mean = n1 * n2 / 2.0
    sd = math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0)
    return (u - mean) / sd


def _separated_z(n1: int, n2: int) -> float:
    """The largest :func:`_rank_z` two samples of these sizes can give: every value of one above every value of the
    other (25 and 25: 6.06; 4 and 4: 2.31)."""
    return n1 * n2 / 2.0 / math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0) if n1 and n2 else math.nan


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
        old_spread, new_spread: the batch-to-batch spread of each window's losses around its median (a robust one:
            :func:`_spread`).
        best_spread: the spread of the window whose median is :attr:`best`.
        old_lr, new_lr, best_lr: the median LR of each window and of the best window (0.0: unknown).
        peak_lr: the highest LR any step of the two windows used (0.0: unknown): a spike of a few steps (a scheduler
            bug, an LR set by hand) leaves the medians where they were.
        safe_lr: the highest LR any step used before the best window, or the best window's median LR if higher (0.0:
            unknown): the run reached its best after training at it, so an LR up to it is known to be survivable (a
            warm restart or a cyclic schedule that brings the LR back to its earlier peak has not pushed the run
            anywhere new). The best window's own later steps do not count: a spike that begins inside it has not
            shown its effect on the window's losses yet.
        peak_step: the healthy step (1-based) at which :attr:`peak` came.
        sustained_peak: the largest median of three consecutive losses seen in the run's first ``blowup_steps``
            steps.
        early_norm: the early gradient level: the largest median of three consecutive norms in the run's first
            window (0.0 while unknown).
        early_loss: the newer window's median loss at the run's first judgement (NaN before it): the level the run
            reached in its first windows (a blow-up at the start explains a death only if the loss never came
            clearly below it).
        vanished: the median share of gradient tensors whose gradient vanished, over the steps measured since the
            dead-network rule's other signs first held (NaN: not measured, or too few steps).
        still: the share of gradient tensors whose gradient vanished at *every* one of the last ``window`` steps
            or more (NaN: no per-tensor mask given): layers that have not been trained at all for that long.
        since_action: the healthy steps since the last acting finding, or since the run began when there was none
            (-1: unknown).
        climb_z, best_z: how far the newer window's losses sit above the older window's / the best window's, as a
            rank-test z-score (:func:`_rank_z`; NaN: unknown, e.g. a state saved before the best window's losses were
            kept).
        norm_z: how far the newer window's gradient norms sit above the older window's (:func:`_rank_z`; NaN:
            unknown).
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
    old_spread: float = 0.0
    new_spread: float = 0.0
    best_spread: float = 0.0
    old_lr: float = 0.0
    new_lr: float = 0.0
    best_lr: float = 0.0
    safe_lr: float = 0.0
    peak_lr: float = 0.0
    peak_step: int = 0
    sustained_peak: float = -math.inf
    early_norm: float = 0.0
    early_loss: float = math.nan
    vanished: float = math.nan
    still: float = math.nan
    since_action: int = -1
    climb_z: float = math.nan
    best_z: float = math.nan
    norm_z: float = math.nan

    @property
    def not_improving(self) -> bool:
        """The newer window's median loss is not below the older one's."""
        return self.new_loss >= self.old_loss


@dataclass(frozen=True)
class StabilityFinding:
    """Why the stability controller says the LR should come down (or warns that it may be too high), and how.

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
        act: whether the evidence is strong enough to act on; False: a warning (the guard records it and changes
            nothing).
        tested_only: the evidence is enough to act on only once the guard tested the claim on the batches and it
            held; untested or refuted, the finding is dropped, with no event (the weaker evidence did not warrant a
            warning).
    """

    rule: str
    evidence: dict[str, float] = field(hash=False, compare=True)
    reason: str
    lr_power: int = 1
    target: StabilityTarget = "in_place"
    act: bool = True
    tested_only: bool = False

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
            "act": self.act,
            "tested_only": self.tested_only,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StabilityFinding:
        return cls(
            rule=str(state["rule"]),
            evidence={str(k): v for k, v in dict(state.get("evidence") or {}).items()},
            reason=str(state.get("reason", "")),
            lr_power=int(state.get("lr_power", 1)),
            target=state.get("target", "in_place"),
            act=bool(state.get("act", True)),
            tested_only=bool(state.get("tested_only", False)),
        )


def _g(x: float) -> str:
    return f"{x:.4g}"


class StabilityController:
    """Says when the LR should come down, and by how much (see the module docstring).

    Args:
        window: steps per window (two windows are compared).
        clip_fraction: share of clipped steps in a window that counts as sustained clipping.
        norm_growth: growth of the median gradient norm between windows that counts as rising.
        loss_growth: growth of the median loss, in units of the loss scale, that counts as climbing.
        floor: the loss scale is at least this fraction of the run's first loss (noise around a loss near zero is
            not a climb).
        start_margin: two windows in a row with a median loss above this multiple of the run's first loss: the
            model is worse than untrained.
        stuck_margin, collapse: the killed-at-start rule (see the module docstring).
        blowup: a loss above this multiple of the first (and of the newer window's median) in the first window is a
            blow-up (the killed-at-start rule).
        blowup_sustained: the median of three consecutive losses above this multiple of the first loss (and of the
            newer window's median) is a sustained blow-up (the worse-than-untrained rule acts only after one).
        rising: a climbing loss must already be above its best window median in the older window by this multiple
            of the scale, minus one.
        repeat_windows: a cut within this many windows of the previous one doubles the exponent of the cut; a rule
            warns again only after this many windows.
        lr_growth: the climbing rules act only when the LR grew by this factor since the best window.
        start_windows: the start rules (4 and 5) judge only the first this many windows of the run.
        confirm: judgements in a row an acting finding must be found at.
        blowup_steps: the start rules' blow-up must come in the run's first this many steps (the first updates).
        flat, dead_collapse, dead_share: the dead-network rule (see the module docstring).
        significance: a climb counts only when the newer window's losses sit this many standard deviations above
            those of the window it climbed from (the older window; for ``loss_above_best``, the best window), by a
            rank test (``3``: about 1 in 700 for two windows of one distribution).

    Attributes:
        wants_vanished: whether the next steps should come with the share of vanished gradient tensors (the
            ``vanished`` argument of :meth:`update`): during the run's first window (which tensors' gradients flow
            at all), and while the dead-network rule's other signs held at the last judgement.
        interventions: the acting findings returned so far.
        warnings: the warnings returned so far.
        last_finding: the last acting finding returned (None: none yet).

    Example:
        >>> ctl = StabilityController(window=4, confirm=1)
        >>> [ctl.update(1.0, 1.0, clipped=False, lr=0.1) for _ in range(8)][-1] is None
        True
        >>> findings = [ctl.update(1.0 * 1.5**i, 1.0, clipped=False, lr=0.1 * 1.5**i) for i in range(12)]
        >>> [(f.rule, f.target, f.act) for f in findings if f][0]
        ('loss_climbing', 'before_climb', True)
    """

    #: the rules, in the order they are evaluated (method names; the first that fires wins)
    RULES: ClassVar[tuple[str, ...]] = (
        "dead_after_learning",
        "norm_rising",
        "loss_climbing",
        "loss_above_best",
        "worse_than_untrained",
        "killed_at_start",
        "never_learned",
        "dead_network",
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
        blowup_sustained: float = 10.0,
        lr_growth: float = 2.0,
        start_windows: int = 8,
        confirm: int = 2,
        blowup_steps: int = 5,
        flat: float = 0.01,
        dead_collapse: float = 10.0,
        dead_share: float = 0.5,
        significance: float = 3.0,
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
        self.blowup_sustained = float(blowup_sustained)
        self.lr_growth = float(lr_growth)
        self.start_windows = int(start_windows)
        self.confirm = max(1, int(confirm))
        self.blowup_steps = int(blowup_steps)
        self.flat = float(flat)
        self.dead_collapse = float(dead_collapse)
        self.dead_share = float(dead_share)
        self.significance = float(significance)
        self.interventions = 0
        self.warnings = 0
        self.last_finding: StabilityFinding | None = None
        self._start: float | None = None  # the first loss seen (the untrained model's)
        self._start_norm: float | None = None  # the first gradient norm seen
        self._peak = -math.inf  # the highest loss seen
        self._peak_step = 0
        self._sustained = -math.inf  # the largest median of three consecutive losses (start windows)
        self._early: list[float] = []  # the gradient norms of the run's first window
        self._early_norm = 0.0
        self._early_loss = math.nan  # the newer window's median at the run's first judgement
        self._best = math.inf  # the lowest window median seen
        self._best_spread = 0.0
        self._best_lr = 0.0
        self._best_losses: tuple[float, ...] = ()  # the losses of the best window (the rank test of a slow climb)
        self._lr_top = 0.0  # the highest LR of a healthy step older than the newest window
        self._safe_lr = 0.0  # _lr_top (or the best window's median LR) when the best window was found
        self._steps = 0  # healthy steps seen
        self._last_fire: int | None = None
        self._streak = 0
        self._pending: str | None = None  # the acting rule found at the last judgement
        self._pending_count = 0
        self._warned: dict[str, int] = {}  # rule -> healthy step of its last warning
        self._rules: tuple[Callable[[WindowPair], StabilityFinding | None], ...] = tuple(
            getattr(self, name) for name in self.RULES
        )
        self._alive: list[bool] | None = None  # per gradient tensor: its gradient flowed at some step of the 1st window
        # a climb whose "the LR grew" claim the guard refuted on the batches: (best window median, the climb's LR,
        # healthy step); the same claim, with nothing new, only warns after that
        self._refuted: tuple[float, float, int] | None = None
        #: whether the guard can test a climb's claim on the batches (one optimizer, reruns on, not sharded); the
        #: guard sets it before each judgement. Without it no ``tested_only`` finding is made.
        self.testable = True
        self.reset()

    def reset(self) -> None:
        """Start over: two fresh windows before the next judgement (the start loss and best median are kept)."""
        self._rows: deque[tuple[float, float, bool, float]] = deque(maxlen=2 * self.window)
        self._vanished: deque[float] = deque(maxlen=self.window)  # measured while the dead signs hold
        self._still: list[int] | None = None  # per tensor: the measured steps in a row its gradient vanished
        self._wants_dead = False  # the dead-network signs held at the last judgement
        self.wants_vanished = self._steps < self.window  # the first window's masks find the tensors that live
        self._count = 0
        self._every = max(1, self.window // 5)
        self._pending, self._pending_count = None, 0

    def forget_undone(self) -> None:
        """A rollback or an LR cut: the LRs of the steps since the best window are no longer known to be survivable
        (the steps were undone, or their climb is why the LR came down): only the LRs known at the best window count
        as ones the run trained at (:attr:`WindowPair.safe_lr`). Otherwise an LR bug rolled back with its LR held
        would come back as "an LR the run trained at" once the hold is lifted, and its second climb would only warn."""
        self._lr_top = min(self._lr_top, self._safe_lr)

    def forget_run(self) -> None:
        """A restart from the untrained state: everything learned about the run goes (first loss and norm, peak,
        best window, safe LR, early level, steps); the counters of findings and the warnings' spacing stay, and the
        restart counts as the last acting finding (a second one soon after is a repeat: its cut doubles)."""
        self._start = self._start_norm = None
        self._peak, self._peak_step, self._sustained = -math.inf, 0, -math.inf
        self._early, self._early_norm = [], 0.0
        self._early_loss = math.nan
        self._best, self._best_spread, self._best_lr = math.inf, 0.0, 0.0
        self._best_losses = ()
        self._lr_top = self._safe_lr = 0.0
        self._alive = None
        self._refuted = None
        self._steps = 0
        self._last_fire = 0
        self._warned = {}
        self.reset()

    @property
    def start_steps(self) -> int:
        """Healthy steps during which the start rules judge."""
        return self.start_windows * self.window

    def update(
        self,
        loss: float,
        grad_norm: float,
        clipped: bool,
        lr: float | None = None,
        vanished: float | Sequence[bool] | None = None,
    ) -> StabilityFinding | None:
        """Add one healthy step (``lr``: the LR the step used, None when unknown; ``vanished``, given while
        :attr:`wants_vanished`: per gradient tensor whether its gradient vanished, or just the share that did);
        returns the finding that says why the LR should come down (``act``) or may be too high (a warning), or
        None."""
        loss, grad_norm = float(loss), float(grad_norm)
        if not (_finite(loss) and _finite(grad_norm)):
            return None
        if vanished is not None and self.wants_vanished:
            self._add_vanished(vanished)
        lr_v = float(lr) if lr is not None and _finite(float(lr)) else 0.0
        if self._start is None:
            self._start, self._start_norm = abs(loss), grad_norm
        self._steps += 1
        self.wants_vanished = self._wants_dead or self._steps < self.window  # (the birth window ends here)
        if loss > self._peak:  # (max() without the call)
            self._peak, self._peak_step = loss, self._steps
        self._rows.append((loss, grad_norm, bool(clipped), lr_v))
        if len(self._rows) > self.window:  # the step leaving the newest window: its LR has shown its effect
            settled = self._rows[-self.window - 1][3]
            if settled > self._lr_top:
                self._lr_top = settled
        self._count += 1
        early = self._early
        if len(early) < self.window:
            early.append(grad_norm)
            if len(early) >= 3:  # the early gradient level: the largest median of three consecutive norms
                a, b, c = early[-3], early[-2], early[-1]
                mid = a + b + c - max(a, b, c) - min(a, b, c)
                if mid > self._early_norm:
                    self._early_norm = mid
        if self._steps <= self.blowup_steps and len(self._rows) >= 3:  # the first updates' blow-up
            a, b, c = self._rows[-3][0], self._rows[-2][0], self._rows[-1][0]
            mid = a + b + c - max(a, b, c) - min(a, b, c)  # the median of three
            if mid > self._sustained:
                self._sustained = mid
        if len(self._rows) < 2 * self.window or self._count % self._every:
            return None  # judged every window/5 steps: the medians move slowly, and sorting costs
        if math.isnan(self._early_loss):  # the run's first judgement: the level its first windows reached
            self._early_loss = _median([row[0] for row in list(self._rows)[self.window :]])
        pair = self._pair()
        if pair.new_loss < self._best:
            self._best, self._best_spread, self._best_lr = pair.new_loss, pair.new_spread, pair.new_lr
            self._best_losses = tuple(row[0] for row in list(self._rows)[self.window :])
            self._safe_lr = max(self._lr_top, pair.new_lr)
        finding = self.assess(pair)
        self._wants_dead = self._dead_signs(pair, flat=False) or self._dead_signs(pair, start=False)
        self.wants_vanished = self._wants_dead or self._steps < self.window
        if not self._wants_dead:
            self._vanished.clear()
            self._still = None
        if finding is None:
            self._pending, self._pending_count = None, 0
            return None
        if not finding.act:
            self._pending, self._pending_count = None, 0
            last = self._warned.get(finding.rule)
            if last is not None and self._steps - last < self.repeat_windows * self.window:
                return None
            self._warned[finding.rule] = self._steps
            self.warnings += 1
            return finding
        self._pending_count = self._pending_count + 1 if self._pending == finding.rule else 1
        self._pending = finding.rule
        if self._pending_count < self.confirm:
            return None  # repeated evidence: the same rule at the next judgement too
        repeated = self._last_fire is not None and self._steps - self._last_fire <= self.repeat_windows * self.window
        self._before_fire = (self._last_fire, self._streak)
        self._streak = self._streak + 1 if repeated else 0
        if repeated:  # cuts in quick succession: 2, 4, 8, ... (the rule's own exponent is for a first cut)
            finding = replace(finding, lr_power=min(2**self._streak, 64))
        self._last_fire = self._steps
        self.interventions += 1
        self.last_finding = finding
        self.reset()
        return finding

    #: the spacing of acting findings before the last one fired (:meth:`withdraw` puts it back)
    _before_fire: tuple[int | None, int] = (None, 0)

    def withdraw(self, warned: bool = True) -> None:
        """The guard refuted the acting finding just returned (it tested its claim on the batch itself): it counts
        as a warning, not as an intervention, and the spacing of later cuts is what it was before it. The windows
        start over all the same (the same evidence is not judged again at once). A refuted climb stays refuted until
        something new happens: a new best window, or an LR above the climb's (:meth:`_tested`)."""
        self._last_fire, self._streak = self._before_fire
        self.interventions = max(0, self.interventions - 1)
        last = self.last_finding
        if warned:  # (False: a ``tested_only`` finding that did not stand is dropped, no warning)
            self.warnings += 1
        if last is not None:
            if warned:
                self._warned[last.rule] = self._steps
            if last.rule in ("loss_climbing", "loss_above_best") and _finite(self._best):
                ev = last.evidence
                lr = max(float(ev.get("lr", 0.0) or 0.0), float(ev.get("peak_lr", 0.0) or 0.0))
                self._refuted = (self._best, lr, self._steps)

    def correct_start(self, untrained: Sequence[float]) -> None:
        """More measurements of the untrained model's loss (the guard reran the untrained state on later batches):
        the start level becomes the mean of the first loss and these. The first loss is one batch; the rules that
        compare with "the untrained model's loss" then compare with several."""
        values = [abs(float(v)) for v in untrained if _finite(float(v))]
        if self._start is None or not values:
            return
        self._start = (self._start + sum(values)) / (1 + len(values))

    def _add_vanished(self, vanished: float | Sequence[bool]) -> None:
        """One step's vanished gradients: a share joins the shares; a per-tensor mask also counts, per tensor, the
        measured steps in a row its gradient vanished (a mask of another length, another set of parameters, starts
        the counts again).

        Units die after they lived: during the run's first window (its birth) the masks record which tensors' gradients
        flow at all, and later masks count only those. A tensor that got no gradient at any step of the first window
        is cut off by design (a ``sign()`` without a straight-through estimator, a detached branch, a head used later),
        not dead; left in, it made a network that still learns look dead."""
        if isinstance(vanished, (int, float)):
            share = float(vanished)
            if self._wants_dead and 0.0 <= share <= 1.0:
                self._vanished.append(share)
            return
        mask = [bool(v) for v in vanished]
        if not mask:
            return
        if self._steps <= self.window and not all(mask):  # (an all-zero step, a masked batch, says nothing)
            alive = self._alive if self._alive is not None and len(self._alive) == len(mask) else [False] * len(mask)
            self._alive = [a or not v for a, v in zip(alive, mask)]
        if not self._wants_dead:
            return
        if self._alive is not None and len(self._alive) == len(mask) and any(self._alive):
            mask = [v for v, a in zip(mask, self._alive) if a]
        self._vanished.append(sum(mask) / len(mask))
        still = self._still
        if still is None or len(still) != len(mask):
            still = [0] * len(mask)
        self._still = [n + 1 if v else 0 for n, v in zip(still, mask)]

    def _pair(self) -> WindowPair:
        """The two windows in the buffer (full), summarised."""
        w = self.window
        losses, norms, clips, lrs = zip(*self._rows)
        old_loss, new_loss = _median(losses[:w]), _median(losses[w:])
        return WindowPair(
            old_loss=old_loss,
            new_loss=new_loss,
            old_norm=_median(norms[:w]),
            new_norm=_median(norms[w:]),
            clipped_share=sum(clips[w:]) / w,
            start_loss=self._start or 0.0,
            start_norm=self._start_norm if self._start_norm is not None else 0.0,
            peak=self._peak,
            best=self._best,
            steps=self._steps,
            window=self.window,
            old_spread=_spread(losses[:w], old_loss),
            new_spread=_spread(losses[w:], new_loss),
            best_spread=self._best_spread,
            old_lr=_median(lrs[:w]),
            new_lr=_median(lrs[w:]),
            peak_lr=max(lrs),
            best_lr=self._best_lr,
            safe_lr=self._safe_lr,
            peak_step=self._peak_step,
            sustained_peak=self._sustained,
            early_norm=self._early_norm,
            early_loss=self._early_loss,
            vanished=_median(tuple(self._vanished)) if len(self._vanished) >= self._every else math.nan,
            still=sum(n >= self.window for n in self._still) / len(self._still) if self._still else math.nan,
            since_action=self._steps - (self._last_fire or 0),
            climb_z=_rank_z(losses[:w], losses[w:]),
            best_z=_rank_z(self._best_losses, losses[w:]) if self._best_losses else math.nan,
            norm_z=_rank_z(norms[:w], norms[w:]),
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
    def _scale(self, w: WindowPair, center: float, spread: float) -> float:
        """The loss scale around ``center``: never zero for a loss that moved, sensible near zero and below it."""
        return max(abs(center), spread, self.floor * w.start_loss)

    def _shifted(self, z: float, n_from: int) -> bool:
        """The rank test of a climb passes: ``z`` (NaN: unknown, then the medians alone decide) reaches
        ``significance``, or, for windows too small to reach it (under 7 steps), every loss of the newer window
        sits above every loss of the window it climbed from."""
        if math.isnan(z):  # unknown
            return True
        return z >= min(self.significance, _separated_z(n_from, self.window) - 1e-9)

    def _lr_grew(self, w: WindowPair) -> bool:
        """The LR is what changed: it grew ``lr_growth`` x since the best window, to a level the run never trained
        at before reaching its best (a warm restart or a cyclic schedule returning to its earlier peak is no
        evidence: the run survived that LR), and the loss is not already coming down by itself (the newer window
        clearly below the older)."""
        lr = self._climb_lr(w)
        grew = w.best_lr > 0 and lr >= self.lr_growth * w.best_lr
        return grew and lr > w.safe_lr and not self._recovering(w) and not self._tested(w)

    @staticmethod
    def _spike_over(w: WindowPair) -> bool:
        """The LR that threw the run off was a spike that has passed: the newer window's median LR is back at or below
        the best window's. The damage is the state's; the LR now is one the run trained well at, so a rollback
        need not cut it (an LR set x100 for 20 steps, rolled back with the LR halved as well, ended 5-13 % below the
        healthy run)."""
        return 0.0 < w.new_lr <= w.best_lr

    def _tested(self, w: WindowPair) -> bool:
        """The same claim was already tested on the batches and refuted: a climb from the same best window at an
        LR no higher than then. Nothing new has happened since, so testing it again at every later window only
        gives the noise more draws (a time-ordered stream whose label noise grows while Adam warms up: refuted at
        its first climb against the state from before it, then tested against ever newer states from inside the
        climb, until one pair of noisy batches favoured one of them: a rollback on a healthy run). A new best
        window, or an LR above the refuted climb's, is a new claim."""
        refuted = self._refuted
        return refuted is not None and w.best == refuted[0] and self._climb_lr(w) <= refuted[1]

    @staticmethod
    def _climb_lr(w: WindowPair) -> float:
        """The LR the climb's steps used: the newer window's median, or the highest LR of the two windows when that
        is higher (a spike of a few steps that threw the run off, which the medians do not see)."""
        return max(w.new_lr, w.peak_lr)

    @staticmethod
    def _recovering(w: WindowPair) -> bool:
        """The newer window's median is clearly below the older one's (by more than their spread)."""
        return w.new_loss < w.old_loss - max(w.old_spread, w.new_spread)

    def _best_unit(self, w: WindowPair) -> float:
        """The smaller unit of a climb from the best window: the loss scale around the best median, or, where the
        run learned, half of what it learned (the first loss minus the best) when that is smaller, never below the
        best window's batch-to-batch spread. A loss with a high floor cannot double: a language model's
        cross-entropy at its best of 2.3 nats, against 4.5 untrained, went to 3.9 after an LR spike (most of what it
        learned lost, far beyond its noise) and no rule fired; it ended at 3.0 against 2.2 unguarded by the spike.
        Weaker evidence than a doubling where the run learned little (a GAN's discriminator back at log 4, where it
        started, after a lucky best window; a policy-gradient loss near 0): :meth:`loss_above_best` acts on it only
        when the LR grew, and only once the guard tested it on the batches (``tested_only``)."""
        scale = self._scale(w, w.best, w.best_spread)
        learned = w.start_loss - w.best
        if learned > 0:
            scale = min(scale, max(0.5 * learned, w.best_spread))
        return scale

    def _climbing(self, w: WindowPair, unit: float | None = None) -> bool:
        """Already rising in the older window (above its best by ``rising - 1`` scales, or ``unit``s) and above the
        floor."""
        if not w.best < math.inf:
            return False
        scale = self._scale(w, w.best, w.best_spread) if unit is None else unit
        return scale > 0 and w.old_loss > w.best + (self.rising - 1.0) * scale

    def _lr_note(self, w: WindowPair, act: bool) -> str:
        lr = self._climb_lr(w)
        if act:
            growth = lr / w.best_lr
            if w.new_lr < self.lr_growth * w.best_lr:  # a spike the median does not show: said as one
                kept = (
                    ": it is back at or below the best window's, so the state goes back and the LR is kept"
                    if self._spike_over(w)
                    else ""
                )
                return (
                    f"; the learning rate peaked at {growth:.3g}x the best window's within the last {2 * w.window} "
                    f"steps ({_g(w.best_lr)} -> {_g(lr)}; median now {_g(w.new_lr)}){kept}"
                )
            return f"; the learning rate grew {growth:.3g}x since the best window ({_g(w.best_lr)} -> {_g(w.new_lr)})"
        if not (w.best_lr > 0 and lr >= self.lr_growth * w.best_lr):
            why = "the learning rate did not grow (a harder task or a changing objective looks the same)"
        elif self._tested(w) and self._refuted is not None:
            why = (
                f"the learning rate grew since the best window ({_g(w.best_lr)} -> {_g(lr)}), but the same climb was "
                f"tested on the batches {self._steps - self._refuted[2]} steps ago and the earlier state did no "
                "better; the LR has not grown since"
            )
        else:  # (a climb that is coming down by itself is no finding at all: loss_above_best)
            why = (
                f"the learning rate grew since the best window ({_g(w.best_lr)} -> {_g(lr)}) but not past "
                f"{_g(w.safe_lr)}, which the run trained at before its best (a warm restart or a cyclic schedule)"
            )
        return f"; {why}: warning only"

    def norm_rising(self, w: WindowPair) -> StabilityFinding | None:
        """The median gradient norm grew ``norm_growth`` x between the windows, and the newer window's norms sit
        above the older window's as a whole (the rank test of the climbing rules, :meth:`_shifted`), while the loss,
        above ``floor`` x the first loss, did not improve (a warning: a new task or a growing loss weight does the
        same). Without the rank test, two tasks whose batches alternate with norms ~50x apart warned every few
        windows: a window of 25 steps holds 13 batches of one task and 12 of the other, so its median norm flips
        between the tasks' levels from one window to the next."""
        if not (
            w.old_norm > 0  # a window of zero gradients (a masked start) is no reference
            and w.new_norm > self.norm_growth * w.old_norm
            and w.not_improving
            and w.new_loss > self.floor * w.start_loss
            and self._shifted(w.norm_z, self.window)
        ):
            return None
        return StabilityFinding(
            "norm_rising",
            {"old_norm": w.old_norm, "new_norm": w.new_norm, "old_loss": w.old_loss, "new_loss": w.new_loss},
            _UNSTABLE + f"the gradient norm keeps rising (median {_g(w.old_norm)} -> {_g(w.new_norm)} over "
            f"{w.window} steps) while the loss does not improve (warning only)",
            act=False,
        )

    def dead_after_learning(self, w: WindowPair) -> StabilityFinding | None:
        """A network that learned, then died: the loss climbed from its best window (by ``loss_growth - 1`` scales,
        the rank test passing, as :meth:`loss_above_best`) to a level where it stopped moving, while most gradient
        tensors vanished (the dead-network proofs of :meth:`dead_network`: the median share of vanished tensors
        with a flat loss, or the tensors vanished at every step of a window). Dead units pass no gradient, so the run
        cannot learn its way back; a state from before the death could. It **acts** (back to the newest kept trusted
        state that the guard found, on the batches themselves, to do clearly better than the model now; the LR kept:
        nothing says the LR killed it, e.g. weights zeroed in place; a second death soon after is a repeat, and its
        cut follows the usual doubling); where no kept state does better, or nothing could be rerun, it warns. A
        death that a blow-up in the start windows caused is the start rules' and :meth:`dead_network`'s (a
        restart)."""
        proof = (w.vanished >= self.dead_share and self._dead_signs(w, start=False)) or (
            w.still >= self.dead_share and self._dead_signs(w, flat=False)
        )
        if not proof or self._killed(w) or not _finite(w.best):
            return None
        scale = self._scale(w, w.best, w.best_spread)
        if not (scale > 0 and w.new_loss > w.best + (self.loss_growth - 1.0) * scale):
            return None
        if not self._shifted(w.best_z, self.window):
            return None
        share = w.still if w.still >= self.dead_share else w.vanished
        return StabilityFinding(
            "dead_after_learning",
            {
                "old_loss": w.old_loss,
                "new_loss": w.new_loss,
                "best": w.best,
                "spread": max(w.old_spread, w.new_spread),
                "early_norm": w.early_norm,
                "new_norm": w.new_norm,
                "vanished_share": share,
                "rank_z": w.best_z,
            },
            f"the network died after learning: the loss climbed from its best (window median {_g(w.best)} -> "
            f"{_g(w.old_loss)} -> {_g(w.new_loss)}) and stopped moving, the gradient vanished in {share:.0%} of the "
            f"parameter tensors (norm {_g(w.new_norm)}, early level {_g(w.early_norm)}): dead units cannot learn "
            "their way back; back to the newest kept state that does better, LR kept",
            lr_power=0,
            target="before_climb",
        )

    def loss_climbing(self, w: WindowPair) -> StabilityFinding | None:
        """A climbing loss: the newer window's median is ``loss_growth - 1`` scales above the older one's."""
        if not self._climbing(w):
            return None
        scale = self._scale(w, w.old_loss, w.old_spread)
        if not (scale > 0 and w.new_loss > w.old_loss + (self.loss_growth - 1.0) * scale):
            return None
        if not self._shifted(w.climb_z, self.window):
            return None  # the windows' losses overlap: their medians moved with the noise (a bimodal loss)
        act = self._lr_grew(w)
        return StabilityFinding(
            "loss_climbing",
            {
                "old_loss": w.old_loss,
                "new_loss": w.new_loss,
                "best": w.best,
                "best_lr": w.best_lr,
                "lr": w.new_lr,
                "peak_lr": w.peak_lr,
                "rank_z": w.climb_z,
            },
            (_PREFIX if act else _UNSTABLE)
            + f"the loss keeps climbing (median {_g(w.old_loss)} -> {_g(w.new_loss)} over {w.window} steps, "
            f"best window {_g(w.best)})" + self._lr_note(w, act),
            lr_power=0 if act and self._spike_over(w) else 1,
            target="before_climb",
            act=act,
        )

    def loss_above_best(self, w: WindowPair) -> StabilityFinding | None:
        """A slow climb: the newer window's median is ``loss_growth - 1`` scales above the lowest window median, and
        not clearly below the older one's (a loss coming down from a jump, e.g. after a curriculum's switch, is not
        climbing: said once when it climbed, not again at every window of its descent)."""
        if self._recovering(w):
            return None
        tested_only = partial = False
        if not self._above_best(w, self._scale(w, w.best, w.best_spread)):
            # half of what the run learned: acted on only when the LR grew, and only as tested on the batches
            if self.testable and self._above_best(w, self._best_unit(w)) and self._lr_grew(w):
                tested_only = True
            elif w.best_spread > 0 and self._lr_grew(w) and self._above_best(w, w.best_spread):
                # the LR grew, then the loss left its best window by more than that window's noise, for less than
                # half of what the run learned: never silent (an LR x30 for 20 steps of a character GPT lost a
                # third of what it learned and ended 15-20 % worse with no event), but too little to act on
                partial = True
            else:
                return None
        if not self._shifted(w.best_z, self.window):
            return None  # the newer window's losses overlap the best window's: its median was a lucky draw
        act = self._lr_grew(w) and not partial
        learned = w.start_loss - w.best
        share = (
            f", {100.0 * (w.new_loss - w.best) / learned:.0f}% of what the run learned (first loss {_g(w.start_loss)})"
            if partial and learned > 0
            else ""
        )
        return StabilityFinding(
            "loss_above_best",
            {
                "old_loss": w.old_loss,
                "new_loss": w.new_loss,
                "best": w.best,
                "best_lr": w.best_lr,
                "lr": w.new_lr,
                "peak_lr": w.peak_lr,
                "rank_z": w.best_z,
            },
            (_PREFIX if act else _UNSTABLE)
            + f"the loss climbed from its best (window median {_g(w.best)} -> {_g(w.old_loss)} -> "
            f"{_g(w.new_loss)})"
            + (f", more than half of what the run learned (first loss {_g(w.start_loss)})" if tested_only else "")
            + share
            + (self._partial_note(w) if partial else self._lr_note(w, act)),
            lr_power=0 if act and self._spike_over(w) else 1,
            target="before_climb",
            act=act,
            tested_only=tested_only,
        )

    def _partial_note(self, w: WindowPair) -> str:
        growth = self._climb_lr(w) / w.best_lr
        return (
            f"; the learning rate peaked at {growth:.3g}x the best window's ({_g(w.best_lr)} -> "
            f"{_g(self._climb_lr(w))}; median now {_g(w.new_lr)}), but a climb of less than half of what the run "
            "learned is not acted on: warning only (check the LR schedule; a rollback to a snapshot from before the "
            "climb would restore the best state)"
        )

    def _above_best(self, w: WindowPair, unit: float) -> bool:
        """Both windows climbed from the best window median: the older by ``rising - 1`` units, the newer by
        ``loss_growth - 1``."""
        return self._climbing(w, unit) and w.new_loss > w.best + (self.loss_growth - 1.0) * unit

    def worse_than_untrained(self, w: WindowPair) -> StabilityFinding | None:
        """During the start windows, both windows' median loss above ``start_margin`` x the run's first loss; acts
        only after a sustained blow-up."""
        start = w.start_loss
        if not (
            w.steps <= self.start_steps
            and start > 0
            and w.old_loss > self.start_margin * start
            and w.new_loss > self.start_margin * start
        ):
            return None
        # far above the first loss, where the run now sits and the batch-to-batch noise (batch size 1: one sample's
        # loss is no level)
        blown = w.sustained_peak > self.blowup_sustained * max(start, w.new_loss, w.new_spread)
        # without a blow-up it can only warn, and only when both windows clear the first loss by more than their
        # batch-to-batch spread: the first loss is one batch, uncertain by about that much (fine-tuning from an easy
        # first batch, batch size 1)
        if not blown and not (w.old_loss > start + w.old_spread and w.new_loss > start + w.new_spread):
            return None
        evidence = {
            "start_loss": start,
            "old_loss": w.old_loss,
            "new_loss": w.new_loss,
            "sustained_peak": w.sustained_peak,
            "clipped_share": w.clipped_share,
        }
        detail = (
            f"after a blow-up (three losses in a row around {_g(w.sustained_peak)}, "
            f"{w.sustained_peak / max(start, w.new_loss):.3g}x the untrained loss)"
            if blown
            else "without a sustained blow-up (warning only)"
        )
        return StabilityFinding(
            "worse_than_untrained",
            evidence,
            (_PREFIX if blown else _UNSTABLE)
            + f"after {w.steps} steps the loss is still above the untrained model's ({_g(start)}; medians of "
            f"the last two windows {_g(w.old_loss)}, {_g(w.new_loss)}) {detail}",
            lr_power=2,  # a model made worse than untrained is an LR an order of magnitude off, not 2x
            target="start",
            act=blown,
        )

    def killed_at_start(self, w: WindowPair) -> StabilityFinding | None:
        """After a blow-up in the first window, the loss sits at the untrained level and the gradient norm
        collapsed (dead units)."""
        start = w.start_loss
        if not (
            w.steps <= self.start_steps
            and min(w.old_loss, w.new_loss) >= self.stuck_margin * start > 0
            and w.new_loss >= 0.99 * w.old_loss
            and w.new_norm * self.collapse < w.start_norm
            and w.peak > self.blowup * max(start, w.new_loss)
            and w.peak_step <= self.blowup_steps
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
                "peak_step": w.peak_step,
            },
            _PREFIX + f"a blow-up at step {w.peak_step} (loss {_g(w.peak)}), then after {w.steps} steps the loss has "
            f"not moved from the untrained model's ({_g(start)}; medians {_g(w.old_loss)}, {_g(w.new_loss)}) and the "
            f"gradient norm collapsed ({_g(w.start_norm)} -> median {_g(w.new_norm)}): units killed in the first steps",
            lr_power=2,
            target="start",
        )

    def never_learned(self, w: WindowPair) -> StabilityFinding | None:
        """A blow-up in the first updates, then a start period (``start_windows - 1`` windows, since the run began
        or since the last acting finding; the guard keeps the untrained state ``start_windows`` windows) in which the
        loss never came clearly below the untrained model's: no window median below ``stuck_margin`` x the first loss.
        The blow-up must be the run's highest loss, in its first ``blowup_steps`` steps and ``blowup_sustained`` x
        above where the loss sits now (a violent first update, not a noisy batch). It **acts** (restart from the
        untrained state, lower LR): a run that has not learned anything since its LR wrecked it in the first steps
        is spending its steps at chance (an LSTM at a 10x too-high Adam LR, bouncing around the mean predictor for
        hundreds of steps). Without that blow-up a run that does not learn is no finding: fine-tuning starts at a
        low loss that barely moves, and a GAN's losses do not fall. The blow-up must be the current attempt's (after
        the last acting finding): an attempt restarted at a lower LR that has not learned yet, with no blow-up of
        its own, is a slow start, not the same lesson (a slow starter was restarted every ~180 steps citing its first
        attempt's blow-up, down to the LR floor). A restarted run killed again is ``killed_at_start``'s: its units
        died the same way, and that rule may cite the first attempt's blow-up."""
        start = w.start_loss
        level = max(abs(w.old_loss), abs(w.new_loss))
        # the first loss is one batch, uncertain by about the batch-to-batch spread of the windows now (where the run
        # sits at the untrained level): "clearly below" it is below stuck_margin x it by more than that spread
        spread = max(w.old_spread, w.new_spread)
        if not (
            start > 0
            and w.since_action >= self.start_steps - self.window
            and min(w.best, w.new_loss) >= self.stuck_margin * start - spread
            and w.peak_step <= self.blowup_steps
            and w.peak > self.blowup_sustained * max(level, start)
            and (self._last_fire is None or w.peak_step > self._last_fire)
        ):
            return None
        return StabilityFinding(
            "never_learned",
            {
                "start_loss": start,
                "best": w.best,
                "new_loss": w.new_loss,
                "peak": w.peak,
                "peak_step": w.peak_step,
                "spread": spread,
                "steps": w.since_action,
            },
            _PREFIX + f"a blow-up at step {w.peak_step} (loss {_g(w.peak)}, {w.peak / max(level, start):.3g}x where "
            f"the loss sits now), then in {w.since_action} steps no window's median loss came clearly below the "
            f"untrained model's (first loss {_g(start)}, batch-to-batch spread {_g(spread)}; best window "
            f"{_g(min(w.best, w.new_loss))}, now {_g(w.new_loss)}): the run has not learned since its first updates",
            lr_power=2,
            target="start",
        )

    def _dead_signs(self, w: WindowPair, flat: bool = True, start: bool = True) -> bool:
        """The signs every dead network shows: a loss that stopped moving (the window medians within their spread),
        not far below the start, and a gradient norm below the early level; with ``flat``, also a flat loss (the
        spread under ``flat`` of the level: the output no longer depends on the input). While the signs without
        ``flat`` hold, the controller asks for the vanished gradients (a dead network whose output bias still learns
        at a high LR has a loss that moves with the bias, not flat). Without ``start``, a flat loss far below the
        first loss counts too: a network whose initialisation exploded starts far above the level it dies at (a
        first loss of 176 where chance is 2.3), so only the vanished gradients can confirm it (never the blow-up)."""
        level = max(abs(w.old_loss), abs(w.new_loss))
        spread = max(w.old_spread, w.new_spread)
        return (
            0 <= w.new_norm < w.early_norm
            and level > 0
            and abs(w.new_loss - w.old_loss) <= spread
            and (not flat or spread <= self.flat * level)
            and (not start or w.new_loss * self.dead_collapse > w.start_loss)
        )

    def _blown_at_start(self, w: WindowPair) -> bool:
        """The run's highest loss came in its first ``blowup_steps`` steps (its initialisation or first updates) and
        was ``blowup`` x above the level the loss sits at now."""
        return w.peak_step <= self.blowup_steps and w.peak > self.blowup * max(abs(w.old_loss), abs(w.new_loss))

    def dead_network(self, w: WindowPair) -> StabilityFinding | None:
        """The dead-network signs (:meth:`_dead_signs`) and a confirmation or a cause: most gradient tensors vanished
        (dead units), or the loss blew up in the first steps (what kills units) and the gradient norm collapsed
        ``dead_collapse`` x below its early level. A warning, with the numbers; it **acts** (restart from the
        untrained state) when both hold: the vanished gradients prove the death and a blow-up in the run's start
        windows caused it (:meth:`_killed`). A dead network cannot learn its way out (its gradients are zero), so the
        restart costs nothing the run still had."""
        vanished = w.vanished >= self.dead_share
        # a blow-up at the start is a cause, not a proof: when every gradient tensor was measured alive (none
        # vanished), nothing is dead (a flow or a large-batch NLL converges to a flat loss from a huge first one). And
        # it explains a death only if the run has not learned since: a loss clearly below the level of the first
        # judged window came down by learning, not by a blow-up (a classifier with label smoothing converged at its
        # floor after 600 steps, its first loss the highest and its norm down 10x, was called dead on 3 of 6 runs a
        # helper wrote)
        blown = (
            self._blown_at_start(w)
            and w.new_norm * self.dead_collapse < w.early_norm
            and w.vanished != 0.0
            and not w.new_loss < w.early_loss - max(w.old_spread, w.new_spread)
        )
        flat = (vanished and self._dead_signs(w, start=False)) or (blown and self._dead_signs(w))
        if not flat:
            if w.still >= self.dead_share and self._dead_signs(w, flat=False):
                return self._untrained_layers(w)
            return None
        killed = vanished and self._killed(w)
        level = max(abs(w.old_loss), abs(w.new_loss))
        spread = max(w.old_spread, w.new_spread)
        evidence = {
            "old_loss": w.old_loss,
            "new_loss": w.new_loss,
            "spread": spread,
            "early_norm": w.early_norm,
            "new_norm": w.new_norm,
            "start_loss": w.start_loss,
            "peak": w.peak,
            "peak_step": w.peak_step,
        }
        signs = []
        if blown:
            signs.append(f"a blow-up at step {w.peak_step} (loss {_g(w.peak)}, {w.peak / level:.3g}x today's level)")
        elif w.peak > self.blowup * level:  # a later blow-up (or an exploding first loss): said, not required
            signs.append(
                f"its highest loss came at step {w.peak_step} ({_g(w.peak)}, {w.peak / level:.3g}x today's level)"
            )
        if _finite(w.vanished):
            evidence["vanished_share"] = w.vanished
            signs.append(f"the gradient vanished in {w.vanished:.0%} of the parameter tensors")
        return StabilityFinding(
            "dead_network",
            evidence,
            f"the network looks dead: the loss is flat at {_g(w.new_loss)} (batch-to-batch spread {_g(spread)}, "
            f"{spread / level:.2%} of it: the output no longer depends on the input), "
            + (
                f"the gradient norm collapsed {w.early_norm / w.new_norm:.3g}x (early level {_g(w.early_norm)}, "
                f"{_g(w.new_norm)} now); "
                if w.new_norm > 0
                else f"the gradient norm collapsed to zero (early level {_g(w.early_norm)}); "
            )
            + "; ".join(signs)
            + self._dead_ending(killed),
            lr_power=2,
            target="start",
            act=killed,
        )

    def _killed(self, w: WindowPair) -> bool:
        """A blow-up caused the death: the run's highest loss came in its start windows, ``blowup`` x above the
        level the loss sits at now."""
        level = max(abs(w.old_loss), abs(w.new_loss))
        return 0 < w.peak_step <= self.start_steps and w.peak > self.blowup * level

    @staticmethod
    def _dead_ending(killed: bool) -> str:
        if killed:
            return "; units killed by that blow-up: restart from the untrained state"
        return "; a too-high LR or a bad initialisation in the first steps can kill units (warning only)"

    def _untrained_layers(self, w: WindowPair) -> StabilityFinding:
        """The dead-network warning from its other proof: most gradient tensors vanished at every step of at least a
        window (those layers have not been trained at all since), while the loss stopped moving. A loss that is not
        flat is no counter-evidence then: what still learns (an output bias) moves it, not the input."""
        evidence = {
            "old_loss": w.old_loss,
            "new_loss": w.new_loss,
            "spread": max(w.old_spread, w.new_spread),
            "early_norm": w.early_norm,
            "new_norm": w.new_norm,
            "start_loss": w.start_loss,
            "still_vanished_share": w.still,
            "vanished_share": w.vanished,
        }
        norm = (
            f"the gradient norm fell to {_g(w.new_norm)} (early level {_g(w.early_norm)})"
            if w.new_norm > 0
            else f"the gradient norm collapsed to zero (early level {_g(w.early_norm)})"
        )
        killed = self._killed(w)
        peak = (
            f"; its highest loss came at step {w.peak_step} ({_g(w.peak)}, {w.peak / max(abs(w.new_loss), 1e-30):.3g}x "
            "today's level)"
            if killed
            else ""
        )
        return StabilityFinding(
            "dead_network",
            evidence,
            f"the network looks dead: the gradient of {w.still:.0%} of the parameter tensors vanished at every one of "
            f"the last {w.window} steps or more (those layers no longer learn) while the loss stopped improving "
            f"(window medians {_g(w.old_loss)} -> {_g(w.new_loss)}, first loss {_g(w.start_loss)}) and {norm}"
            + peak
            + self._dead_ending(killed),
            lr_power=2,
            target="start",
            act=killed,
        )

    def sustained_clipping(self, w: WindowPair) -> StabilityFinding | None:
        """The clipper cut ``clip_fraction`` of the newer window while the loss, above ``start_margin`` x the first
        loss, stopped falling (a warning)."""
        if not (
            w.clipped_share >= self.clip_fraction and w.not_improving and w.new_loss > self.start_margin * w.start_loss
        ):
            return None
        return StabilityFinding(
            "sustained_clipping",
            {"clipped_share": w.clipped_share, "old_loss": w.old_loss, "new_loss": w.new_loss},
            _UNSTABLE + f"the clipper cut {w.clipped_share:.0%} of the last {w.window} steps and the loss stopped "
            f"falling (median {_g(w.old_loss)} -> {_g(w.new_loss)}; warning only)",
            act=False,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        last = self.last_finding

        def num(x: float) -> float | None:
            return x if _finite(x) else None

        return {
            "rows": [list(r) for r in self._rows],
            "count": self._count,
            "interventions": self.interventions,
            "warnings": self.warnings,
            "start": self._start,
            "start_norm": self._start_norm,
            "peak": num(self._peak),
            "peak_step": self._peak_step,
            "sustained": num(self._sustained),
            "early": list(self._early),
            "early_norm": self._early_norm,
            "early_loss": num(self._early_loss),
            "best": num(self._best),
            "best_spread": self._best_spread,
            "best_lr": self._best_lr,
            "best_losses": list(self._best_losses),
            "lr_top": self._lr_top,
            "safe_lr": self._safe_lr,
            "steps": self._steps,
            "last_fire": self._last_fire,
            "streak": self._streak,
            "pending": [self._pending, self._pending_count],
            "warned": dict(self._warned),
            "vanished": list(self._vanished),
            "still": list(self._still) if self._still is not None else None,
            "wants_vanished": self.wants_vanished,
            "wants_dead": self._wants_dead,
            "alive": list(self._alive) if self._alive is not None else None,
            "refuted": list(self._refuted) if self._refuted is not None else None,
            # the last cut, under the keys older versions wrote and read (informational: no rule reads them)
            "lr_power": last.lr_power if last is not None else 1,
            "worse_than_start": last is not None and last.worse_than_start,
            "damaged": last is not None and last.damaged,
            "last_finding": last.to_dict() if last is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (also one written by older versions: rows without an LR, no ``last_finding``)."""
        self.reset()
        for row in state.get("rows", []):
            lr = float(row[3]) if len(row) > 3 else 0.0
            self._rows.append((float(row[0]), float(row[1]), bool(row[2]), lr))
        self._count = int(state.get("count", len(self._rows)))
        self.interventions = int(state.get("interventions", 0))
        self.warnings = int(state.get("warnings", 0))
        start, best, last = state.get("start"), state.get("best"), state.get("last_fire")
        self._start = None if start is None else float(start)
        peak = state.get("peak")
        self._peak = -math.inf if peak is None else float(peak)
        self._peak_step = int(state.get("peak_step", 0))
        sustained = state.get("sustained")
        self._sustained = -math.inf if sustained is None else float(sustained)
        self._early = [float(v) for v in state.get("early", [])][: self.window]
        self._early_norm = float(state.get("early_norm", 0.0))
        early_loss = state.get("early_loss")
        self._early_loss = math.nan if early_loss is None else float(early_loss)
        start_norm = state.get("start_norm")
        self._start_norm = None if start_norm is None else float(start_norm)
        self._best = math.inf if best is None else float(best)
        self._best_spread = float(state.get("best_spread", 0.0))
        self._best_lr = float(state.get("best_lr", 0.0))
        self._best_losses = tuple(float(v) for v in state.get("best_losses") or ())
        self._lr_top = float(state.get("lr_top", 0.0))
        self._safe_lr = float(state.get("safe_lr", 0.0))  # older states: none known (the growth alone decides)
        self._steps = int(state.get("steps", self._count))
        self._last_fire = None if last is None else int(last)
        self._streak = int(state.get("streak", 0))
        pending = list(state.get("pending", [None, 0])) + [None, 0]
        self._pending, self._pending_count = pending[0], int(pending[1] or 0)
        self._warned = {str(k): int(v) for k, v in dict(state.get("warned") or {}).items()}
        self._vanished.extend(float(v) for v in state.get("vanished", []))
        still = state.get("still")
        self._still = [int(v) for v in still] if still else None
        alive = state.get("alive")
        self._alive = [bool(v) for v in alive] if alive else None
        self._wants_dead = bool(state.get("wants_dead", state.get("wants_vanished", False)))
        refuted = state.get("refuted")
        self._refuted = (float(refuted[0]), float(refuted[1]), int(refuted[2])) if refuted else None
        self.wants_vanished = bool(state.get("wants_vanished", False))
        finding = state.get("last_finding")
        self.last_finding = StabilityFinding.from_dict(finding) if finding else None
