"""``gradguard/spike_score`` in TensorBoard equals an independent computation on the logged loss and norms."""

from __future__ import annotations

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradguard import GradientNormMonitor, NaNGuard
from tests.core.measure.test_spike_score import reference
from tests.models import TinyRegression, make_trainer


def _series(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.parametrize("checkpoint_resume", [False, True])
def test_logged_spike_score_matches_the_logged_stream(tmp_path, checkpoint_resume: bool) -> None:
    spikes = {s: 20.0 for s in (170, 230, 260, 331)}  # finite loss spikes; the guard only measures them here
    model = TinyRegression(loss_scale_at=spikes, lr=0.003)
    guard = NaNGuard(divergence=False, stability=False, action="skip")
    trainer = make_trainer(tmp_path, [GradientNormMonitor(), guard], max_steps=360, log_every_n_steps=1)
    trainer.fit(model)
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    losses, norms, scores = (_series(acc, t) for t in ("train_loss", "gradguard/grad_norm", "gradguard/spike_score"))
    steps = sorted(set(losses) & set(norms))
    assert steps == list(range(360))
    want_spikes, want_judged = reference([losses[s] for s in steps], [norms[s] for s in steps])
    last = max(scores)
    assert last >= 358
    assert want_judged == 360 - 128  # judged from the first step with a full window of 128
    assert want_spikes >= 2  # the injected spikes are seen (one inside the window of another may hide it)
    assert scores[last] == pytest.approx(want_spikes / want_judged, rel=1e-6)
    assert guard.spike_score == pytest.approx(want_spikes / want_judged)
    assert guard.skipped_steps == 0
    assert not guard.events
    assert all(math.isfinite(v) for v in scores.values())
    if checkpoint_resume:  # the score is checkpointed: a fresh guard continues it
        state = guard.state_dict()
        again = NaNGuard()
        again.load_state_dict(state)
        assert again.engine.judge_.streams[0].spikes.state_dict() == guard.engine.judge_.streams[0].spikes.state_dict()
