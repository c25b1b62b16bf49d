"""Routed-experts capture on one process: sizes, the capturer's contract (logical ids, rows by
KV slot, start_len, prefix-cache hits, the -1 sentinel, errors), the run job's checker."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_a2a.dispatchers import PhysicalTopK
from moe_a2a.errors import MoeA2AError
from moe_a2a.parallel import ParallelSizes, make_parallel_context
from moe_a2a.reference import reference_moe
from moe_a2a.routed_experts import (RoutedExpertsRequest, RoutedExpertsRequestError,
                                    capture_sizes)
from moe_a2a.routed_experts_gather import make_gather
from moe_a2a.routing import RouterConfig
from moe_a2a.run_capture import CaptureJob, compare_rows
from moe_a2a.server_args import resolve
from moe_a2a.stack import MoEStack
from moe_a2a.step import RowSpan
from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.weights import MoEWeights

ROUTER = RouterConfig(num_experts=8, top_k=2, scoring="sigmoid", n_group=2, topk_group=1,
                      renormalize=True, routed_scaling_factor=2.5, has_correction_bias=True)


def _args(**kw):
    return resolve(env={}, moe_a2a_backend="none", enable_return_routed_experts=True, **kw)


def _stack(layers=3, slots=64, max_tokens=16, remaps=None, weights=None, **kw):
    args = _args(**kw)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), 0, torch.device("cpu"))
    weights = weights or [MoEWeights.random(8, 16, 8, 8, seed=i, with_correction_bias=True)
                          for i in range(layers)]
    stack = MoEStack.build(weights, ROUTER, args, ctx, remaps=remaps,
                           capture=capture_sizes(args, num_token_slots=slots,
                                                 max_step_tokens=max_tokens))
    return stack, weights


def _forward(stack, weights, x, slots):
    """One step; returns the reference router's ids per layer ``[T, L, K]``."""
    expected = []
    with stack.step(x.shape[0], token_slots=slots):
        h = x
        for layer, w in zip(stack.layers, weights):
            expected.append(reference_moe(h, w, ROUTER).topk.ids)
            h = h + layer(h)
    return torch.stack(expected, 1) if x.shape[0] else None


# ---- sizes ------------------------------------------------------------------------------------

def test_capture_sizes_take_the_largest_per_dp_rank_bound():
    args = resolve(env={}, moe_a2a_backend="none", tp_size=4, ep_size=4, dp_size=2,
                   enable_dp_attention=True, chunked_prefill_size=8192,
                   max_running_requests=300, cuda_graph_max_bs=64)
    sizes = capture_sizes(args, num_token_slots=100_000)
    assert sizes.max_tokens_per_step == 4096  # the chunk, split over 2 DP ranks
    assert [n for _, n in sizes.limits] == [4096, 150, 64]
    assert "over 2 DP ranks" in sizes.limits[0][0]
    assert capture_sizes(args, num_token_slots=10, max_step_tokens=5000).max_tokens_per_step == 5000
    assert sizes.host_bytes(61, 8) == (100_000 + 2 * 4096) * 61 * 8 * 4
    graphs_off = resolve(env={}, moe_a2a_backend="none", cuda_graph_max_bs=64,
                         disable_cuda_graph=True, max_running_requests=8)
    assert capture_sizes(graphs_off, num_token_slots=1).max_tokens_per_step == 8


def test_capture_sizes_need_a_bound_and_slots():
    args = resolve(env={}, moe_a2a_backend="none")
    with pytest.raises(MoeA2AError, match="--chunked-prefill-size"):
        capture_sizes(args, num_token_slots=10)
    with pytest.raises(MoeA2AError, match="num_token_slots=0"):
        capture_sizes(args, num_token_slots=0, max_step_tokens=4)


def test_stack_builds_the_capturer_only_when_enabled():
    args = resolve(env={}, moe_a2a_backend="none")
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), 0, torch.device("cpu"))
    w = [MoEWeights.random(8, 16, 8, 8, seed=0, with_correction_bias=True)]
    stack = MoEStack.build(w, ROUTER, args, ctx)
    assert stack.routed_experts is None
    with pytest.raises(MoeA2AError, match="--enable-return-routed-experts is off"):
        MoEStack.build(w, ROUTER, args, ctx,
                       capture=capture_sizes(args, num_token_slots=4, max_step_tokens=4))
    with pytest.raises(MoeA2AError, match="needs the capture buffer sizes"):
        MoEStack.build(w, ROUTER, _args(), ctx)
    stack, _ = _stack(layers=2)
    assert stack.observers[0] is stack.routed_experts
    cap = stack.routed_experts
    assert cap.device_cache.shape == (16, 2, 2) and cap.host_cache.shape == (64, 2, 2)
    assert cap.gather.name == "none" and bool((cap.host_cache == -1).all())


