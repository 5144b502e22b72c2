"""Split snapshots of a replicated state: each rank's part is about 1/world of the bytes, and the parts of all ranks
put together give the state back bit for bit, whatever the dtypes, shapes and sizes (one tensor larger than all
the others together included). The collective itself runs in ``tests/compat/test_ddp_split_snapshots.py``."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradguard.core.recover._replica_shards import ReplicaSharding, ShardedState
from lightning_gradguard.core.recover._snapshot import restore_snapshot, take_snapshot

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool, torch.complex64]


def _bits_equal(a, b):
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_bits_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_bits_equal(x, y) for x, y in zip(a, b))
    return a == b


def _parts(state, world):
    return [ShardedState.take(state, ReplicaSharding(r, world)) for r in range(world)]


def _rebuilt(parts):
    return parts[0].rebuild([p.piece for p in parts])


def _random_tensor(dtype, shape, gen):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype == torch.int64:
        return torch.randint(-(2**40), 2**40, shape, generator=gen)
    t = torch.randn(shape, generator=gen, dtype=torch.float64 if not dtype.is_complex else torch.complex128)
    return t.to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=0, max_size=6),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=6, max_size=6),
    world=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_parts_of_every_rank_rebuild_the_state_bit_for_bit(shapes, dtypes, world, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = [_random_tensor(dtypes[i], tuple(s), gen) for i, s in enumerate(shapes)]
    tensors.append(torch.tensor(float("nan")))  # NaN bits survive (a float comparison would not show it)
    # a tensor met twice (tied weights) is stored once and comes back in both places
    state = {"w": tensors, "step": 7, "nested": ({"lr": 0.1, "t": tensors[-1:]},), "name": "adam"}
    parts = _parts(state, world)
    total = sum(t.numel() * t.element_size() for t in tensors)
    assert all(p.total_bytes == total for p in parts)
    assert all(p.nbytes == math.ceil(total / world) for p in parts)
    out = _rebuilt(parts)
    assert _bits_equal(out, state)
    assert out["nested"][0]["t"][0] is out["w"][-1]


def test_a_non_contiguous_tensor_and_one_dominating_tensor_split_evenly():
    big = torch.randn(1000, 64)  # 256 kB: far more than the rest together
    state = {"big": big, "small": [torch.randn(3, 4).t(), torch.arange(5)]}
    parts = _parts(state, 2)
    total = parts[0].total_bytes
    assert [p.nbytes for p in parts] == [math.ceil(total / 2)] * 2  # half each, the big tensor cut in the middle
    out = _rebuilt(parts)
    assert _bits_equal(out, {"big": big, "small": [state["small"][0].contiguous(), state["small"][1]]})
    assert out["big"].data_ptr() != big.data_ptr()  # fresh tensors


def test_a_part_is_a_copy_later_changes_to_the_state_do_not_reach_it():
    w = torch.zeros(10)
    parts = _parts({"w": w}, 2)
    w.add_(1.0)
    assert torch.equal(_rebuilt(parts)["w"], torch.zeros(10))


def test_split_snapshot_holds_half_and_restores_exactly_on_one_rank_group():
    # world 1 through the Snapshot API: a whole copy (no split, nothing to gather)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    snap = take_snapshot(model, [opt], sharding=ReplicaSharding(0, 1))
    assert snap.sharded is None
    assert snap.whole() is snap


def test_split_snapshot_restores_from_rebuilt_parts():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sch = torch.optim.lr_scheduler.StepLR(opt, 2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
        sch.step()
    snaps = [take_snapshot(model, [opt], [sch], step=3, sharding=ReplicaSharding(r, 2)) for r in range(2)]
    whole = take_snapshot(model, [opt], [sch], step=3)
    assert all(s.sharded is not None and s.model == {} for s in snaps)
    assert all(s.nbytes() <= 0.51 * whole.nbytes() + 1 for s in snaps)
    model_sd, opts, scheds, extra = snaps[0].sharded.rebuild([s.sharded.piece for s in snaps])
    assert _bits_equal(model_sd, whole.model)
    assert _bits_equal(opts, whole.optimizers)
    assert _bits_equal(scheds, whole.schedulers)
    assert extra == {}
    # a restore from the rebuilt state gives back the snapshot's state after more training
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
        sch.step()
    whole.model, whole.optimizers, whole.schedulers = model_sd, opts, scheds
    restore_snapshot(whole, model, [opt], [sch])
    assert _bits_equal(model.state_dict(), model_sd)
    assert _bits_equal(opt.state_dict(), opts[0])
    assert sch.state_dict() == scheds[0]


def test_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank must be in"):
        ReplicaSharding(2, 2)


def test_one_part_of_a_one_rank_state_gathers_alone():
    state = [{"w": torch.randn(3, 4)}, [{"m": torch.randn(5)}], 7]
    part = ShardedState.take(state, ReplicaSharding(0, 1))
    model = part.gather(part=0)
    assert _bits_equal(model, state[0])
    assert _bits_equal(part.gather(), state)
