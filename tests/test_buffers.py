"""Buffers reused across steps: ``Communicator.lease`` and the alltoall dispatcher's use of it."""

from __future__ import annotations

import torch

from moe_a2a.dispatchers import BatchInfo, CombineInput, CommSetup, Communicator, DispatcherSetup, TopK
from moe_a2a.dispatchers.alltoall import AllToAllDispatcher
from moe_a2a.parallel import ParallelSizes, build_comm_groups


def _comm() -> Communicator:
    return Communicator(CommSetup(groups=build_comm_groups(ParallelSizes(1), 0), num_experts=4,
                                  top_k=2, hidden_size=8))


def test_lease_reuses_released_buffers_and_never_shares_held_ones():
    comm = _comm()
    a = comm.lease("rows", 100, torch.float32, torch.device("cpu"))
    b = comm.lease("rows", 100, torch.float32, torch.device("cpu"))
    assert a.buffer.numel() == b.buffer.numel() == 100
    assert a.buffer.data_ptr() != b.buffer.data_ptr()          # both held: distinct memory
    a.release()
    a.release()                                                  # idempotent: returned once
    c = comm.lease("rows", 60, torch.float32, torch.device("cpu"))
    d = comm.lease("rows", 60, torch.float32, torch.device("cpu"))
    assert c.buffer.data_ptr() == a.buffer.data_ptr() and c.buffer.numel() == 60
    assert d.buffer.data_ptr() not in (b.buffer.data_ptr(), c.buffer.data_ptr())
    c.release()
    bigger = comm.lease("rows", 1000, torch.float32, torch.device("cpu"))  # too small: a new one
    assert bigger.buffer.numel() == 1000 and bigger.buffer.data_ptr() != c.buffer.data_ptr()
    other = comm.lease("other", 10, torch.float32, torch.device("cpu"))   # keys never mix
    assert other.buffer.data_ptr() != c.buffer.data_ptr()
    comm.close()


def test_alltoall_received_rows_are_recycled_by_combine():
    groups = build_comm_groups(ParallelSizes(1), 0)
    disp = AllToAllDispatcher(DispatcherSetup(groups=groups, num_experts=4, top_k=2, hidden_size=8))
    batch = BatchInfo.single(6)
    x = torch.randn(6, 8)
    topk = TopK(torch.tensor([[0, 1], [2, -1], [3, 0], [1, 2], [-1, -1], [3, 1]]),
                torch.rand(6, 2))
    first = disp.dispatch(x, topk, batch=batch)
    second = disp.dispatch(x, topk, batch=batch)                 # two in flight: own buffers
    assert first.hidden_states.data_ptr() != second.hidden_states.data_ptr()
    assert torch.equal(first.hidden_states, second.hidden_states)
    outs = []
    for d in (first, second, first):                              # a repeated combine is harmless
        outs.append(disp.combine(CombineInput(expert_output=d.hidden_states.clone(),
                                              dispatch_output=d), batch=batch))
    assert all(torch.equal(o, outs[0]) for o in outs)
    third = disp.dispatch(x, topk, batch=batch)                  # steady state: reused memory
    fourth = disp.dispatch(x, topk, batch=batch)
    used = {first.hidden_states.data_ptr(), second.hidden_states.data_ptr()}
    assert {third.hidden_states.data_ptr(), fourth.hidden_states.data_ptr()} == used
    disp.close()