# ---- the capturer's contract -------------------------------------------------------------------

def test_rows_by_slot_start_len_and_sentinel():
    stack, weights = _stack()
    cap = stack.routed_experts
    torch.manual_seed(0)
    # one request of 10 positions over two steps (a chunked prefill), slots out of order
    slots = torch.randperm(40)[:10]
    table = torch.full((2, 12), -1, dtype=torch.int64)
    table[1, :10] = slots
    want = torch.cat([_forward(stack, weights, torch.randn(6, 16), slots[:6]),
                      _forward(stack, weights, torch.randn(4, 16), slots[6:])])
    _forward(stack, weights, torch.randn(0, 16), torch.zeros(0, dtype=torch.int64))  # idle step
    seqlen = 11  # 10 forwarded, the 11th sampled but not forwarded yet
    full = cap.get_topk(1, seqlen, table)
    assert full.dtype == torch.int32 and full.shape == (10, 3, 2)
    assert torch.equal(full.long(), want)  # column order preserved, every layer aligned
    assert torch.equal(cap.get_topk(1, seqlen, table, 4, prompt_len=7).long(), want[4:])
    assert cap.get_topk(1, seqlen, table, 7, prompt_len=7).shape[0] == 3  # start_len == prompt
    assert cap.get_topk(1, 8, table).shape[0] == 7  # rows [0, seqlen - 1)
    assert cap.get_topk(1, 1, table).shape[0] == 0
    # a slot never written reads as the sentinel
    table[0, :3] = torch.tensor([60, 61, 62])
    assert bool((cap.get_topk(0, 4, table) == -1).all())
    stack.close()


@pytest.mark.parametrize("start_len, prompt_len, match", [
    (-1, 5, r"start_len -1 must be in \[0, 5\]"),
    (6, 5, r"start_len 6 must be in \[0, 5\] \(the prompt length\)"),
    (9, None, r"start_len 9 must be in \[0, 8\] \(the forwarded positions"),
])
def test_invalid_start_len_rejects_only_that_request(start_len, prompt_len, match):
    stack, weights = _stack(layers=1)
    cap = stack.routed_experts
    slots = torch.arange(8) * 3
    want = _forward(stack, weights, torch.randn(8, 16), slots)
    table = torch.stack([slots, slots.flip(0)])
    table = torch.cat([table, torch.full((2, 1), -1)], 1)
    with pytest.raises(RoutedExpertsRequestError, match=match):
        cap.get_topk(0, 9, table, start_len, prompt_len=prompt_len)
    batch = [RoutedExpertsRequest(req_pool_idx=0, seqlen=9, start_len=2, prompt_len=5),
             RoutedExpertsRequest(req_pool_idx=1, seqlen=9, start_len=start_len,
                                  prompt_len=prompt_len),
             RoutedExpertsRequest(req_pool_idx=1, seqlen=9)]
    first, bad, last = cap.collect(batch, table)
    assert not bad.ok and bad.ids is None and "routed_experts_start_len" in bad.error
    with pytest.raises(MoeA2AError, match="was rejected"):
        bad.encode()
    assert first.ok and (first.start, first.end) == (2, 8)
    assert torch.equal(first.ids.long(), want[2:])
    assert torch.equal(last.ids.long(), want.flip(0))
    stack.close()


def test_request_argument_errors():
    stack, weights = _stack(layers=1)
    cap = stack.routed_experts
    _forward(stack, weights, torch.randn(3, 16), torch.arange(3))
    table = torch.tensor([[0, 1, 2, -1]])
    for idx, seqlen, prompt_len, match in ((1, 2, None, "outside req_to_token's 1 rows"),
                                           (0, 6, None, r"seqlen 6 must be in \[1, 5\]"),
                                           (0, 5, None, "slots outside"),
                                           (0, 3, 4, "prompt_len 4")):
        with pytest.raises(RoutedExpertsRequestError, match=match):
            cap.get_topk(idx, seqlen, table, prompt_len=prompt_len)
    stack.close()


