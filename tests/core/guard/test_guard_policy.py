"""GuardPolicy.decide: the four policies as a table of (health, history) -> action, without a Trainer."""

from __future__ import annotations

import pytest

from lightning_gradguard.core.guard._policy import GuardAction, GuardCause, GuardEvent, GuardPolicy, StepHealth

A = GuardAction


def decide_all(policy: GuardPolicy, healths: list[StepHealth], can_roll_back: bool = True) -> list[GuardAction]:
    return [policy.decide(h, can_roll_back).action for h in healths]


def test_healthy_step_is_no_action_and_ends_a_run_of_skips():
    policy = GuardPolicy("skip", max_consecutive_skips=1)
    assert policy.decide(StepHealth(0), True).action is A.NONE
    assert policy.decide(StepHealth(1, nonfinite_loss=True), True).action is A.SKIP
    assert policy.decide(StepHealth(2), True).action is A.NONE
    assert policy.consecutive_skips == 0
    assert policy.decide(StepHealth(3, nonfinite_loss=True), True).action is A.SKIP


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        (StepHealth(10, nonfinite_loss=True), A.SKIP),  # an isolated bad batch
        (StepHealth(10, nonfinite_grad=True, nonfinite_batch=True), A.SKIP),
        (StepHealth(10, loss_spike=True), A.SKIP),
        (StepHealth(10, nonfinite_loss=True, nonfinite_params=True), A.ROLLBACK),  # damaged weights
        (StepHealth(10, nonfinite_loss=True, nonfinite_buffers=True), A.ROLLBACK),
        (StepHealth(10, loss_divergence=True), A.ROLLBACK),  # finite divergence
        (StepHealth(10, grad_divergence=True), A.ROLLBACK),
        (StepHealth(10, scale_collapse=True), A.ROLLBACK),
    ],
)
def test_auto_skips_isolated_batch_faults_and_rolls_back_damage(health, expected):
    assert GuardPolicy("auto").decide(health, can_roll_back=True).action is expected


def test_auto_rolls_back_a_fault_repeating_within_the_window_then_halts_after_max_rollbacks():
    policy = GuardPolicy("auto", max_rollbacks=2, repeat_window=10)
    steps = [5, 30, 38, 45, 50]  # 30 is 25 after 5 (isolated); 38, 45, 50 repeat within 10
    actions = decide_all(policy, [StepHealth(s, nonfinite_loss=True, unsettled=True) for s in steps])
    assert actions == [A.SKIP, A.SKIP, A.ROLLBACK, A.ROLLBACK, A.HALT]
    assert policy.rollbacks == 2


def test_auto_skips_repeated_faults_that_healthy_steps_separate_or_that_bad_inputs_explain():
    # a burst of bad batches: the steps between the faults were in range, so each is the batch's fault
    policy = GuardPolicy("auto", repeat_window=10)
    healths = [StepHealth(s, nonfinite_loss=s in (5, 8, 11, 14)) for s in range(4, 15)]  # healthy steps between
    actions = [a for a in decide_all(policy, healths) if a is not A.NONE]
    assert actions == [A.SKIP] * 4
    assert "steps before it were healthy" in policy.decide(StepHealth(17, nonfinite_grad=True), True).reason
    # bad input data is skipped even after an unsettled stretch: no rollback or LR cut undoes bad data
    policy = GuardPolicy("auto", repeat_window=10)
    bad_data = [StepHealth(s, nonfinite_loss=True, nonfinite_batch=True, unsettled=True) for s in (5, 7, 9)]
    assert decide_all(policy, bad_data) == [A.SKIP, A.SKIP, A.SKIP]
    assert policy.rollbacks == 0


def test_auto_rolls_back_after_max_consecutive_faults_without_a_healthy_step():
    policy = GuardPolicy("auto", max_consecutive_skips=2, repeat_window=10)
    actions = decide_all(policy, [StepHealth(s, nonfinite_loss=True) for s in (5, 6, 7)])
    assert actions == [A.SKIP, A.SKIP, A.ROLLBACK]
    assert policy.consecutive_skips == 0
    policy = GuardPolicy("auto", max_consecutive_skips=1, repeat_window=10)
    policy.decide(StepHealth(5, nonfinite_loss=True), True)
    assert "2 faults in a row" in policy.decide(StepHealth(6, nonfinite_loss=True), True).reason


