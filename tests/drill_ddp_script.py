"""2-process CPU DDP (gloo) fault drill: ``default_callbacks()`` + ``FaultDrill`` over every fault, two fits.

- ``one_rank``: every fault injected on rank 1 only (``FaultDrill(..., rank=1)``): rank 0 must see the guard act
  through the all-reduced gradients and the guard's cross-rank agreement.
- ``every_rank``: the same faults on both ranks (``rank=None``).

``scale_collapse`` is in both: without a GradScaler (fp32 on CPU) it must be reported as skipped, with the reason.

Run by tests/test_drill.py through tests/ddp_runner.py (``strategy="ddp"`` inside pytest would re-run pytest in
rank 1). Writes ``<fit>_rank<r>.json`` per rank into the output directory: the drill's rows, its report, the guard's
events, what this rank injected itself and the final weights (DDP replicas: the same on both ranks).
"""

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradguard import FaultDrill, default_callbacks  # noqa: E402
from tests.ddp_runner import leave_process_group  # noqa: E402
from tests.models import TinyRegression, make_trainer  # noqa: E402

#: one fault every 15 steps from step 20 (the loss has settled); recovery judged 10 steps on (windows of 5 steps)
FAULTS = {
    "scale_collapse": 4,
    "nan_weight": 20,
    "nan_batch": 35,
    "inf_loss": 50,
    "transient": 65,
    "spike": 80,
    "bad_batches": [95, 96, 97],
}
RECOVERY_STEPS = 10
MAX_STEPS = 97 + RECOVERY_STEPS + 1


def run_drill(
    out_dir: str,
    name: str,
    rank: int | None,
    build_trainer: Callable[[str, list[Any]], Any],
    build_model: Callable[[], Any],
    extra: Callable[[Any], dict[str, Any]],
) -> None:
    """One drill fit over :data:`FAULTS` with ``default_callbacks()``; writes ``<name>_rank<r>.json`` (the drill's
    table and report, its injections on this rank, the guard's events, the warnings, and ``extra(model)``)."""
    torch.manual_seed(0)
    guard = {"snapshot_every_n_steps": 5, "snapshot_confirm_steps": 2}
    drill = FaultDrill(FAULTS, recovery_steps=RECOVERY_STEPS, rank=rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = build_trainer(out_dir, [*default_callbacks(guard_kwargs=guard), drill])
        model = build_model()
        trainer.fit(model)
    events = [{k: e.get(k) for k in ("step", "kind", "cause", "diagnosis")} for e in drill._guard.events]
    Path(out_dir, f"{name}_rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "rank": trainer.global_rank,
                "global_step": trainer.global_step,
                "rows": drill.table(),
                "report": drill.report(),
                "all_handled": drill.all_handled,
                "fired": {str(k): v for k, v in drill.fired.items()},  # this rank's own injections ("": injected here)
                "events": events,
                "other_events": [{k: e.get(k) for k in ("step", "kind", "cause")} for e in drill.other_events()],
                "warnings": [str(w.message) for w in caught if "FaultDrill" in str(w.message)],
                **extra(model),
            },
            default=str,
        )
    )


def fit(out_dir: str, name: str, rank: int | None) -> None:
    def build_trainer(directory: str, callbacks: list[Any]) -> Any:
        return make_trainer(directory, callbacks, max_steps=MAX_STEPS, logger=False, strategy="ddp", devices=2)

    def extra(model: Any) -> dict[str, Any]:
        return {
            "weights": [float(v) for p in model.parameters() for v in p.detach().flatten()],
            "weights_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        }

    run_drill(out_dir, name, rank, build_trainer, TinyRegression, extra)


def main(out_dir: str, fit: Callable[[str, str, int | None], None] = fit) -> None:
    """Two drills: every fault on rank 1 only, then on every rank."""
    torch.set_num_threads(1)
    fit(out_dir, "one_rank", 1)
    fit(out_dir, "every_rank", None)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # Lightning keeps its group after the fit
        # the last thing: gloo's teardown race (tests/ddp_runner.py); it aborted rank 0 after a finished drill
        leave_process_group(dist.get_rank(), dist.get_world_size(), out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
