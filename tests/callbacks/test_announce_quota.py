"""A fault that recurs for ever (a NaN loss every other step): every skip is an event and a TensorBoard text, but the
terminal gets the first few, then a line on a power-of-two clock, and one closing line counting the rest, in the
Trainer and in a plain loop alike (one engine)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_gradguard import GradGuard, NaNGuard
from lightning_gradguard.core.engine._quiet import BURST
from tests.callbacks.test_nan_guard_rollback import make_trainer
from tests.models import TinyRegression, loader

NAN_STEPS = list(range(2, 80, 2))  # 39 skips of one cause


def _expected_lines(skips: list[int]) -> list[int]:
    return [step for n, step in enumerate(skips, start=1) if n <= BURST or (n & (n - 1)) == 0]


def _check(lines: list[str], events: list[dict], owner: str) -> None:
    skips = [int(e["step"]) for e in events if e["kind"] == "skip"]
    assert skips == NAN_STEPS  # every fault is an event, none dropped
    step_lines = [line for line in lines if line.startswith(f"{owner} skip at step ")]
    assert [int(line.split()[4].rstrip(":")) for line in step_lines] == _expected_lines(skips)
    shown = len(step_lines)
    (closing,) = [line for line in lines if line.startswith(f"{owner}: ")]
    hidden = len(skips) - shown
    assert hidden > 0
    # the closing line counts those not announced since the last line; the thinned lines counted the others
    counted = sum(int(line.split("; ")[-2].split()[0]) for line in step_lines if "for this cause" in line)
    assert counted + int(closing.split()[1]) == hidden
    assert f"last at step {NAN_STEPS[-1]}" in closing
    assert closing.endswith(f"{len(skips)} in all")


def test_trainer_thins_a_recurring_skip_on_the_terminal_and_keeps_every_event(tmp_path, caplog) -> None:
    guard = NaNGuard()
    trainer = make_trainer(tmp_path, [guard], max_steps=90)
    with caplog.at_level("WARNING", logger="lightning_gradguard"):
        trainer.fit(TinyRegression(nan_at_steps=NAN_STEPS))
    _check([r.getMessage() for r in caplog.records], guard.events, "NaNGuard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("gradguard/nan_guard_events/text_summary")
    assert sorted(t.step for t in texts) == NAN_STEPS  # TensorBoard keeps every event's line


def _plain_fit(caplog, steps: int, loss_at: Callable[[int, torch.Tensor], torch.Tensor]) -> GradGuard:
    """A plain loop with GradGuard over ``steps`` steps of TinyRegression, the loss of step ``s`` as
    ``loss_at(s, mse)``; the guard's records captured by ``caplog``."""
    torch.manual_seed(0)
    model = TinyRegression()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = GradGuard(model, opt)
    with caplog.at_level("WARNING", logger="lightning_gradguard"):
        step = 0
        while step < steps:
            for x, y in loader():
                if step == steps:
                    break
                loss = loss_at(step, nn.functional.mse_loss(model(x), y))
                loss.backward()
                if guard.before_step(loss):
                    opt.step()
                guard.after_step()
                opt.zero_grad()
                step += 1
        guard.close()
    return guard


def test_plain_loop_thins_the_same_way(caplog) -> None:
    guard = _plain_fit(caplog, 90, lambda step, loss: loss * float("nan") if step in NAN_STEPS else loss)
    _check([r.getMessage() for r in caplog.records], guard.events, "GradGuard")


def test_a_run_whose_steps_are_mostly_skipped_is_told_it_is_not_training(tmp_path) -> None:
    """Each skip of a fault on every other batch is right on its own (the rerun finds each batch at fault), but the
    run learns nothing; a full window of 100 steps with half of them skipped gives a warning that says so, once per
    window. A third of the steps skipped gives none (bad data comes and goes; the skips are announced)."""
    half = NaNGuard()
    make_trainer(tmp_path / "half", [half], max_steps=240, logger=False).fit(
        TinyRegression(nan_at_steps=list(range(1, 240, 2)))
    )
    rate = [e for e in half.events if e.get("rule") == "skip_rate"]
    assert [e["step"] for e in rate] == [99, 199]  # the first full window, then once per window
    assert rate[0]["kind"] == "warn"
    assert rate[0]["cause"] == "instability"
    assert rate[0]["reason"].startswith("50 of the last 100 steps were skipped (nonfinite loss 50)")
    third = NaNGuard()
    make_trainer(tmp_path / "third", [third], max_steps=240, logger=False).fit(
        TinyRegression(nan_at_steps=list(range(2, 240, 3)))
    )
    assert sum(e["kind"] == "skip" for e in third.events) == 80
    assert not [e for e in third.events if e.get("rule") == "skip_rate"]


def test_a_warning_that_recurs_for_ever_is_thinned_per_rule_and_kept_as_events(caplog) -> None:
    """A loss weighted up 1 % per step climbs for ever at a constant LR: correct warnings (``loss_climbing``,
    ``loss_above_best``), every few windows, none of them news after the first few (the zoo's DQN drew 132 of them
    in 24,000 steps). Every one is an event; the terminal shows each rule's first few, then its 8th, 16th, ...; the
    closing line counts the rest. No action: a constant LR never explains a climb."""
    guard = _plain_fit(caplog, 1500, lambda step, loss: loss * 1.01**step)
    assert guard.events
    assert {e["kind"] for e in guard.events} == {"warn"}
    lines = [r.getMessage() for r in caplog.records]
    hidden = 0
    for rule in ("loss_climbing", "loss_above_best"):
        steps = [int(e["step"]) for e in guard.events if e.get("rule") == rule]
        assert len(steps) > BURST + 2, steps  # enough to be thinned
        shown = [int(line.split()[4].rstrip(":")) for line in lines if line.startswith("GradGuard warn at step ")]
        assert [s for s in shown if s in steps] == _expected_lines(steps)
        hidden += len(steps) - len(_expected_lines(steps))
    (closing,) = [line for line in lines if line.startswith("GradGuard: ")]
    counted = sum(int(line.split("; ")[-2].split()[0]) for line in lines if "of this kind; " in line)
    assert counted + int(closing.split()[1]) == hidden
    assert closing.startswith("GradGuard: ")
    assert " more warnings were not announced (" in closing
    assert closing.endswith(f"{len(guard.events)} in all")