def test_prefix_cache_hit_and_slot_reuse():
    stack, weights = _stack(layers=2)
    cap = stack.routed_experts
    a_slots = torch.tensor([5, 9, 2, 7, 11])
    a_rows = _forward(stack, weights, torch.randn(5, 16), a_slots)
    # request b hits a's first 3 positions in the prefix cache and forwards only 2 new ones
    b_new = torch.tensor([20, 21])
    b_rows = _forward(stack, weights, torch.randn(2, 16), b_new)
    table = torch.full((3, 8), -1, dtype=torch.int64)
    table[0, :5] = a_slots
    table[1, :5] = torch.cat([a_slots[:3], b_new])
    got = cap.get_topk(1, 6, table)
    assert torch.equal(got.long(), torch.cat([a_rows[:3], b_rows]))
    # a finishes and frees slots 7 and 11; request c reuses them: c sees its own rows
    c_rows = _forward(stack, weights, torch.randn(2, 16), torch.tensor([11, 7]))
    table[2, :2] = torch.tensor([11, 7])
    assert torch.equal(cap.get_topk(2, 3, table).long(), c_rows)
    assert torch.equal(cap.get_topk(1, 6, table).long(), torch.cat([a_rows[:3], b_rows]))
    stack.close()


class PermutedRemap:
    """Physical expert = a permutation of the logical one, plus a fused column that routes
    nowhere (-1, weight 0): what a dispatcher sees differs from what the router chose."""

    extra_columns = 1
    num_physical_experts = 8
    perm = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])

    def to_physical(self, topk, layer_id):
        t = topk.ids.shape[0]
        ids = torch.cat([self.perm[topk.ids], torch.full((t, 1), -1)], 1)
        return PhysicalTopK(ids=ids, weights=torch.cat([topk.weights, torch.zeros(t, 1)], 1))


def test_logical_ids_before_remap_and_fused_columns():
    logical = [MoEWeights.random(8, 16, 8, 8, seed=i, with_correction_bias=True) for i in range(2)]
    inverse = torch.argsort(PermutedRemap.perm)
    physical = [dataclasses.replace(w, w_gate=w.w_gate[inverse], w_up=w.w_up[inverse],
                                    w_down=w.w_down[inverse]) for w in logical]
    stack, _ = _stack(layers=2, weights=physical, remaps=[PermutedRemap()] * 2)
    x = torch.randn(6, 16)
    want = []
    with stack.step(6, token_slots=torch.arange(6)):
        h = x
        for layer, w in zip(stack.layers, logical):
            ref = reference_moe(h, w, ROUTER)
            out = layer(h)
            torch.testing.assert_close(out, ref.output, rtol=1e-4, atol=1e-4)
            want.append(ref.topk.ids)
            h = h + out
    table = torch.arange(7).unsqueeze(0)
    got = stack.routed_experts.get_topk(0, 7, table)
    assert got.shape == (6, 2, 2)  # top_k columns only
    assert torch.equal(got.long(), torch.stack(want, 1))
    stack.close()


def test_step_errors():
    stack, weights = _stack(layers=2, max_tokens=4)
    with pytest.raises(MoeA2AError, match="no token_slots"):
        stack.begin_step(3)
    with pytest.raises(MoeA2AError, match=r"5 tokens on DP rank 0 but the device cache holds 4 per DP rank \(max_step_tokens 4 -> 4\)"):
        stack.begin_step(5, token_slots=torch.arange(5))
    with pytest.raises(MoeA2AError, match="token slot 70, outside the host cache's 64 slots"):
        stack.begin_step(2, token_slots=torch.tensor([1, 70]))
    x = torch.randn(2, 16)
    stack.begin_step(2, token_slots=torch.tensor([1, 2]))
    stack.layers[0](x)
    with pytest.raises(MoeA2AError, match=r"never: \[1\]"):
        stack.end_step()
    stack.begin_step(2, token_slots=torch.tensor([1, 2]))
    for layer in (stack.layers[0], stack.layers[1], stack.layers[1]):
        layer(x)
    with pytest.raises(MoeA2AError, match=r"more than once: \[1\]"):
        stack.end_step()
    step = stack.begin_step(2, token_slots=torch.tensor([1, 2]))
    topk = stack.layers[0].remap  # any object: the layer id is checked first
    with pytest.raises(MoeA2AError, match="layer 7 is not one of the captured layers"):
        stack.routed_experts.observe(7, topk, RowSpan.replicated(2), step)
    stack.close()


