"""Snapshots are true copies (no aliasing with live state, before or after a restore) and the store's trust rule."""

import math

import pytest
import torch

from lightning_gradguard.core.recover._snapshot import SnapshotStore, clone_state, restore_snapshot, take_snapshot


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=50)
    return model, opt, sch


def _train(model, opt, sch, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sch.step()


def _state(model, opt, sch):
    return clone_state(model.state_dict()), clone_state(opt.state_dict()), clone_state(sch.state_dict())


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_snapshot_is_not_mutated_by_later_steps_and_restores_exactly():
    model, opt, sch = _setup()
    _train(model, opt, sch, 3)
    before = _state(model, opt, sch)
    snap = take_snapshot(model, [opt], [sch], step=3)
    _train(model, opt, sch, 4)
    assert _equal((snap.model, snap.optimizers[0], snap.schedulers[0]), before)  # untouched by training
    assert not _equal(_state(model, opt, sch)[0], before[0])
    restore_snapshot(snap, model, [opt], [sch])
    assert _equal(_state(model, opt, sch), before)


def test_restore_twice_from_one_snapshot_and_continue_like_reference():
    model, opt, sch = _setup()
    _train(model, opt, sch, 3)
    snap = take_snapshot(model, [opt], [sch], step=3)
    _train(model, opt, sch, 2, seed=5)
    restore_snapshot(snap, model, [opt], [sch])
    _train(model, opt, sch, 2, seed=6)  # would mutate the snapshot if restore aliased it
    restore_snapshot(snap, model, [opt], [sch])
    _train(model, opt, sch, 4, seed=7)

    ref_model, ref_opt, ref_sch = _setup()
    _train(ref_model, ref_opt, ref_sch, 3)
    _train(ref_model, ref_opt, ref_sch, 4, seed=7)
    assert _equal(_state(model, opt, sch), _state(ref_model, ref_opt, ref_sch))


def test_live_state_shares_no_tensor_with_snapshot():
    model, opt, sch = _setup()
    _train(model, opt, sch, 2)
    snap = take_snapshot(model, [opt], [sch])
    restore_snapshot(snap, model, [opt], [sch])
    snap_ptrs = {t.data_ptr() for st in snap.optimizers[0]["state"].values() for t in st.values() if t.numel()}
    live_ptrs = {t.data_ptr() for st in opt.state.values() for t in st.values() if t.numel()}
    assert snap_ptrs
    assert not snap_ptrs & live_ptrs
    assert sch.base_lrs is not snap.schedulers[0]["base_lrs"]
    assert all(t.device.type == "cpu" for t in snap.model.values())
    assert snap.nbytes() > 0
    assert snap.describe()["step"] == 0


def test_extra_state_and_count_mismatch():
    model, opt, sch = _setup()
    snap = take_snapshot(model, [opt], [sch], extra={"precision": {"scale": 1024.0}}, meta={"lr_scale": 0.5})
    extra = restore_snapshot(snap, model, [opt], [sch])
    assert extra == {"precision": {"scale": 1024.0}}
    assert extra is not snap.extra
    with pytest.raises(ValueError, match="optimizer states"):
        restore_snapshot(snap, model, [], [sch])
    with pytest.raises(ValueError, match="scheduler states"):
        restore_snapshot(snap, model, [opt], [])


def _snap(step):
    return take_snapshot(torch.nn.Linear(1, 1), step=step)


def test_store_trusts_only_after_confirm_steps_and_keeps_newest_good():
    store = SnapshotStore(capacity=2, confirm_steps=3)
    store.update(_snap(0), trusted=True)
    store.update(_snap(5))
    assert store.compute().step == 0  # 5 not yet confirmed
    store.step_healthy(2)
    assert store.compute().step == 0
    store.step_healthy()
    assert store.compute().step == 5
    store.update(_snap(10))  # capacity 2: drops 0, keeps 5 (good) and 10
    assert [s.step for s in store.snapshots] == [5, 10]
    store.update(_snap(15))  # 10 and 15 unconfirmed: the good 5 is kept, 10 dropped
    assert [s.step for s in store.snapshots] == [5, 15]
    assert store.compute().step == 5
    store.discard_after(store.snapshots[0])
    assert [s.step for s in store.snapshots] == [5]
    meta = store.state_dict()
    fresh = SnapshotStore()
    fresh.load_state_dict(meta)
    assert fresh.confirm_steps == 3
    assert len(fresh) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"capacity": 0}, "capacity must be an int >= 1"), ({"confirm_steps": -1}, "confirm_steps must be an int >= 0")],
)
def test_store_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnapshotStore(**kwargs)


