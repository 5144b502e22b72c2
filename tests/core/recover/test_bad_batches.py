"""The bad-batch record in pure PyTorch: positions, contents, windows, JSON lines and checkpoint state."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_gradguard.core.recover._bad_batches import RECORD_FILE, BadBatch, BadBatchRecord, fingerprint


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, generator=g), torch.randint(0, 5, (4,), generator=g)


def test_a_batch_is_matched_by_position_and_contents() -> None:
    record = BadBatchRecord()
    record.add(BadBatch(7, epoch=1, batch_idx=7, fingerprint=fingerprint(batch(0)), cause="nonfinite_loss"))
    assert record.covers(1, 7)
    assert record.covers(2, 7)  # any epoch: a loader that does not shuffle brings it back
    assert not record.covers(1, 8)
    assert record.match(3, 7, lambda: fingerprint(batch(0))) is not None
    assert record.match(1, 7, lambda: fingerprint(batch(0))) is not None
    assert record.match(1, 7, lambda: fingerprint(batch(1))) is None  # other samples at that position: not it


def test_the_digest_is_computed_only_at_a_recorded_position() -> None:
    record = BadBatchRecord()
    record.add(BadBatch(3, 0, 3, fingerprint(batch(0))))
    calls = []

    def digest() -> str:
        calls.append(1)
        return fingerprint(batch(0))

    assert record.match(0, 4, digest) is None
    assert calls == []


def test_fingerprints_tell_contents_and_order_apart_and_count_nonfinite_values() -> None:
    x, y = batch(0)
    assert fingerprint((x, y)) == fingerprint((x.clone(), y.clone()))
    assert fingerprint((x.flip(0), y)) != fingerprint((x, y))
    bad = x.clone()
    bad[0, 0] = float("nan")
    assert fingerprint((bad, y)) != fingerprint((x, y))
    assert fingerprint({"b": y, "a": x}) == fingerprint({"a": x, "b": y})


def test_a_rollback_window_covers_the_batches_after_the_fault_exactly() -> None:
    record = BadBatchRecord()
    record.add(BadBatch(10, 0, 10, "fp", action="rollback", window=3))
    assert [i for i in range(20) if record.covers(0, i)] == [10, 11, 12, 13]
    assert record.match(0, 12, lambda: "another") is not None  # the window is positions only
    assert record.match(0, 14, lambda: "fp") is None
    assert [i for i in range(20) if record.covers(1, i)] == [10]  # the window belongs to the fault's epoch


def test_transient_faults_and_duplicates_are_not_recorded() -> None:
    record = BadBatchRecord()
    assert not record.add(BadBatch(1, 0, 1, "fp", diagnosis="transient"))
    assert record.add(BadBatch(2, 0, 2, "fp", diagnosis="data"))
    assert not record.add(BadBatch(2, 0, 2, "fp", diagnosis="data"))
    assert len(record) == 1


def test_json_lines_round_trip_and_a_cut_file_keeps_its_whole_lines(tmp_path) -> None:
    record = BadBatchRecord()
    record.add(BadBatch(5, 0, 5, fingerprint(batch(0)), "nonfinite_loss", "data", "skip", sample_indices=[40, 41]))
    record.add(BadBatch(9, 1, 2, fingerprint(batch(1)), "nonfinite_grad", "state", "rollback", window=2))
    path = record.write(tmp_path)
    assert path == tmp_path / RECORD_FILE
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 9]
    again = BadBatchRecord()
    assert again.read(tmp_path) == 2
    assert [e.to_dict() for e in again.entries] == [e.to_dict() for e in record.entries]
    path.write_text(lines[0] + "\n" + lines[1][:20])  # a crash mid-write
    cut = BadBatchRecord()
    assert cut.read(path) == 1


def test_state_dict_round_trip() -> None:
    record = BadBatchRecord()
    record.add(BadBatch(5, 0, 5, "fp", window=1))
    other = BadBatchRecord()
    other.load_state_dict(record.state_dict())
    assert other.covers(0, 6)
    assert [e.to_dict() for e in other.entries] == [e.to_dict() for e in record.entries]


def test_bad_window_is_named() -> None:
    with pytest.raises(ValueError, match="window"):
        BadBatchRecord(window=-1)
