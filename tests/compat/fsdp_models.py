"""A small regression model sharded with FSDP2 (``fully_shard`` in ``configure_model``), for the sharded scripts.

Importable from subprocess scripts (no pytest import). The data of each rank is fixed by the rank (no sampler
involved), so a single-process reference can rebuild every rank's batch.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

IN_DIM = 6


def rank_batches(rank: int, n_batches: int = 40, batch_size: int = 8) -> TensorDataset:
    """The batches rank ``rank`` trains on (deterministic, distinct per rank)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n_batches * batch_size, IN_DIM, generator=g)
    y = (x[:, :1] * 0.7 - x[:, 1:2] * 0.3 + 0.1 * torch.randn(n_batches * batch_size, 1, generator=g)).tanh()
    return TensorDataset(x, y)


def build_net() -> nn.Sequential:
    """The unsharded network; ``torch.manual_seed(0)`` first gives the same weights in every process."""
    torch.manual_seed(0)
    # 16x1 output weight and 1-element bias: uneven shards (rank 1 holds an empty piece)
    return nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 1))


class ShardedRegression(pl.LightningModule):
    """MSE regression; FSDP2 over the data-parallel mesh dimension, one ``fully_shard`` per Linear and the root.

    Args:
        faults: ``{global_step: (rank, kind)}`` with kind ``"nan"`` (loss times NaN), ``"spike"`` (loss x 1e4) or
            ``"weight"`` (NaN written into that rank's local shard of ``net.0.weight`` before the forward pass: only
            a rollback can undo it) on that rank only.
        lr: Adam's learning rate.
    """

    def __init__(
        self, faults: dict[int, tuple[int, str]] | None = None, lr: float = 0.01, tensor_parallel: bool = False
    ) -> None:
        super().__init__()
        self.net = build_net()
        self.faults = dict(faults or {})
        self.lr = lr
        self.tensor_parallel = tensor_parallel

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if self.tensor_parallel:  # net.0 column-wise (rows split), net.2 row-wise (columns split, bias replicated)
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    @property
    def data_rank(self) -> int:
        """This rank's position along the data-parallel dimension (tensor-parallel peers see the same data)."""
        return self.device_mesh["data_parallel"].get_local_rank()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        rank, kind = self.faults.get(self.global_step, (None, None))
        mine = rank == self.global_rank  # the loss or the weights, not the data: tensor-parallel peers share inputs
        if mine and kind == "weight":
            with torch.no_grad():
                w = self.net[0].weight
                (w.to_local() if hasattr(w, "to_local") else w).fill_(float("nan"))
        loss = nn.functional.mse_loss(self(x), y)
        if mine and kind in ("nan", "spike"):
            loss = loss * (float("nan") if kind == "nan" else 1e4)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(rank_batches(self.data_rank), batch_size=8, shuffle=False)


def sharded_trainer(
    out_dir: Any,
    callbacks: list[pl.Callback],
    max_steps: int,
    tensor_parallel: bool = False,
    mesh: tuple[int, int] | None = None,
    **kwargs: Any,
) -> pl.Trainer:
    """Quiet gloo processes with ``ModelParallelStrategy``: a (2, 1) data x tensor parallel mesh, (1, 2) with
    ``tensor_parallel``, or ``mesh`` (one process per mesh element)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    dp, tp = mesh or ((1, 2) if tensor_parallel else (2, 1))
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=dp * tp,
        strategy=ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp),
        max_steps=max_steps,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=str(out_dir),
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
