"""Finite divergence: a loss or gradient norm that leaves its healthy range, while every number is still finite.

NaN/inf are easy to see; a run whose loss goes from 0.1 to 1e12 and stays there is not, and it is the more common
way a too-high learning rate kills a model (nothing ever turns non-finite). :class:`DivergenceDetector` keeps a
robust baseline of the recent *healthy* values of one loss stream and flags:

- **loss jump**: the loss stays above ``jump_factor`` x the scale of its recent healthy values for ``persist`` steps
  in a row (one bad batch is a spike, the clipper's business; a loss that stays far up is a diverged model);
- **gradient norm**: the pre-clip norm stays above ``grad_factor`` x the median of the recent healthy norms for
  ``persist`` steps in a row, erratic or growing as a jumped loss must be (below), unless the loss left the run's
  start level by a jump at some step of the run (:meth:`DivergenceDetector.above_start`: a corrupt shard, a
  blown-up model), when any far run counts. Zero gradients (a masked batch, a satisfied margin loss) are no reference.

What "far above" means is written so that no healthy loss shape trips it:

- the **scale** of the recent losses is ``max(|median|, mean absolute deviation, floor x |start|)``: a loss that
  crosses zero (a Gaussian NLL), is negative or hovers near zero late in training keeps a sensible scale, and a
  loss near zero that jumps 100x on a hard batch is still small next to where the run started;
- a **scale of zero says nothing**: while the recent losses are all exactly 0 (a fully masked first batch, a margin
  loss already satisfied, a loss weight ramped up from 0) every loss is learned, none is judged;
- a **jump is divergence only if it is erratic or growing**: after ``persist`` steps far up in a row (while fewer
  than ``min_samples`` healthy losses are known, ``min_samples - n`` more, counted rather than in a row: a thin
  reference asks for longer evidence, and a blown-up model dips now and then), the
  jumped losses must span ``erratic_span`` x or more, or end twice as high as they started: a model blown up by a
  too-high LR swings by orders of magnitude or keeps climbing. A far level that holds steady or falls is a new level,
  not a blown-up model (a curriculum step to a harder, larger task; an easy first batch of a fine-tuned model; a
  nearly masked one): it becomes the reference. The gradient norm is held to the same test (:func:`holds_level`):
  a class-incremental curriculum whose first task was separable (norms ~1e-3, then ~7 on the whole task: 5000x)
  is a new level; rolled back, the same jump met the restored state on the next batches, three times, then a halt.
  No rule's reference is a single batch;
- values beyond the factors never enter the baselines, so a blow-up cannot become its own reference.

The slow climb of a loss that a moving baseline would follow is the stability controller's business
(``core/guard/_stability.py``): a loss can climb for healthy reasons (a curriculum, an annealed loss weight, a moving
RL target), so a climb alone is never called divergence here.

The detector also says whether the run was **unsettled** just before a fault: whether any of the last ``recent``
judged steps had a loss far above its scale or a norm far above its median. A NaN after such a stretch is the
trajectory's (a too-high LR), one after healthy steps the batch's: the guard policy uses this to tell a repeated fault
that needs a lower LR from a burst of bad batches. A step whose loss is non-finite is a fault step: neither its loss
nor its (possibly huge, finite) gradient norm is judged or learned, so a fault's own statistics never make the run
look unsettled.

The detector works on host floats: the guard reads the loss and the norm once per step anyway (its one host
transfer), so this costs a few Python comparisons and a sort of ``window`` numbers per step. No input makes it raise:
zeros, negatives, 1e-30 ... 1e30 and non-finite values are all handled.
"""

from __future__ import annotations

from collections import deque
from typing import Any

#: the long-run norm level keeps every LONG_EVERY-th healthy norm, the last LONG_SIZE of them (~1000 steps)
LONG_EVERY = 10
LONG_SIZE = 100


def median(values: deque[float] | list[float]) -> float:
    """``statistics.median`` of a non-empty window (the same arithmetic, without its checks and conversions: two to
    three medians a step)."""
    data = sorted(values)
    i = len(data) // 2
    return data[i] if len(data) % 2 else (data[i - 1] + data[i]) / 2


def spread(values: deque[float] | list[float], center: float) -> float:
    """The mean absolute deviation of ``values`` from ``center`` (0.0 for an empty window)."""
    if not values:
        return 0.0
    return sum(abs(v - center) for v in values) / len(values)


