"""2-process CPU FSDP2 run (``ModelParallelStrategy`` + ``fully_shard``, gloo) with all three gradguard callbacks.

Several fits in the same two processes:

- ``norm``: the fixed ``norm`` clipper (max_norm 0.5) and the monitor (TensorBoard, with gradient-value
  histograms and the gradient-flow image), no faults. At every step the recorder writes
  the full weights before the update (gathered here, by the test's recorder only) so that the test can rebuild the
  gradients in one process and compare norms and clip coefficients against that reference.
- ``tp``: as ``norm`` on a (1, 2) data x tensor parallel mesh: ``net.0`` column-wise (rows split), ``net.2``
  row-wise (columns split, bias replicated), then ``fully_shard`` over the size-1 data dimension (2-D placements).
- ``value``, ``per_parameter``, ``percentile``, ``agc``: the other clipping methods, 4 steps each (a spike on rank 1
  at step 2); the recorder gathers the post-clip gradients so the test can check each method's bound.
- ``resume``: fit -> distributed checkpoint -> resume (see ``fsdp_resume_script.py``).
- ``faults``: monitor + zscore clipper + rollback guard; rank 1 alone gets a NaN loss at step 4 and a x1e4 loss
  spike at step 6. The recorder writes what every callback saw and did per step, and each rank's *local* shards of
  the weights and Adam state after every step, so the test can check the rollback bit for bit, shard by shard.

Run by tests/compat/test_fsdp.py through tests/ddp_runner.py. Writes ``<fit>_rank<r>.json`` into the output dir.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gradguard import AdaptiveGradientClipping, GradientNormMonitor, NaNGuard  # noqa: E402
from lightning_gradguard.callbacks._step_context import grad_stats_for  # noqa: E402
from lightning_gradguard.core.measure._sharded import unit_norms  # noqa: E402
from tests.compat.common import build_all, split  # noqa: E402
from tests.compat.fsdp_models import ShardedRegression, sharded_trainer  # noqa: E402
from tests.compat.fsdp_resume_script import main as resume_main  # noqa: E402
from tests.ddp_runner import end_distributed  # noqa: E402


def _floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().flatten().tolist()]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _field(obj, name):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


class Record(Callback):
    """Last in the callback list: what the gradguard callbacks measured and decided, on this rank."""

    def __init__(self, callbacks, gather_weights: bool) -> None:
        self.mon, self.clip, self.guard = split(callbacks)
        self.gather_weights = gather_weights
        self.rows: list[dict] = []
        self.local_states: dict[int, dict] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        stats = grad_stats_for(trainer, pl_module, optimizer)  # the cached measurement every callback used
        rec = self.clip.last[0]
        coef = _field(rec, "coefficient")
        row = {
            "step": trainer.global_step,
            "names": stats.names,
            "grad_norm": float(stats.total_norm64),
            "param_norms": _floats(stats.param_norms64),
            "layer_names": stats.layer_names,
            "layer_norms": _floats(stats.layer_norms),
            "clip_grad_norm": float(_field(rec, "grad_norm")),
            "threshold": float(_field(rec, "threshold")),
            "coefficient": None if coef is None else float(coef),
            "clipped": bool(_field(rec, "clipped")),
            "monitor_grad_norm": self.mon.last_grad_norm,
            "grad_is_dtensor": all(type(g).__name__ == "DTensor" for g in stats.grads),
        }
        if self.gather_weights:  # test-side gathers (collectives on both ranks), never on gradguard's path
            row["full_weights"] = {n: _floats(p.full_tensor()) for n, p in zip(stats.names, stats.params)}
            post = torch.cat([g.full_tensor().flatten().double() for g in stats.grads])
            row["post_clip_norm"] = float(post.norm())
            # AGC's unit norms of the (post-clip) gradients, this rank's rows, and the layouts they came from
            row["units"] = {n: _floats(unit_norms(g)) for n, g in zip(stats.names, stats.grads)}
            row["post_full"] = {n: _floats(g.full_tensor()) for n, g in zip(stats.names, stats.grads)}
            row["placements"] = {n: str(getattr(g, "placements", "plain")) for n, g in zip(stats.names, stats.grads)}
        self.rows.append(row)

    def on_train_start(self, trainer, pl_module):
        self._record_local_state(trainer, pl_module)  # key 0: the state a rollback to the start restores

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.rows and "reason" not in self.rows[-1]:
            reason = getattr(self.guard, "reason", None)
            self.rows[-1]["reason"] = getattr(reason, "value", str(reason))
        self._record_local_state(trainer, pl_module)

    def _record_local_state(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.local_states[trainer.global_step] = {
            "weights": {n: _floats(_local(p)) for n, p in pl_module.named_parameters()},
            "opt": [_floats(_local(t)) for s in opt.state.values() for t in s.values() if torch.is_tensor(t)],
            "lr": opt.param_groups[0]["lr"],
        }


#: Every other clipping method, one short fit each, with the bound it guarantees on the full (gathered) gradients.
METHODS = {
    "value": {"clip_value": 0.05},
    "per_parameter": {"max_norm": 0.1},
    "percentile": {"percentile": 50.0, "window": 4, "warmup_steps": 2},
    "agc": {"clipping": 0.01},
}


class MethodRecord(Callback):
    """After the clipper: the full post-clip gradients, measured here (test-side gathers on both ranks)."""

    def __init__(self, clip) -> None:
        self.clip = clip
        self.rows: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        stats = grad_stats_for(trainer, pl_module, optimizer)
        full = [g.full_tensor().double() for g in stats.grads]
        weights = [p.full_tensor().double() for p in stats.params]
        agc = []
        for g, w in zip(full, weights):  # unit = output row (2+ dims) or the whole tensor
            gn = g.flatten(1).norm(dim=1) if g.ndim > 1 else g.norm().reshape(1)
            wn = w.flatten(1).norm(dim=1) if w.ndim > 1 else w.norm().reshape(1)
            agc += (gn / (0.01 * wn.clamp_min(1e-3))).tolist()
        rec = self.clip.last[0]
        self.rows.append(
            {
                "step": trainer.global_step,
                "pre_clip_norm": float(stats.total_norm64),
                "max_abs": max(float(g.abs().max()) if g.numel() else 0.0 for g in full),
                "param_norms": [float(g.norm()) for g in full],
                "post_clip_norm": float(torch.cat([g.flatten() for g in full]).norm()),
                "agc_ratio_max": max(agc),
                "threshold": None if _field(rec, "threshold") is None else float(_field(rec, "threshold")),
                "clipped": bool(_field(rec, "clipped")),
            }
        )


def fit_method(out_dir: str, method: str) -> None:
    torch.manual_seed(0)
    clip = AdaptiveGradientClipping(method, log_every_n_steps=1, **METHODS[method])
    record = MethodRecord(clip)
    trainer = sharded_trainer(out_dir, [clip, record], max_steps=4)
    trainer.fit(ShardedRegression(faults={2: (1, "spike")}))
    Path(out_dir, f"{method}_rank{trainer.global_rank}.json").write_text(
        json.dumps({"rank": trainer.global_rank, "rows": record.rows})
    )


def fit(out_dir: str, name: str) -> None:
    if name == "resume":  # fit -> distributed checkpoint -> resume (fsdp_resume_script.py)
        resume_main(out_dir, prefix="resume_rank")
        return
    if name in METHODS:
        fit_method(out_dir, name)
        return
    torch.manual_seed(0)
    tensor_parallel = name in ("tp", "mesh2x2")
    if name in ("norm", "tp", "mesh2x2"):
        callbacks = [
            GradientNormMonitor(log_every_n_steps=1, flow_every_n_logs=1, log_grad_histograms=True),
            AdaptiveGradientClipping("norm", max_norm=0.5, log_every_n_steps=1),
            NaNGuard(action="skip", log_every_n_steps=1),
        ]
        model = ShardedRegression(tensor_parallel=tensor_parallel)
    else:
        callbacks = build_all(
            monitor={"flow_every_n_logs": 1},  # the gradient-flow capture (L1 and inf norms) on shards too
            guard={"snapshot_every_n_steps": 2, "snapshot_confirm_steps": 1},
        )
        model = ShardedRegression(faults={2: (1, "nan"), 4: (1, "weight"), 6: (1, "spike")})
    record = Record(callbacks, gather_weights=name != "faults")
    logger = TensorBoardLogger(out_dir, name=f"tb_{name}", version=0) if name == "norm" else False
    trainer = sharded_trainer(
        out_dir,
        [*callbacks, record],
        max_steps=8,
        tensor_parallel=tensor_parallel,
        logger=logger,
        mesh=(2, 2) if name == "mesh2x2" else None,
    )
    trainer.fit(model)
    _, clip, guard = split(callbacks)
    events = [{k: _field(e, k) for k in ("step", "kind", "cause", "snapshot_step")} for e in guard.events]
    for e in events:
        e["kind"], e["cause"] = (getattr(e[k], "value", e[k]) for k in ("kind", "cause"))
    full = {n: _floats(p.full_tensor()) for n, p in model.named_parameters()}
    Path(out_dir, f"{name}_rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "rank": trainer.global_rank,
                "global_step": trainer.global_step,
                "rows": record.rows,
                "local_states": {str(k): v for k, v in record.local_states.items()},
                "events": events,
                "rollbacks": guard.rollbacks,
                "final_full_weights": full,
            }
        )
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    for fit_name in sys.argv[2].split(",") if len(sys.argv) > 2 else ("norm", "faults", "tp", *METHODS, "resume"):
        fit(sys.argv[1], fit_name)
    end_distributed(sys.argv[1])  # the last thing: gloo's teardown race (tests/ddp_runner.py)
