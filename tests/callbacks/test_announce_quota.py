"""A fault that recurs for ever (a NaN loss every other step): every skip is an event and a TensorBoard text, but the
terminal gets the first few, then a line on a power-of-two clock, and one closing line counting the rest, in the
Trainer and in a plain loop alike (one engine)."""

from __future__ import annotations

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


def test_plain_loop_thins_the_same_way(caplog) -> None:
    torch.manual_seed(0)
    model = TinyRegression()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = GradGuard(model, opt)
    with caplog.at_level("WARNING", logger="lightning_gradguard"):
        step = 0
        while step < 90:
            for x, y in loader():
                if step == 90:
                    break
                loss = nn.functional.mse_loss(model(x), y)
                if step in NAN_STEPS:
                    loss = loss * float("nan")
                loss.backward()
                if guard.before_step(loss):
                    opt.step()
                guard.after_step()
                opt.zero_grad()
                step += 1
        guard.close()
    _check([r.getMessage() for r in caplog.records], guard.events, "GradGuard")
