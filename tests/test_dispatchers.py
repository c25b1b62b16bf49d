"""StandardDispatcher, AllToAllDispatcher and the collective helpers.

Single-process unit tests (groups ``None``) plus multi-process checks over gloo: many
cases per ``pool.run`` (the check functions live in ``tests/dispatcher_checks.py``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_a2a.dispatchers.alltoall import AllToAllDispatcher, AllToAllHandle, AllToAllLayoutError
from moe_a2a.dispatchers import (
    BatchInfo,
    CombineInput,
    DispatcherError,
    DispatcherSetup,
    DispatchFormat,
    StandardDispatchOutput,
    TopK,
)
from moe_a2a.dispatchers.collectives import (
    all_gather_known_sizes,
    all_gather_v,
    all_reduce,
    all_to_all_counts,
    all_to_all_v,
    exchange_sizes,
    pack_topk,
    reduce_scatter_known_sizes,
    unpack_topk,
)
from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.dispatchers.standard import StandardDispatcher, StandardHandle

import dispatcher_checks as checks  # tests/ is on sys.path (pytest rootdir conftest)

# --------------------------------------------------------------------------- helpers


def _single(**kw) -> DispatcherSetup:
    args = {"groups": CommGroups.single(), "num_experts": 4, "top_k": 2, "hidden_size": 8}
    args.update(kw)
    return DispatcherSetup(**args)


def _roundtrip(dispatcher, case):
    x, ids, w = checks.make_batch(case, 0)
    batch = BatchInfo.single(x.shape[0])
    d = dispatcher.dispatch(x, TopK(ids, w), batch=batch)
    y = checks.apply_experts(d, dispatcher.placement.first_local_expert, 1.0, x.dtype)
    return x, ids, w, d, dispatcher.combine(CombineInput(expert_output=y, dispatch_output=d),
                                            batch=batch)


def _b(n):
    return BatchInfo.single(n)


# --------------------------------------------------------------------------- unit: collectives


def test_collectives_are_identity_without_a_group():
    x = torch.randn(3, 4)
    assert exchange_sizes(3, None) == [3]
    assert all_gather_v(x, None) is x
    assert all_gather_known_sizes(x, [3], None) is x
    assert reduce_scatter_known_sizes(x, [3], None) is x
    assert all_reduce(x, None) is x
    assert torch.equal(all_to_all_v(x, [3], [3], None), x)
    assert torch.equal(all_to_all_counts(torch.tensor([5]), None), torch.tensor([5]))
    empty = torch.empty(0, 4)
    assert all_gather_v(empty, None).shape == (0, 4)
    assert all_to_all_v(empty, [0], [0], None).shape == (0, 4)


def test_collective_argument_errors_are_value_errors():
    x = torch.randn(3, 4)
    with pytest.raises(DispatcherError, match="input_split_sizes"):
        all_to_all_v(x, [2], [2], None)
    with pytest.raises(DispatcherError, match="one rank"):
        all_to_all_v(x, [2], [3], None)
    with pytest.raises(DispatcherError, match="sizes"):
        all_to_all_v(x, [3, 0], [3], None)
    with pytest.raises(ValueError, match="num_rows=-1"):
        exchange_sizes(-1, None)


def test_pack_topk_roundtrip_is_exact():
    ids = torch.tensor([[0, -1], [2**24 - 1, 5]])
    w = torch.tensor([[0.25, 0.0], [1.0, 0.5]])
    packed = pack_topk(ids, w)
    assert packed.dtype == torch.float32 and packed.shape == (2, 4)
    ids2, w2 = unpack_topk(packed, 2)
    assert ids2.dtype == torch.int64 and torch.equal(ids2, ids) and torch.equal(w2, w)
    with pytest.raises(DispatcherError):
        unpack_topk(packed, 3)


# --------------------------------------------------------------------------- unit: dispatchers


@pytest.mark.parametrize("cls", [StandardDispatcher, AllToAllDispatcher])
@pytest.mark.parametrize("dtype,mode,sizes,top_k", [
    ("fp32", "random", [7], 2),
    ("bf16", "random", [7], 2),
    ("fp32", "random", [0], 2),
    ("fp32", "random", [6], 4),          # top_k == number of experts
    ("fp32", "one_expert", [6], 2),
    ("fp32", "nowhere", [3], 2),
])
def test_single_process_matches_reference(cls, dtype, mode, sizes, top_k):
    case = checks.case("x", "single", 1, sizes=sizes, experts=4, top_k=top_k, dtype=dtype,
                 mode=mode, expert=3)
    disp = cls(_single(dtype=checks._DTYPES[dtype]))
    x, ids, w, d, out = _roundtrip(disp, case)
    assert isinstance(d, cls.output_class) and d.format == DispatchFormat.STANDARD
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = checks.reference(x, ids, w)
    if ref.numel():
        assert float((out.float() - ref).abs().max()) <= checks._tolerance(case, ref)
    if mode == "nowhere":
        assert torch.all(out == 0)


def test_formats_and_layouts():
    assert StandardDispatcher.output_class is StandardDispatchOutput
    assert StandardDispatcher.token_layout == "replicated"
    assert AllToAllDispatcher.output_class is StandardDispatchOutput
    assert AllToAllDispatcher.token_layout == "scattered"


def test_dispatch_needs_the_step_facts_as_a_keyword():
    disp = StandardDispatcher(_single())
    ids = torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(TypeError):
        disp.dispatch(torch.zeros(3, 8), TopK(ids, torch.ones(3, 2), batch=_b(3)))  # no batch=


def test_async_defaults_run_synchronously():
    disp = AllToAllDispatcher(_single())
    case = checks.case("x", "async", 1, sizes=[6], experts=4)
    x, ids, w = checks.make_batch(case, 0)
    pending = disp.dispatch_async(x, TopK(ids, w), batch=_b(6))
    d = pending.wait()
    assert pending.done and isinstance(d, StandardDispatchOutput)
    y = checks.apply_experts(d, 0, 1.0, x.dtype)
    out = disp.combine_async(CombineInput(expert_output=y, dispatch_output=d), batch=_b(6)).wait()
    ref = checks.reference(x, ids, w)
    assert float((out - ref).abs().max()) <= checks._tolerance(case, ref)


def test_layers_share_their_communicators_buffers():
    """Dispatchers built on one communicator reuse its scratch buffers (one per process)."""
    from moe_a2a.dispatchers import Communicator

    comm = Communicator(_single().comm_setup())
    a = AllToAllDispatcher(_single(communicator=comm))
    b = AllToAllDispatcher(_single(communicator=comm))
    assert a.comm is b.comm is comm
    case = checks.case("x", "share", 1, sizes=[5], experts=4)
    x, ids, w = checks.make_batch(case, 0)
    a.dispatch(x, TopK(ids, w), batch=_b(5))
    first = comm.scratch("alltoall.counts", 2, torch.int64, torch.device("cpu")).data_ptr()
    b.dispatch(x, TopK(ids, w), batch=_b(5))
    assert comm.scratch("alltoall.counts", 2, torch.int64, torch.device("cpu")).data_ptr() == first
    a.close()  # a shared communicator is not the dispatcher's to close
    assert not comm.closed
    comm.close()
    with pytest.raises(DispatcherError, match="closed"):
        b.dispatch(x, TopK(ids, w), batch=_b(5))
    own = AllToAllDispatcher(_single())
    own.close()
    assert own.comm.closed


def test_alltoall_reads_the_device_once_per_dispatch(monkeypatch):
    disp = AllToAllDispatcher(_single())
    case = checks.case("x", "reads", 1, sizes=[9], experts=4)
    x, ids, w = checks.make_batch(case, 0)
    reads = []
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or real_tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or real_item(t))
    d = disp.dispatch(x, TopK(ids, w), batch=_b(9))
    assert reads == ["tolist"]
    y = torch.zeros_like(d.hidden_states)
    disp.combine(CombineInput(expert_output=y, dispatch_output=d), batch=_b(9))
    assert reads == ["tolist"]  # combine reads nothing
    h = d.handle
    assert isinstance(h, AllToAllHandle)
    # one destination: each token with any expert is sent exactly once
    assert h.send_splits == (int((ids >= 0).any(dim=1).sum()),)
    assert h.num_sent == h.num_received == d.num_rows
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.num_tokens = 3  # type: ignore[misc]


def test_alltoall_reuses_buffers_without_aliasing_outputs():
    disp = AllToAllDispatcher(_single(dtype=torch.bfloat16))
    outs = []
    for step in range(2):
        case = checks.case("x", f"reuse{step}", 1, sizes=[5], experts=4, dtype="bf16")
        x, ids, w, d, out = _roundtrip(disp, case)
        outs.append((out, checks.reference(x, ids, w)))
    for out, ref in outs:  # the first step's output survives the second step
        assert float((out.float() - ref).abs().max()) <= 0.05 * float(ref.abs().max())


def test_alltoall_layout_errors_name_the_values():
    bad_tp = CommGroups(world_size=2, ep_size=1, moe_tp_size=2)
    with pytest.raises(AllToAllLayoutError, match=r"tp_size=2, ep_size=1, moe_tp_size=2"):
        AllToAllDispatcher(_single(groups=bad_tp))
    bad_ep = CommGroups(world_size=4, ep_size=2, moe_tp_size=1)
    with pytest.raises(ValueError, match="--ep-size 4"):
        AllToAllDispatcher(_single(groups=bad_ep))


def test_input_and_combine_errors():
    disp = StandardDispatcher(_single())
    ids = torch.zeros(3, 2, dtype=torch.int64)
    w = torch.ones(3, 2)
    with pytest.raises(DispatcherError, match=r"\[T, H\]"):
        disp.dispatch(torch.zeros(3, 2, 8), TopK(ids, w), batch=_b(3))
    with pytest.raises(DispatcherError, match="hidden_size=8"):
        disp.dispatch(torch.zeros(3, 5), TopK(ids, w), batch=_b(3))
    with pytest.raises(DispatcherError, match="covers 3 tokens"):
        disp.dispatch(torch.zeros(4, 8), TopK(ids, w), batch=_b(3))
    with pytest.raises(DispatcherError, match="integer"):
        disp.dispatch(torch.zeros(3, 8), TopK(ids.float(), w), batch=_b(3))
    d = disp.dispatch(torch.zeros(3, 8), TopK(ids, w), batch=_b(3))
    assert isinstance(d.handle, StandardHandle)
    with pytest.raises(DispatcherError, match=r"shape \(2, 8\).*expects \[3, 8\]"):
        disp.combine(CombineInput(expert_output=torch.zeros(2, 8), dispatch_output=d), batch=_b(3))
    with pytest.raises(DispatcherError, match="expects \\[3, 8\\]"):
        disp.combine(CombineInput(expert_output=torch.zeros(1, 8), dispatch_output=d), batch=_b(3))
    a2a = AllToAllDispatcher(_single())
    with pytest.raises(DispatcherError, match="dispatch\\(\\) returned"):
        a2a.combine(CombineInput(expert_output=torch.zeros(3, 8), dispatch_output=d), batch=_b(3))
    with pytest.raises(DispatcherError, match="2\\*\\*24"):
        StandardDispatcher(_single(num_experts=2**24))


# --------------------------------------------------------------------------- multi-process


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_multiprocess(world, request):
    pool = request.getfixturevalue(f"pool{world}")
    cases = checks.all_cases(world)
    results = pool.run(checks.run_cases, cases)
    assert len(results) == world
    by_name = {case["name"]: i for i, case in enumerate(cases)}
    # the destination counts seen from both ends agree: what r sends to s is what s gets from r
    for name in ("a2a", "a2a-topk=E", "a2a-one-expert"):
        i = by_name[name]
        send = [results[r][i]["send"] for r in range(world)]
        recv = [results[r][i]["recv"] for r in range(world)]
        assert all(send[r][s] == recv[s][r] for r in range(world) for s in range(world))
    one = by_name["a2a-one-expert"]
    owner = (2 * world - 1) // 2
    for r in range(world):  # all tokens go to the one owner, once each
        assert results[r][one]["send"] == [3 if s == owner else 0 for s in range(world)]
    topk_all = by_name["a2a-topk=E"]
    sizes = cases[topk_all]["sizes"]
    for r in range(world):  # every token to every rank, exactly once
        assert results[r][topk_all]["send"] == [sizes[r]] * world