def test_halt_after_divergence_says_the_lr_looks_too_high():
    policy = GuardPolicy("auto", max_rollbacks=1)
    first = policy.decide(StepHealth(3, loss_divergence=True), True)
    second = policy.decide(StepHealth(9, loss_divergence=True), True)
    assert (first.action, second.action) == (A.ROLLBACK, A.HALT)
    assert second.cause is GuardCause.LOSS_DIVERGENCE
    assert "learning rate looks too high" in second.reason
    assert "max_rollbacks=1" in second.reason


def test_skip_escalates_damage_at_once_and_repeats_after_max_consecutive_skips():
    # issue 15: non-finite weights escalate immediately (no futile skips)
    policy = GuardPolicy("skip", max_consecutive_skips=3, escalate_to="rollback")
    assert policy.decide(StepHealth(1, nonfinite_loss=True, nonfinite_params=True), True).action is A.ROLLBACK
    policy = GuardPolicy("skip", max_consecutive_skips=2, escalate_to="halt")
    actions = decide_all(policy, [StepHealth(s, nonfinite_grad=True) for s in (1, 2, 3)])
    assert actions == [A.SKIP, A.SKIP, A.HALT]


def test_rollback_without_a_snapshot_skips_finite_weights_and_halts_damaged_ones():
    policy = GuardPolicy("rollback")
    decision = policy.decide(StepHealth(1, nonfinite_loss=True), can_roll_back=False)
    assert decision.action is A.SKIP
    assert "no trusted snapshot" in decision.reason
    assert policy.rollbacks == 0
    damaged = policy.decide(StepHealth(2, nonfinite_params=True), can_roll_back=False)
    assert damaged.action is A.HALT


def test_halt_policy_and_cause_priority():
    decision = GuardPolicy("halt").decide(StepHealth(4, nonfinite_grad=True, nonfinite_loss=True), True)
    assert decision.action is A.HALT
    assert decision.cause is GuardCause.NONFINITE_LOSS  # the loss is the earlier symptom
    assert StepHealth(0, nonfinite_loss=True, nonfinite_params=True).cause is GuardCause.NONFINITE_PARAMS
    assert StepHealth(0, other_rank=True).cause is GuardCause.OTHER_RANK
    assert StepHealth(0).cause is None


def _resumed(policy: GuardPolicy, drop: str = "") -> GuardPolicy:
    """A new policy of the same settings loaded from ``policy``'s state dict (without the key ``drop``)."""
    other = GuardPolicy("auto", repeat_window=policy.repeat_window)
    other.load_state_dict({k: v for k, v in policy.state_dict().items() if k != drop})
    return other


def test_state_round_trip_keeps_counting():
    policy = GuardPolicy("auto", repeat_window=10)
    policy.decide(StepHealth(5, nonfinite_loss=True), True)
    policy.decide(StepHealth(8, nonfinite_loss=True, unsettled=True), True)
    other = _resumed(policy)
    assert (other.rollbacks, other.last_fault_step) == (1, 8)
    repeat = StepHealth(12, nonfinite_loss=True, unsettled=True)
    assert other.decide(repeat, True).action is A.ROLLBACK  # repeats the one at 8
    other.load_state_dict({})
    assert (other.rollbacks, other.consecutive_skips, other.last_fault_step) == (0, 0, None)


def test_event_line_is_plain_words():
    event = GuardEvent(
        step=7,
        kind="rollback",
        cause="nonfinite_loss",
        lr_scale=0.5,
        reason="second fault within 100 steps",
        nonfinite_batch=True,
        first_nonfinite_module="net.0",
        nonfinite_grads=["net.0.weight", "net.0.bias"],
        snapshot_step=4,
    )
    line = event.line()
    assert line.startswith("NaNGuard rollback at step 7: nonfinite loss")
    assert "the input batch held NaN/inf" in line
    assert "first non-finite output: net.0" in line
    assert "restored the state of step 4" in line
    assert "[" not in line  # no Python reprs
    assert event.to_dict()["snapshot_step"] == 4
    assert "loss" not in event.to_dict()  # empty fields are left out


