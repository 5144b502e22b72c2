"""The examples' data modules: the injected fault scales exactly one training batch's inputs, and is checked."""

from __future__ import annotations

import pytest
import torch

from lightning_gradguard.examples.lstm import AddingProblemDataModule


def _batches(dm, n):
    loader = dm.train_dataloader()
    out = []
    while len(out) < n:  # across epochs, as a fit reads them
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_fault_scales_the_inputs_of_one_batch_counted_across_epochs():
    kwargs = {"seq_len": 6, "num_train": 64, "num_val": 16, "batch_size": 16, "seed": 0}
    clean = _batches(AddingProblemDataModule(**kwargs), 10)  # 4 batches per epoch: batch 6 is in the second epoch
    faulty_dm = AddingProblemDataModule(**kwargs, fault_batch=6, fault_scale=1000.0)
    faulty = _batches(faulty_dm, 10)
    for i, ((xc, yc), (xf, yf)) in enumerate(zip(clean, faulty)):
        torch.testing.assert_close(yf, yc)  # targets untouched
        torch.testing.assert_close(xf, xc * 1000.0 if i == 6 else xc)
    assert faulty_dm.batches_served == 10
    # the dataset itself is never changed, and a new loader starts a new stream (the fault comes again)
    fresh = AddingProblemDataModule(**kwargs)
    fresh.setup()
    torch.testing.assert_close(faulty_dm.train_set.tensors[0], fresh.train_set.tensors[0])
    again = _batches(faulty_dm, 7)
    torch.testing.assert_close(again[6][0], clean[6][0] * 1000.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fault_batch": -1}, "fault_batch"),
        ({"fault_batch": 1.5}, "fault_batch"),
        ({"fault_batch": True}, "fault_batch"),
        ({"fault_scale": float("nan")}, "fault_scale"),
        ({"fault_scale": "10"}, "fault_scale"),
    ],
)
def test_fault_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AddingProblemDataModule(**kwargs)


def test_digits_fault_too():
    pytest.importorskip("sklearn")
    from lightning_gradguard.examples.deep_cnn import DigitsDataModule

    clean = _batches(DigitsDataModule(seed=1), 3)
    faulty = _batches(DigitsDataModule(seed=1, fault_batch=2, fault_scale=-5.0), 3)
    torch.testing.assert_close(faulty[1][0], clean[1][0])
    torch.testing.assert_close(faulty[2][0], clean[2][0] * -5.0)