def test_store_with_snapshots_round_trips_through_a_weights_only_checkpoint(tmp_path):
    """What a resumed run needs to roll back as the uninterrupted one would: every stored snapshot, its confirmation
    count and LR scale, through ``torch.save``/``torch.load(weights_only=True)``, sharing nothing with the store."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=50)
    store = SnapshotStore(capacity=2, confirm_steps=3)
    for step in range(8):
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        sch.step()
        opt.zero_grad()
        if step in (2, 6):
            store.update(take_snapshot(model, [opt], [sch], step=step + 1, meta={"lr_scale": 0.5}), trusted=step == 2)
        store.step_healthy()
    path = tmp_path / "store.pt"
    torch.save(store.state_dict(with_snapshots=True), path)
    fresh = SnapshotStore()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert [s.describe() for s in fresh.snapshots] == [s.describe() for s in store.snapshots]
    assert (fresh.capacity, fresh.confirm_steps, fresh.compute().step) == (2, 3, 3)
    for mine, theirs in zip(fresh.snapshots, store.snapshots):
        assert _equal(mine.model, theirs.model)
        assert _equal(mine.optimizers, theirs.optimizers)
        assert _equal(mine.schedulers, theirs.schedulers)
    # restoring the loaded snapshot gives what restoring the original gives, and changes neither
    restore_snapshot(fresh.snapshots[0], model, [opt], [sch])
    after_fresh = (clone_state(model.state_dict()), clone_state(opt.state_dict()), sch.state_dict())
    restore_snapshot(store.snapshots[0], model, [opt], [sch])
    assert _equal(after_fresh[0], model.state_dict())
    assert _equal(after_fresh[1], opt.state_dict())
    assert after_fresh[2] == sch.state_dict()
    state = store.state_dict(with_snapshots=True)
    state["saved"][0]["model"]["0.weight"].fill_(7.0)  # the state is a copy
    assert not torch.equal(
        store.snapshots[0].model["0.weight"], torch.full_like(state["saved"][0]["model"]["0.weight"], 7.0)
    )
    assert "saved" not in store.state_dict()  # metadata only by default (what callback state held so far)


class _Reassigning(torch.nn.Module):
    """Running statistics kept the way some user code keeps them: the buffer *reassigned* in forward
    (``self.mu = ...``), beside integer, bool and complex buffers updated in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mu", torch.zeros(3))
        self.register_buffer("count", torch.zeros((), dtype=torch.int32))
        self.register_buffer("seen", torch.zeros(3, dtype=torch.bool))
        self.register_buffer("phase", torch.zeros(3, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mu = 0.9 * self.mu + 0.1 * x.mean(0)  # a new tensor each step
        self.count += 1
        self.seen |= x.mean(0) > 0
        self.phase += torch.complex(x.mean(0), x.mean(0))
        return x - self.mu


def test_buffer_copy_follows_reassigned_buffers_and_keeps_every_dtype() -> None:
    from lightning_gradguard.core.recover._snapshot import BufferCopy

    m = _Reassigning()
    copy = BufferCopy()
    m(torch.ones(4, 3))  # a healthy step
    copy.save(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.full((4, 3), math.nan))  # the bad batch: mu reassigned to NaN, the others changed in place
    assert copy.restore()
    for key, value in before.items():
        torch.testing.assert_close(m.state_dict()[key], value, rtol=0, atol=0, equal_nan=False, msg=key)
    # the next step saves the restored state (the buffers found again where the forward had replaced one)
    m(torch.ones(4, 3))
    copy.save(m)
    after = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.full((4, 3), 2.0))
    copy.restore()
    for key, value in after.items():
        torch.testing.assert_close(m.state_dict()[key], value, rtol=0, atol=0, msg=key)