def test_cuda_graph_steps():
    """A replayed graph writes the device cache without calling observe: the step still copies
    its rows; the late gather cannot be part of a graph."""
    stack, weights = _stack(layers=2, max_tokens=4)
    cap = stack.routed_experts
    x = torch.randn(3, 16)
    want = _forward(stack, weights, x, torch.tensor([4, 5, 6]))  # eager: fills the device cache
    stack.begin_step(3, token_slots=torch.tensor([7, 8, 9]), capturing=True)
    stack.end_step()  # a replay: no layer call in Python
    table = torch.tensor([[7, 8, 9, -1]])
    assert torch.equal(cap.get_topk(0, 4, table).long(), want)
    stack.close()
    late, _ = _stack(layers=1, tp_size=1, routed_experts_gather="late")
    with pytest.raises(MoeA2AError, match="fix: --routed-experts-gather early"):
        late.begin_step(2, token_slots=torch.arange(2), capturing=True)
    late.close()


def test_none_gather_refuses_scattered_rows():
    cache = torch.zeros(8, 1, 2, dtype=torch.int32)
    none = make_gather("none", cache, CommGroups.single())
    with pytest.raises(MoeA2AError, match="fix: --routed-experts-gather early or late"):
        none.observe(0, torch.zeros(2, 2, dtype=torch.int64), RowSpan.slice_of(4, 2, 1))
    with pytest.raises(MoeA2AError, match="'auto' is not one of none, early, late"):
        make_gather("auto", cache, CommGroups.single())


# ---- the run job's checker ----------------------------------------------------------------------

class _Oracle:
    def __init__(self, weights):
        self.weights, self.router, self.hf_block = weights, ROUTER, None


def test_run_checker_counts_rows_rejections_and_catches_a_wrong_row():
    stack, weights = _stack(layers=2, slots=256, max_tokens=12)
    job = CaptureJob([12, 0, 9, 12], args=_args(), seed=3, dp_rank=0, max_step=12, num_layers=2)
    assert job.sizes.num_token_slots == job.table.num_slots == 33 + 8
    cap = stack.routed_experts
    for step, n in enumerate(job.step_tokens):
        x = torch.randn(n, 16)
        with stack.step(n, token_slots=job.step_slots(step)):
            h = x
            for column, (layer, w) in enumerate(zip(stack.layers, weights)):
                job.expect(step, column, _Oracle(w), h)
                h = h + layer(h)
    report = job.check(cap)
    assert report.failures == 0 and report.rows > 0, report.first_problem
    assert report.rejected == sum(not r.valid for r in job.requests) > 0
    assert any(r.prefix_of is not None for r in job.requests)
    victim = next(r for r in job.requests if r.valid and r.length > r.start_len)
    slot = job.table.req_to_token[victim.req_pool_idx, victim.length - 1]
    cap.host_cache[slot, 1] = (cap.host_cache[slot, 1] + 1) % 8
    bad = job.check(cap)
    assert bad.mismatches >= 1 and f"request {victim.req_pool_idx}" in bad.first_problem
    stack.close()


def test_compare_rows_accepts_ties_only():
    scores = torch.tensor([[0.9, 0.5, 0.5 + 1e-7, 0.1], [0.9, 0.5, 0.4, 0.1]])
    want = torch.tensor([[0, 2], [0, 1]])
    assert compare_rows(want, want, scores, True) == {"exact": 2, "ties": 0, "mismatches": 0}
    swapped = torch.tensor([[0, 1], [0, 2]])  # row 0 a tie, row 1 a real difference
    assert compare_rows(swapped, want, scores, True) == {"exact": 0, "ties": 1, "mismatches": 1}
    unordered = torch.tensor([[2, 0], [1, 0]])
    assert compare_rows(unordered, want, scores, False)["exact"] == 2
    assert compare_rows(unordered, want, scores, True)["mismatches"] == 2
