"""A small causal transformer whose attention masks hold -inf trains 200 steps under the default callbacks with zero
guard events (legitimate infinities are never a fault)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard, default_callbacks
from tests.models import make_trainer

VOCAB, LENGTH = 12, 10


class TinyCausalLM(pl.LightningModule):
    """Predict the next token of sequences that repeat with period 3 (learnable only by looking back)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.pos = nn.Parameter(torch.zeros(LENGTH, 16))
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(LENGTH - 1), persistent=False)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
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


def test_minus_inf_masks_run_200_steps_with_zero_events(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyCausalLM()
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