def _repeats(line: str) -> list[str]:
    """Phrases of three words or more that the line says twice (after "at step N:")."""
    words = line.split(": ", 1)[1].replace(";", " ").replace(":", " ").replace(",", " ").split()
    seen, twice = set(), []
    for i in range(len(words) - 2):
        phrase = " ".join(words[i : i + 3])
        if phrase in seen:
            twice.append(phrase)
        seen.add(phrase)
    return twice


@pytest.mark.parametrize(
    ("health", "kind", "lead"),
    [
        (StepHealth(7, loss_divergence=True), "rollback", "loss divergence; it cannot be undone by skipping"),
        (StepHealth(7, nonfinite_params=True), "rollback", "nonfinite params; it cannot be undone by skipping"),
        (StepHealth(7, nonfinite_loss=True), "skip", "nonfinite loss; an isolated bad batch: buffers restored"),
        (StepHealth(7, nonfinite_loss=True, nonfinite_batch=True), "skip", "nonfinite loss; a fault of the data"),
    ],
)
def test_event_lines_say_each_thing_once(health, kind, lead):
    """Issue 26: "loss divergence; ...; loss divergence: the state is damaged" said the cause twice, and a skip's
    reason said "skipped" after the kind "skip"."""
    decision = GuardPolicy("auto").decide(health, can_roll_back=True)
    event = GuardEvent(7, decision.action.value, decision.cause.value, 0.5, reason=decision.reason, snapshot_step=0)
    line = event.line()
    assert line.startswith(f"NaNGuard {kind} at step 7: {lead}"), line
    assert not _repeats(line), line
    assert "damaged" not in line
    assert "skipped" not in line


@pytest.mark.parametrize(
    ("kind", "cause", "reason", "expected"),
    [
        # a halt's reason begins with its cause (halt_reason): said once in the line
        ("halt", "nonfinite_loss", "nonfinite loss; action='halt'", "nonfinite loss; action='halt'; lr_scale=1"),
        ("halt", "nonfinite_grad", "nonfinite grad", "nonfinite grad; lr_scale=1"),
        # a stability finding's reason begins with "learning rate looks too high", the cause lr_too_high
        ("lower_lr", "lr_too_high", "learning rate looks too high: the loss climbed", "lr too high; the loss climbed"),
        ("warn", "dead_network", "the network looks dead: flat (warning only)", "dead network; flat; lr_scale"),
        # a warning's "warning only", wherever the finding put it
        (
            "warn",
            "lr_too_high",
            "learning rate looks too high: a (median 2; warning only)",
            "lr too high; a (median 2)",
        ),
        ("warn", "lr_too_high", "learning rate looks too high: a climb: warning only", "lr too high; a climb; lr"),
        ("warn", "instability", "the run looks unstable: a climb: warning only", "instability; a climb; lr"),
    ],
)
def test_event_line_drops_what_restates_the_cause_or_the_kind(kind, cause, reason, expected):
    line = GuardEvent(3, kind, cause, 1.0, reason=reason).line()
    assert line.startswith(f"NaNGuard {kind} at step 3: {expected}"), line
    assert "warning only" not in line
    assert "looks too high" not in line
    assert "looks dead" not in line


def test_event_line_names_the_damaged_tensors_with_the_cause():
    event = GuardEvent(4, "rollback", "nonfinite_params", 1.0, nonfinite_params=["net.0.weight"],
                       nonfinite_grads=["net.0.weight", "net.0.bias"])  # fmt: skip
    line = event.line()
    assert line.startswith("NaNGuard rollback at step 4: nonfinite params in net.0.weight; lr_scale=1"), line
    assert "non-finite weights" not in line  # the names went with the cause
    assert "first non-finite gradients: net.0.weight, net.0.bias" in line


