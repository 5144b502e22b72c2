"""2-process CPU DDP run of a corrupt shard (benchmarks/data_burst.py's model, Adam, seed 0; each rank fed the same
stream, ``use_distributed_sampler=False``): the finite divergence's rerun diagnosis runs on every rank together and
both ranks reach the same verdicts. Writes ``burst_rank<r>.json``. Run by tests/callbacks/test_data_burst.py."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_burst import STEPS, Shard  # noqa: E402

from lightning_gradguard import NaNGuard  # noqa: E402
from tests.ddp_runner import end_distributed  # noqa: E402
from tests.models import make_trainer  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = Shard(0, "adam")
    guard = NaNGuard()
    trainer = make_trainer(
        out_dir, [guard], max_steps=STEPS, logger=False, deterministic=True, strategy="ddp", devices=2,
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    Path(out_dir, f"burst_rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "events": [[e["step"], e["kind"], e.get("diagnosis")] for e in guard.events],
                "accuracy": model.accuracy(),
                "checksum": float(weights.double().sum()),
                "steps": trainer.global_step,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed(sys.argv[1])  # the last thing: gloo's teardown race (tests/ddp_runner.py)
