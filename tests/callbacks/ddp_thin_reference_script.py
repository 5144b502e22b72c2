"""2-process CPU DDP runs of the two "tested on the batch itself" rules (tests/callbacks/test_thin_reference.py's
cases, each rank fed the same batches, ``use_distributed_sampler=False``, so the all-reduced run is the one-process
run): a loss divergence judged against a thin reference (sorted bags with a summed loss, a first single item already
fitted) and a "no better than untrained" claim read from an easy first batch (Adam at batch size 4). Each case runs
with the rerun on and off (off: the old verdict must still act here, or the case proves nothing). Writes
``thin_rank<r>.json``. Run by tests/callbacks/test_thin_reference.py."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gradguard import NaNGuard  # noqa: E402
from tests.callbacks.test_thin_reference import SmallBatchRegression, SortedBagRegression  # noqa: E402
from tests.ddp_runner import end_distributed  # noqa: E402
from tests.models import make_trainer  # noqa: E402


def fit(out_dir: str, name: str, cls: type, steps: int, rerun: bool) -> dict:
    pl.seed_everything(0, verbose=False)
    model = cls(0)
    guard = NaNGuard(rerun=rerun, raise_on_halt=False)
    trainer = make_trainer(
        Path(out_dir, name), [guard], max_steps=steps, max_epochs=-1, logger=False, deterministic=True,
        strategy="ddp", devices=2, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {
        "events": [[e["step"], e["kind"], e["cause"], e.get("rule")] for e in guard.events],
        "val_mse": model.val_mse(),
        "checksum": float(weights.double().sum()),
        "rank": trainer.global_rank,
    }


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    results = {
        "thin": fit(out_dir, "thin", SortedBagRegression, 100, True),
        "thin_off": fit(out_dir, "thin_off", SortedBagRegression, 100, False),
        "untrained": fit(out_dir, "untrained", SmallBatchRegression, 200, True),
        "untrained_off": fit(out_dir, "untrained_off", SmallBatchRegression, 200, False),
    }
    rank = results["thin"]["rank"]
    Path(out_dir, f"thin_rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed(sys.argv[1])  # the last thing: gloo's teardown race (tests/ddp_runner.py)