def test_halt_after_one_rollback_says_rollback_in_the_singular():
    policy = GuardPolicy("rollback", max_rollbacks=1)
    policy.decide(StepHealth(3, nonfinite_loss=True), True)
    assert "fault after 1 rollback (max_rollbacks=1)" in policy.decide(StepHealth(5, nonfinite_loss=True), True).reason


def test_repeated_divergence_doubles_the_exponent_of_the_lr_cut():
    policy = GuardPolicy("auto", max_rollbacks=5, repeat_window=10)
    powers = [policy.decide(StepHealth(s, loss_divergence=True), True).lr_power for s in (3, 7, 11, 40)]
    assert powers == [1, 2, 4, 1]  # 40 is 29 steps after 11: a new episode
    assert policy.decide(StepHealth(45, nonfinite_params=True), True).lr_power == 1  # not a divergence


def test_a_fault_no_snapshot_holds_halts_at_once_without_blaming_the_lr():
    """The rerun found that the last healthy batch fails from the trusted state too: a rollback cannot repair it
    (a NaN carried in a module attribute, such as a recurrent hidden state). Before, such steps were skipped for the
    rest of the run as "a fault of the data"; after a rollback, their halt blamed the learning rate."""
    policy = GuardPolicy()
    first = policy.decide(StepHealth(150, nonfinite_params=True), True)
    assert first.action is GuardAction.ROLLBACK
    halt = policy.decide(StepHealth(151, nonfinite_loss=True, diagnosis="unrestorable"), True)
    assert halt.action is GuardAction.HALT
    assert "no snapshot holds" in halt.reason
    assert "learning rate" not in halt.reason
    assert policy.decide(StepHealth(152, nonfinite_loss=True, diagnosis="data"), True).action is GuardAction.SKIP


def test_a_sudden_divergence_out_of_calm_steps_keeps_the_lr_and_a_repeat_cuts_it():
    """A divergence whose far values began after calm steps (``unsettled`` False: the judge reads the detector's
    ``unsettled_before``) at an LR that did not rise since the trusted snapshot (``lr_rose`` False): a weight blown
    to a huge finite value, an optimizer state reset. Nothing says the LR was at fault: the state is restored at the
    schedule's LR. A repeat within ``repeat_window`` is the trajectory's after all: it cuts as the second divergence
    of a streak does (``lr_factor**2``), then doubling (a corrupt shard's divergences, each the data's, halted a
    run when the search for a safe LR started one step later)."""
    policy = GuardPolicy("auto")
    sudden = policy.decide(StepHealth(step=500, loss_divergence=True, lr_rose=False), can_roll_back=True)
    assert sudden.action is GuardAction.ROLLBACK
    assert sudden.lr_power == 0
    assert "LR kept" in sudden.reason
    assert "too high" not in sudden.reason
    again = policy.decide(StepHealth(step=540, loss_divergence=True, lr_rose=False), can_roll_back=True)
    assert again.action is GuardAction.ROLLBACK
    assert again.lr_power == 2
    assert "too high" in again.reason
    third = policy.decide(StepHealth(step=560, grad_divergence=True, lr_rose=False), can_roll_back=True)
    assert third.lr_power == 4
    for evidence in (dict(unsettled=True, lr_rose=False), dict(lr_rose=True), dict()):  # (lr_rose: True unknown)
        fresh = GuardPolicy("auto")
        decision = fresh.decide(StepHealth(step=500, loss_divergence=True, **evidence), can_roll_back=True)
        assert decision.lr_power == 1, evidence
        assert "too high" in decision.reason, evidence
    assert (
        GuardPolicy("rollback")
        .decide(  # an explicit action keeps its own meaning
            StepHealth(step=500, loss_divergence=True, lr_rose=False), can_roll_back=True
        )
        .lr_power
        == 1
    )