def holds_level(jumped: list[float], swing: list[float], erratic_span: float) -> bool:
    """Whether far values (``jumped``: the run of them, oldest first; ``swing``: the values whose span is judged)
    are a new level rather than a blow-up: they span less than ``erratic_span`` x and end less than twice as high as
    they started. A model blown up by a too-high LR swings by orders of magnitude or keeps climbing; a new task's or
    new data's level holds or falls as the model learns it."""
    low, high = min(swing), max(swing)
    erratic = low > 0 and high >= erratic_span * low
    return not erratic and jumped[-1] < 2.0 * jumped[0]


def _finite(x: float) -> bool:
    return x - x == 0.0  # math.isfinite without the call: False for NaN and +-inf


class DivergenceDetector:
    """Flags a loss or gradient norm that left its healthy range (see the module docstring).

    Args:
        jump_factor: a loss above its median by this multiple of its scale (> 1) counts as out of range.
        grad_factor: gradient norm above this multiple of its recent median counts as out of range (> 1).
        persist: steps in a row a jump must last (with a full reference).
        window: how many recent healthy values the baselines cover.
        min_samples: healthy values that make a full reference (fewer: the loss jump must last longer; the gradient
            norm is not judged yet).
        unsettled_factor: a loss above its median by this multiple of its scale makes the run unsettled.
        grad_unsettled_factor: a norm above this multiple of its recent median makes the run unsettled.
        recent: how many of the last judged steps :attr:`unsettled` looks at.
        floor: the loss scale is at least ``floor x |start|`` (``start``: the median of the run's first
            ``min_samples`` healthy losses).
        erratic_span: jumped losses spanning this ratio (max/min), or ending twice as high as they started, are
            divergence; a steadier or falling level replaces the reference.
        climb_factor, climb_steps: accepted for compatibility; the slow climb is the stability controller's rule.

    Example:
        >>> det = DivergenceDetector(persist=2, min_samples=2)
        >>> [det.update(loss, 1.0) for loss in (1.0, 0.9, 1.1, 0.8)]
        [(False, False), (False, False), (False, False), (False, False)]
        >>> [det.update(loss, 1.0) for loss in (500.0, 5000.0)]  # far up and climbing: divergence
        [(False, False), (True, False)]
        >>> det = DivergenceDetector(persist=2, min_samples=2)
        >>> [det.update(loss, 1.0)[0] for loss in (1.0, 0.9, 1.1, 0.8, 500.0, 450.0, 460.0)]  # a steady new level
        [False, False, False, False, False, False, False]
    """

    def __init__(
        self,
        jump_factor: float = 100.0,
        climb_factor: float = 10.0,
        climb_steps: int = 20,
        grad_factor: float = 1000.0,
        persist: int = 3,
        window: int = 32,
        min_samples: int = 5,
        unsettled_factor: float = 3.0,
        grad_unsettled_factor: float = 10.0,
        recent: int = 10,
        floor: float = 0.1,
        erratic_span: float = 10.0,
    ) -> None:
        self.jump_factor = float(jump_factor)
        self.climb_factor = float(climb_factor)
        self.climb_steps = int(climb_steps)
        self.grad_factor = float(grad_factor)
        self.persist = int(persist)
        self.window = int(window)
        self.min_samples = int(min_samples)
        self.unsettled_factor = float(unsettled_factor)
        self.grad_unsettled_factor = float(grad_unsettled_factor)
        self.recent = int(recent)
        self.floor = float(floor)
        self.erratic_span = float(erratic_span)
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new baseline is learned)."""
        self._losses: deque[float] = deque(maxlen=self.window)
        self._norms: deque[float] = deque(maxlen=self.window)
        # the run's long-run norm level: every LONG_EVERY-th healthy norm, the last LONG_SIZE of them
        self._long: deque[float] = deque(maxlen=LONG_SIZE)
        self._long_count = 0
        self._first: list[float] = []  # the run's first losses (their median sets the floor)
        self._start: float | None = None
        self._loss_run = 0
        self._jumped: list[float] = []  # the losses of the current jump
        self._thin_seen: list[float] = []  # every loss judged while the reference is thin
        self._grad_run = 0
        self._grad_jumped: list[float] = []  # the norms of the current far run
        self._last_unsettled: int | None = None  # judged steps since the last unsettled one (None: none seen)
        self._calm = 0  # judged steps in a row with nothing far (since the start, or since a rollback's restart)
        self._unsettled_before = False  # the run was unsettled (or young) when the current far run began
        self.loss_reference: float | None = None
        self.loss_scale: float | None = None
        self.grad_reference: float | None = None
        #: the last loss divergence was judged against a thin reference (fewer than ``min_samples`` healthy losses,
        #: maybe one batch): the guard tests it on the batch itself before acting (:meth:`beyond`, :meth:`adopt_level`)
        self.thin_verdict = False
        #: report a far loss level that holds (:func:`holds_level`) as a verdict for the guard to test on the batch
        #: instead of adopting it at once (set by the judge while a rerun can run): a blown-up model can hold a level
        #: too (losses 500-1800 where the untrained model's were 2.3), and only the batch tells the two apart
        self.test_held = False
        #: the last loss divergence is such a held level: the guard adopts it (:meth:`adopt_level`) unless the state a
        #: rollback would restore is far below it on the same batch (then the model blew up: it is acted on)
        self.held_verdict = False
        #: at some step of the current run of far gradient norms the loss was a jump above the run's start level
        #: (:meth:`above_start`): the far norms are then no new level of a sound model
        self.loss_left = False
        #: at some step of the current run of far gradient norms the loss was above its recent healthy level (by the
        #: unsettled factor): the model the far norms belong to got worse by its own objective
        self.loss_rose = False
        self._loss_high = False  # this step's loss was above its recent level by the unsettled factor
        #: the far gradient norms this step adopted as the run's new level because they held (None: none, or a climb
        #: adopted because the loss did not confirm it): the guard hands them to an adaptive clipper, whose statistics
        #: of the old level would clip the new one for hundreds of steps
        self.new_grad_level: list[float] | None = None

    def beyond(self, loss: float, reference: float) -> bool:
        """Whether ``loss`` is a jump above ``reference`` (another state's loss on the same batch): above it by
        ``jump_factor - 1`` times its scale (``max(|reference|, floor x |start|)``), as a jump above the baseline is.

        Example:
            >>> det = DivergenceDetector()
            >>> det.beyond(5000.0, 11.0), det.beyond(0.3, 4.0), det.beyond(30.0, 2.0)
            (True, False, False)
        """
        scale = max(abs(reference), self.floor * abs(self.start))
        return loss > reference + (self.jump_factor - 1.0) * scale

    @property
    def calm(self) -> bool:
        """The last judged step was within the thresholds (no far loss or norm being counted towards a verdict)."""
        return self._loss_run == 0 and self._grad_run == 0

    def beyond_level(self, loss: float, grad_norm: float | None = None) -> bool:
        """Whether another measurement (a rerun's loss and gradient norm) is beyond the thresholds the last judged
        step was held to: the loss above its reference by ``jump_factor - 1`` scales, or the norm above
        ``grad_factor`` x its reference. False while a reference is unknown.

        Example:
            >>> det = DivergenceDetector(persist=2, min_samples=2)
            >>> [det.update(loss, 1.0) for loss in (1.0, 0.9, 1.1, 0.8)][-1]
            (False, False)
            >>> det.beyond_level(500.0), det.beyond_level(2.0), det.beyond_level(2.0, 5000.0)
            (True, False, True)
        """
        ref, scale = self.loss_reference, self.loss_scale
        if ref is not None and scale is not None and scale > 0.0 and loss > ref + (self.jump_factor - 1.0) * scale:
            return True
        grad = self.grad_reference
        return grad is not None and grad_norm is not None and grad_norm > self.grad_factor * grad + 1e-30

    def off_level(self, loss: float, grad_norm: float) -> bool:
        """Whether another measurement is off the run's level by the :attr:`unsettled` factors (the loss above its
        reference by ``unsettled_factor - 1`` scales, or the norm above ``grad_unsettled_factor`` x its reference):
        what makes a step unsettled, far short of a divergence. False while a reference is unknown.

        Example:
            >>> det = DivergenceDetector(persist=2, min_samples=2)
            >>> [det.update(loss, 1.0) for loss in (1.0, 0.9, 1.1, 0.8)][-1]
            (False, False)
            >>> det.off_level(1.2, 2.0), det.off_level(5.0, 1.0), det.off_level(1.0, 50.0)
            (False, True, True)
        """
        ref, scale = self.loss_reference, self.loss_scale
        if ref is not None and scale is not None and scale > 0.0 and loss > ref + (self.unsettled_factor - 1.0) * scale:
            return True
        grad = self.grad_reference
        return grad is not None and grad_norm > self.grad_unsettled_factor * grad + 1e-30

    def beyond_state(self, loss: float, grad_norm: float, other_loss: float, other_norm: float) -> bool:
        """Whether one state's loss and norm on a batch are clearly worse than another state's on the same batch, by
        the :attr:`unsettled` factors: the loss above it by ``unsettled_factor - 1`` times its scale
        (``max(|other_loss|, floor x |start|)``), or the norm above ``grad_unsettled_factor`` x it. A rollback to the
        other state then buys something back; where it is not, the other state is no better on the evidence.

        Example:
            >>> det = DivergenceDetector()
            >>> det.beyond_state(0.3, 0.9, 0.25, 0.8), det.beyond_state(30.0, 1.0, 2.3, 1.0)
            (False, True)
            >>> det.beyond_state(0.3, 80.0, 0.3, 0.8)
            True
        """
        scale = max(abs(other_loss), self.floor * abs(self.start))
        worse = loss > other_loss + (self.unsettled_factor - 1.0) * scale
        return worse or grad_norm > self.grad_unsettled_factor * other_norm + 1e-30

    def adopt_level(self) -> None:
        """The losses counted as a jump are the run's level, not a blown-up model's (the guard found the state it
        would restore no better on the same batch): they become the reference, as a steady new level does."""
        jumped = self._jumped
        self._loss_run, self._jumped, self._thin_seen = 0, [], []
        self.thin_verdict = self.held_verdict = False
        if jumped:
            self._losses.clear()
            for value in jumped:
                self._learn(value)

    def adopt_grad_level(self) -> list[float]:
        """The norms counted as far are the run's level, not a blown-up model's (the guard found the state a rollback
        would restore as far on an ordinary batch: the objective changed): they become the reference, as a far level
        that holds does. Returns them (empty when none were being counted), for the clipper."""
        jumped = self._grad_jumped
        self._grad_run, self._grad_jumped, self.loss_left, self.loss_rose = 0, [], False, False
        if jumped:
            self._norms.clear()
            for value in jumped:
                self._learn_norm(value)
        return list(jumped)

    def restart_runs(self) -> None:
        """Forget the counting in progress but keep the baselines (after a rollback to a healthy state)."""
        self._loss_run = self._grad_run = 0
        self._jumped, self._grad_jumped, self.loss_left, self.loss_rose = [], [], False, False
        self._thin_seen = []
        self._last_unsettled = None
        self._unsettled_before = False
        self._calm = 0

    @property
    def unsettled_before(self) -> bool:
        """Whether the run was :attr:`unsettled` just before the current run of far values began, or had judged fewer
        than ``recent`` steps: a divergence out of ``recent`` or more calm steps (a sudden jump: a weight corrupted to
        a huge finite value, an optimizer state reset) says nothing against the LR the run was healthy at; one out
        of an unsettled stretch, or in the run's first steps, is the trajectory's."""
        return self._unsettled_before

    @property
    def unsettled(self) -> bool:
        """Whether one of the last ``recent`` judged steps had its loss or norm far above their baselines."""
        return self._last_unsettled is not None and self._last_unsettled < self.recent

    @property
    def start(self) -> float:
        """The run's start level (median of its first ``min_samples`` finite losses; fewer while they come)."""
        if self._start is not None:
            return self._start
        return median(self._first) if self._first else 0.0

    def update(self, loss: float, grad_norm: float) -> tuple[bool, bool]:
        """Judge one step's loss and pre-clip gradient norm; returns ``(loss_divergence, grad_divergence)``.

        A step with a non-finite loss is a fault step: nothing of it is judged or learned. A non-finite norm with a
        finite loss leaves the loss judged (the non-finite checks own the norm).
        """
        loss, grad_norm = float(loss), float(grad_norm)
        self.thin_verdict = self.held_verdict = self._loss_high = False
        self.new_grad_level = None
        if not _finite(loss):
            return False, False  # a fault step: not a judged step either
        if self._last_unsettled is not None:
            self._last_unsettled += 1
        was_unsettled, counting = self._calm < self.recent, self._loss_run > 0 or self._grad_run > 0
        loss_bad = self._judge_loss(loss)
        grad_bad = self._judge_grad(grad_norm, loss) if _finite(grad_norm) else False
        self._calm = 0 if self._last_unsettled == 0 else self._calm + 1  # (0: this step was far)
        if not counting and (self._loss_run > 0 or self._grad_run > 0):  # a run of far values starts here
            self._unsettled_before = was_unsettled
        return loss_bad, grad_bad

    def _learn(self, loss: float) -> None:
        """A loss accepted as healthy: into the window, and into the start level while that is being measured."""
        self._losses.append(loss)
        if self._start is None:
            self._first.append(loss)
            if len(self._first) >= self.min_samples:
                self._start = median(self._first)

    def _judge_loss(self, loss: float) -> bool:
        window = self._losses
        if not window:
            self._learn(loss)
            return False
        ref = median(window)
        scale = max(abs(ref), spread(window, ref), self.floor * abs(self.start))
        self.loss_reference, self.loss_scale = ref, scale
        if not scale > 0.0:  # all exactly 0 so far: no scale to judge against, learn the value
            self._loss_run = 0
            self._learn(loss)
            return False
        if loss > ref + (self.unsettled_factor - 1.0) * scale:
            self._last_unsettled = 0
            self._loss_high = True
        jumped = loss > ref + (self.jump_factor - 1.0) * scale
        thin = len(window) < self.min_samples
        if thin:
            self._thin_seen.append(loss)
        if not jumped:
            if not thin:  # a mature reference: a jump must last persist steps in a row
                self._loss_run, self._jumped = 0, []
            self._learn(loss)
            return False
        # with a thin reference the jumped steps are counted, not required in a row (a blown-up model dips now and
        # then), and the healthy ones in between fill the reference
        self._loss_run += 1
        self._jumped.append(loss)
        needed = self.persist + max(0, self.min_samples - len(window))
        if self._loss_run < needed:
            return False
        jumped_run = self._jumped
        # erratic: the losses swing over erratic_span (with a thin reference, every loss since it, dips included)
        if holds_level(jumped_run, self._thin_seen if thin else jumped_run, self.erratic_span):
            # a level that holds steady or falls: a new task or data (a curriculum step), or a thin reference that
            # was unrepresentative; the model is learning it, it did not blow up. Or a model blown up to a steady
            # level: where the guard can test it on the batch, it is reported for that test (test_held)
            if self.test_held:
                self.held_verdict, self.thin_verdict = True, thin
                return True
            self._loss_run, self._jumped, self._thin_seen = 0, [], []
            window.clear()
            for value in jumped_run:
                self._learn(value)
            return False
        self.thin_verdict = thin
        return True  # erratic or climbing: divergence (the run keeps counting while it lasts)

    def above_start(self, loss: float) -> bool:
        """Whether ``loss`` is a jump above the run's start level (the untrained model's loss): above it by
        ``jump_factor - 1`` times ``floor x |start|``, the jump a loss near 0 must make. Anchored to the start, so no
        level adopted since moves it: a corrupt shard (inputs x1e4: losses in the hundreds where the run started at
        2.3) stays far above it however long it lasts; a new task's loss (a class-incremental step) does not. True
        while the start is not known yet, and for a start of exactly 0 (nothing to anchor to)."""
        start = self._start
        if start is None or start == 0.0:
            return True
        return loss > start + (self.jump_factor - 1.0) * self.floor * abs(start)

    def _judge_grad(self, norm: float, loss: float) -> bool:
        if not norm > 1e-30:
            return False  # a zero gradient (a masked batch, a satisfied margin) is no reference and no divergence
        if len(self._norms) < self.min_samples:
            self._norms.append(norm)
            return False
        # the reference is the recent level, or the run's long-run level where the recent one collapsed below it
        # (saturated units after a corruption, a loss near 0): a norm that returns to where the run used to be is
        # no divergence. A real divergence leaves both far behind.
        ref = median(self._norms)
        if len(self._long) >= self.min_samples:
            ref = max(ref, median(self._long))
        self.grad_reference = ref
        if norm > self.grad_unsettled_factor * ref + 1e-30:
            self._last_unsettled = 0
        if not norm > self.grad_factor * ref + 1e-30:
            self._grad_run, self._grad_jumped, self.loss_left, self.loss_rose = 0, [], False, False
            self._learn_norm(norm)
            return False
        self._grad_run += 1
        self._grad_jumped.append(norm)
        self.loss_left = self.loss_left or self.above_start(loss)
        self.loss_rose = self.loss_rose or self._loss_high
        if self._grad_run < self.persist:
            return False
        jumped = self._grad_jumped
        # the far norms are a blown-up model's only where its loss says so: it rose above its recent level at some
        # step of the far run (a step taken with such a gradient moves the weights far, and the next batches' loss
        # shows it), or left the run's start by a jump. Far norms while the loss holds or falls are the gradient scale
        # of a new phase: the first successes of a sparse-reward policy gradient (norms 0.01 -> 19, 39, 60 and
        # climbing, the loss falling from -0.03 to -23), a new task. They become the reference as a steady level
        # does; a model that does blow up shows it in its loss within a step or two, and is judged again then
        held = not self.loss_left and holds_level(jumped, jumped, self.erratic_span)
        if held or not (self.loss_left or self.loss_rose):
            # a far level that holds or falls while the loss stays within a jump of the untrained model's: the
            # gradient scale of a new task or new data (a class-incremental step, a loss weight raised), not a
            # blown-up model: it becomes the reference, as a loss level does. With the loss far above the start at
            # any step of the run (a corrupt shard, inputs x1e4, whose steady loss level the loss rule may have
            # adopted; a blown-up model), the norms stay a divergence: the guard's rerun tells the two apart
            self._grad_run, self._grad_jumped, self.loss_left, self.loss_rose = 0, [], False, False
            self._norms.clear()
            for value in jumped:
                self._learn_norm(value)
            # a level that holds is handed on (the clipper restarts from it); a climb is not: under a clipper a
            # blow-up's norms may climb while the clipped steps keep the loss down, and released it would blow up
            self.new_grad_level = list(jumped) if held else None
            return False
        return True  # erratic or climbing: divergence (the run keeps counting while it lasts)

    def _learn_norm(self, norm: float) -> None:
        """A norm accepted as healthy: into the recent window, and every LONG_EVERY-th one into the long-run level."""
        self._norms.append(norm)
        self._long_count += 1
        if self._long_count % LONG_EVERY == 0:
            self._long.append(norm)

    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self._losses),
            "norms": list(self._norms),
            "long_norms": [list(self._long), self._long_count],
            "first": list(self._first),
            "start": self._start,
            "runs": [self._loss_run, 0, self._grad_run],
            "jumped": list(self._jumped),
            "grad_jumped": list(self._grad_jumped),
            "loss_left": self.loss_left,
            "loss_rose": self.loss_rose,
            "thin_seen": list(self._thin_seen),
            "last_unsettled": self._last_unsettled,
            "calm": self._calm,
            "unsettled_before": self._unsettled_before,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._losses.extend(float(v) for v in state.get("losses", []) if _finite(float(v)))
        self._norms.extend(float(v) for v in state.get("norms", []) if _finite(float(v)))
        long_norms, long_count = (list(state.get("long_norms") or [[], 0]) + [[], 0])[:2]
        self._long.extend(float(v) for v in long_norms if _finite(float(v)))
        self._long_count = int(long_count)
        start = state.get("start")
        self._first = [float(v) for v in state.get("first", [] if start is None else [start])]
        self._start = None if start is None or "first" not in state else float(start)
        if self._start is None and len(self._first) >= self.min_samples:
            self._start = median(self._first)
        runs = list(state.get("runs", [0, 0, 0])) + [0, 0, 0]
        self._loss_run, self._grad_run = int(runs[0]), int(runs[2])
        self._jumped = [float(v) for v in state.get("jumped", [])]
        self._grad_jumped = [float(v) for v in state.get("grad_jumped", [])]
        self.loss_left = bool(state.get("loss_left", False))
        self.loss_rose = bool(state.get("loss_rose", False))
        self._thin_seen = [float(v) for v in state.get("thin_seen", [])]
        last = state.get("last_unsettled")
        self._last_unsettled = None if last is None else int(last)
        self._calm = int(state.get("calm", 0))
        self._unsettled_before = bool(state.get("unsettled_before", False))
