"""The options every guard shares, checked in one place (as ``core/clip/_options.py`` does for clipping).

``NaNGuard``, ``GradGuard`` and ``FabricGradGuard`` take the same guard options; :func:`check_guard_options`
validates them once, naming the adapter in every message, and returns a :class:`GuardOptions` the engine reads.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

from lightning_gradguard.core._arg_checks import check_bool, check_choice, check_int, check_number
from lightning_gradguard.core.guard._policy import POLICIES

ESCALATIONS = ("rollback", "halt")
SNAPSHOT_SOURCES = ("auto", "memory", "checkpoint")


@dataclass
class GuardOptions:
    """A guard's checked options (see ``NaNGuard`` for what each means).

    ``snapshot`` and ``save_bad_batch`` apply where the adapter has checkpoint files and batches (the Trainer);
    ``owner`` names the adapter in events, warnings and errors; ``report_name`` is the stem of the halt report.
    """

    action: str = "auto"
    lr_factor: float = 0.5
    max_consecutive_skips: int = 3
    escalate_to: str = "rollback"
    snapshot: str = "auto"
    snapshot_every_n_steps: int = 50
    snapshot_confirm_steps: int = 10
    shard_snapshots: bool = True
    snapshot_budget_mb: float | None = None
    max_rollbacks: int = 3
    check_params: bool = True
    divergence: bool = True
    stability: bool = True
    spike_zscore: float | None = None
    spike_window: int = 100
    amp_scale_floor: float = 2.0**-24  # the smallest fp16 subnormal: below it every scaled gradient underflows
    amp_max_halvings: int | None = 24  # overflow steps in a row (the scale halved each time): a collapse
    raise_on_halt: bool = True
    save_bad_batch: bool = False
    report_dir: str | None = None
    log_every_n_steps: int | None = None
    history_size: int = 50
    min_lr_scale: float = 1e-3
    lr_recovery_steps: int | None = 1000
    rollback_refill_steps: int | None = 100
    rerun: bool = True
    bad_batch_window: int = 0
    owner: str = "NaNGuard"
    report_name: str = "nan_guard_report"

    def as_dict(self) -> dict[str, Any]:
        """The options as plain values, without ``owner`` and ``report_name`` (the adapter's own attributes)."""
        out = asdict(self)
        del out["owner"], out["report_name"]
        return out


#: the option names an adapter exposes as attributes
OPTION_NAMES = tuple(f.name for f in fields(GuardOptions) if f.name not in ("owner", "report_name"))


def check_guard_options(owner: str, report_name: str, **values: Any) -> GuardOptions:
    """Validate the guard options in ``values`` (missing ones take their defaults); raises ``TypeError`` or
    ``ValueError`` naming ``owner``, the argument, what is allowed and what was given."""
    unknown = set(values) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"{owner}: unknown guard option(s) {sorted(unknown)}; allowed: {', '.join(OPTION_NAMES)}")
    v = {**GuardOptions().as_dict(), **values}
    o = owner
    pos: dict[str, Any] = {"low": 0.0, "low_open": True, "high_open": True, "owner": o}
    pos["describe"] = "a finite number > 0"
    report_dir = v["report_dir"]
    if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
        raise TypeError(f"{o}: report_dir must be a path or None (str or os.PathLike), got {type(report_dir).__name__}")
    if report_dir is not None and os.path.exists(report_dir) and not os.path.isdir(report_dir):
        raise ValueError(f"{o}: report_dir must be a directory (or a path to create), got the file {report_dir!s}")
    return GuardOptions(
        action=check_choice("action", v["action"], POLICIES, owner=o),
        lr_factor=cast(float, check_number("lr_factor", v["lr_factor"], low=0.0, high=1.0, low_open=True, owner=o)),
        max_consecutive_skips=check_int("max_consecutive_skips", v["max_consecutive_skips"], 0, owner=o),
        escalate_to=check_choice("escalate_to", v["escalate_to"], ESCALATIONS, owner=o),
        snapshot=check_choice("snapshot", v["snapshot"], SNAPSHOT_SOURCES, owner=o),
        snapshot_every_n_steps=check_int("snapshot_every_n_steps", v["snapshot_every_n_steps"], 1, owner=o),
        snapshot_confirm_steps=check_int("snapshot_confirm_steps", v["snapshot_confirm_steps"], 0, owner=o),
        shard_snapshots=check_bool("shard_snapshots", v["shard_snapshots"], owner=o),
        snapshot_budget_mb=check_number("snapshot_budget_mb", v["snapshot_budget_mb"], allow_none=True, **pos),
        max_rollbacks=check_int("max_rollbacks", v["max_rollbacks"], 0, owner=o),
        check_params=check_bool("check_params", v["check_params"], owner=o),
        divergence=check_bool("divergence", v["divergence"], owner=o),
        stability=check_bool("stability", v["stability"], owner=o),
        spike_zscore=check_number("spike_zscore", v["spike_zscore"], allow_none=True, **pos),
        spike_window=check_int("spike_window", v["spike_window"], 2, high=10**6, owner=o),
        amp_scale_floor=cast(float, check_number("amp_scale_floor", v["amp_scale_floor"], **pos)),
        amp_max_halvings=check_int("amp_max_halvings", v["amp_max_halvings"], 1, True, owner=o),
        raise_on_halt=check_bool("raise_on_halt", v["raise_on_halt"], owner=o),
        save_bad_batch=check_bool("save_bad_batch", v["save_bad_batch"], owner=o),
        report_dir=None if report_dir is None else os.fspath(report_dir),
        log_every_n_steps=check_int("log_every_n_steps", v["log_every_n_steps"], 1, True, owner=o),
        history_size=check_int("history_size", v["history_size"], 1, high=10**6, owner=o),
        min_lr_scale=cast(
            float,
            check_number(
                "min_lr_scale",
                v["min_lr_scale"],
                low=0.0,
                high=1.0,
                low_open=True,
                owner=o,
                describe="a number in (0, 1]",
            ),
        ),
        lr_recovery_steps=check_int("lr_recovery_steps", v["lr_recovery_steps"], 1, True, owner=o),
        rollback_refill_steps=check_int("rollback_refill_steps", v["rollback_refill_steps"], 1, True, owner=o),
        rerun=check_bool("rerun", v["rerun"], owner=o),
        bad_batch_window=check_int("bad_batch_window", v["bad_batch_window"], 0, owner=o),
        owner=owner,
        report_name=report_name,
    )