@pytest.mark.parametrize(
    "data_fault",
    [
        StepHealth(220, nonfinite_loss=True, nonfinite_batch=True),  # the input batch held NaN
        StepHealth(220, nonfinite_loss=True, diagnosis="transient"),  # a rerun of the step did not reproduce it
        StepHealth(220, nonfinite_grad=True, diagnosis="data"),  # the batch fails from a trusted state too
    ],
)
def test_a_fault_of_the_data_makes_no_later_state_fault_a_repeat_and_keeps_the_healthy_stretch(data_fault):
    policy = GuardPolicy("auto", repeat_window=100, refill_steps=80)
    assert policy.decide(StepHealth(100, nonfinite_params=True), True).lr_power == 0  # isolated: LR kept
    for _ in range(60):
        policy.healthy()
    assert policy.decide(data_fault, True).action is A.SKIP
    for _ in range(29):
        policy.healthy()
    # 30 steps after the data fault, 150 after the last state fault: isolated, LR kept
    state = policy.decide(StepHealth(250, nonfinite_params=True), True)
    assert (state.action, state.lr_power) == (A.ROLLBACK, 0)
    assert "an isolated fault after healthy steps: LR kept" in state.reason
    # the 89 healthy steps around the skip count as one stretch (refill_steps=80): the first rollback was given back
    assert (policy.refunded, policy.rollbacks) == (1, 1)
    # a trajectory fault still makes the next one a repeat
    policy.decide(StepHealth(260, nonfinite_loss=True, unsettled=True), True)
    assert policy.decide(StepHealth(270, nonfinite_params=True), True).lr_power == 1


def test_weights_damaged_by_a_non_finite_batch_are_restored_at_the_schedules_lr():
    """A training_step that moves the weights along its own gradient (sharpness-aware minimisation) writes the NaN of
    a bad batch into the weights before the guard judges: a rollback, but the LR was not at fault."""
    policy = GuardPolicy("auto", repeat_window=100)
    policy.decide(StepHealth(150, nonfinite_params=True), True)
    decision = policy.decide(StepHealth(200, nonfinite_params=True, nonfinite_batch=True), True)
    assert (decision.action, decision.lr_power) == (A.ROLLBACK, 0)
    assert "the damage came with a non-finite input batch: LR kept" in decision.reason


def test_the_last_trajectory_fault_survives_a_state_round_trip_and_old_states_load():
    policy = GuardPolicy("auto", repeat_window=100)
    for fault in (StepHealth(100, nonfinite_params=True), StepHealth(220, nonfinite_loss=True, nonfinite_batch=True)):
        policy.decide(fault, True)  # a state fault, then a fault of the data
    resumed = _resumed(policy)
    assert (resumed.last_fault_step, resumed.last_trajectory_fault) == (220, 100)
    assert resumed.decide(StepHealth(250, nonfinite_params=True), True).lr_power == 0  # isolated: 150 steps after
    older = _resumed(policy, drop="last_trajectory_fault")  # a checkpoint of before
    assert older.last_trajectory_fault == 220  # every fault it counted is taken as the trajectory's
    assert older.decide(StepHealth(250, nonfinite_params=True), True).lr_power == 1


def test_a_divergence_among_corrupt_batches_is_not_sudden():
    """A stretch of corrupt batches (inputs x1e4, finite) diagnosed *data* and skipped, then one the diagnosis
    missed: no calm stretch came before it, so its rollback cuts the LR (data_burst.py: read as "sudden", the LR
    kept, the next ones spent the budget and NaNGuard halted one run inside the shard)."""
    policy = GuardPolicy("auto", repeat_window=100)
    for step in (302, 303, 304, 305):
        assert policy.decide(StepHealth(step, loss_divergence=True, diagnosis="data"), True).action is A.SKIP
    missed = policy.decide(StepHealth(306, loss_divergence=True, lr_rose=False), True)
    assert missed.action is A.ROLLBACK
    assert missed.lr_power >= 1  # cut (the divergence streak may cut it harder)
    assert "the learning rate looks too high" in missed.reason
    calm = GuardPolicy("auto", repeat_window=100)  # the same divergence out of calm steps: sudden, LR kept
    assert calm.decide(StepHealth(306, loss_divergence=True, lr_rose=False), True).lr_power == 0
