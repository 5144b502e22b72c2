"""A small causal transformer whose attention masks hold -inf trains 200 steps under the default callbacks with zero
guard events (legitimate infinities are never a fault), whether the mask is a non-persistent buffer or a persistent
one (``register_buffer``'s default: it is in the state dict, so in every snapshot and checkpoint). A persistent -inf
mask made every snapshot look damaged, and the guard halted the run at step 0 ("no finite snapshot to roll back
to"; found by a helper on ``nn.Transformer.generate_square_subsequent_mask``). A NaN in such a mask is a fault."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard, default_callbacks
from tests.models import make_trainer

VOCAB, LENGTH = 12, 10


class TinyCausalLM(pl.LightningModule):
    """Predict the next token of sequences that repeat with period 3 (learnable only by looking back)."""

    def __init__(self, persistent: bool = False, nan_at: int | None = None) -> None:
        super().__init__()
        self.nan_at = nan_at
        self.embed = nn.Embedding(VOCAB, 16)
        self.pos = nn.Parameter(torch.zeros(LENGTH, 16))
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, VOCAB)
        mask = nn.Transformer.generate_square_subsequent_mask(LENGTH - 1)
        self.register_buffer("mask", mask, persistent=persistent)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        if self.global_step == self.nan_at and not getattr(self, "_spoiled", False):
            self._spoiled = True  # once: a transient fault (a rollback to before it does not spoil it again)
            self.mask[0, 0] = float("nan")
        x, y = tokens[:, :-1], tokens[:, 1:]
        assert torch.isinf(self.mask).any()  # the mask really carries -inf
        h = self.encoder(self.embed(x) + self.pos[: x.shape[1]], mask=self.mask, is_causal=True)
        loss = nn.functional.cross_entropy(self.head(h).reshape(-1, VOCAB), y.reshape(-1))
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        motifs = torch.randint(0, VOCAB, (256, 3), generator=g)
        tokens = motifs.repeat(1, LENGTH // 3 + 1)[:, :LENGTH]
        return DataLoader(TensorDataset(tokens), batch_size=16, shuffle=True, generator=g)


@pytest.mark.parametrize("persistent", [False, True])
def test_minus_inf_masks_run_200_steps_with_zero_events(tmp_path, persistent: bool) -> None:
    torch.manual_seed(0)
    model = TinyCausalLM(persistent)
    callbacks = default_callbacks()
    trainer = make_trainer(tmp_path, callbacks, max_steps=200, log_every_n_steps=50)
    trainer.fit(model)
    guard = next(c for c in callbacks if isinstance(c, NaNGuard))
    assert trainer.global_step == 200
    assert guard.events == []
    assert guard.skipped_steps == 0
    assert guard.lr_scale == 1.0
    first, last = sum(model.losses[:10]) / 10, sum(model.losses[-10:]) / 10
    assert last < 0.75 * first  # it learns (chance is log 12 = 2.48; here about 1.5 after 200 steps)


def test_a_nan_in_a_persistent_minus_inf_mask_is_still_a_fault(tmp_path) -> None:
    """The mask's infinities are the model's own; a NaN written into it is not: the guard restores the mask."""
    torch.manual_seed(0)
    model = TinyCausalLM(persistent=True, nan_at=120)
    guard = NaNGuard()
    trainer = make_trainer(tmp_path, [guard], max_steps=160)
    trainer.fit(model)
    acts = [e for e in guard.events if e["kind"] != "warn"]
    assert acts, "the NaN went unnoticed"
    # (with is_causal=True the kernel need not read the mask, so the loss may stay finite: the NaN is found no later
    # than the next snapshot, step 150, which is never taken of a damaged state)
    assert 120 <= acts[0]["step"] <= 150
    assert acts[0]["kind"] == "rollback"
    assert acts[0]["cause"] == "nonfinite_buffers"
    assert not torch.isnan(model.mask).any()  # the snapshot's mask is back
    assert torch.isinf(model.mask).any()
    assert trainer.global_step == 160
