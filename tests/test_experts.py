"""Weights (random, shard), ReferenceExperts on hand-built dispatch outputs vs reference_moe."""

import dataclasses

import pytest
import torch

from moe_a2a.dispatchers import DeepEPLowLatencyOutput, DeepEPNormalOutput, ExpertPlacement, StandardDispatchOutput, TopK
from moe_a2a.dispatchers.base import group_pairs_by_expert
from moe_a2a.errors import MoeA2AError
from moe_a2a.experts import ReferenceExperts, SharedExpert, UnsupportedDispatchFormat
from moe_a2a.reference import reference_moe
from moe_a2a.routing import RouterConfig, default_groups
from moe_a2a.weights import LocalExpertWeights, MoEWeights, SharedExpertWeights

E, H, I = 8, 32, 24


def _router(e=E, k=3):
    n_group, topk_group = default_groups(e, k)
    return RouterConfig(num_experts=e, top_k=k, scoring="sigmoid", n_group=n_group, topk_group=topk_group,
                        renormalize=True, routed_scaling_factor=2.5, has_correction_bias=True)


def _routed_only(weights: MoEWeights) -> MoEWeights:
    return dataclasses.replace(weights, shared=None)


STANDARD, SUBSET = "standard", "subset"  # all tokens on every rank (none) / some rows (alltoall)


def run_experts(local, out):
    return ReferenceExperts()(out, local)


def _local_dispatch(fmt, hidden, topk: TopK, placement: ExpertPlacement, rows=None) -> StandardDispatchOutput:
    """What a dispatcher hands this rank: all tokens (standard) or the given rows (alltoall)."""
    local = placement.to_local(topk.ids)
    weights = torch.where(local >= 0, topk.weights, torch.zeros_like(topk.weights))
    if rows is not None:
        hidden, local, weights = hidden[rows], local[rows], weights[rows]
    pair_order, tokens_per_expert = group_pairs_by_expert(local, placement.num_local_experts)
    return StandardDispatchOutput(hidden_states=hidden, topk_ids=local, topk_weights=weights,
                                  tokens_per_expert=tokens_per_expert, pair_order=pair_order)


def _distributed_routed(weights, hidden, topk, fmt, ep, tp, dtype=torch.float32):
    """Sum of every (ep, moe-tp) rank's expert output, scattered back to token order."""
    total = torch.zeros(hidden.shape[0], H, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    for ep_rank in range(ep):
        placement = ExpertPlacement(weights.num_experts, ep, ep_rank)
        rows = None
        if fmt == SUBSET:
            mine = (placement.to_local(topk.ids) >= 0).any(dim=1).nonzero(as_tuple=True)[0]
            rows = mine[torch.randperm(mine.numel(), generator=gen)]
        out = _local_dispatch(fmt, hidden.to(dtype), topk, placement, rows)
        for tp_rank in range(tp):
            y = run_experts(weights.shard(placement, tp_rank, tp).to(dtype=dtype), out)
            assert y.shape == (out.num_rows, H) and y.dtype == dtype
            if rows is None:
                total += y.float()
            else:
                total.index_add_(0, rows, y.float())
    return total


# ---------------------------------------------------------------- weights


def test_random_is_deterministic_and_scaled():
    a = MoEWeights.random(E, H, I, 2 * I, seed=3, with_correction_bias=True)
    b = MoEWeights.random(E, H, I, 2 * I, seed=3, with_correction_bias=True)
    c = MoEWeights.random(E, H, I, 0, seed=4)
    for name in ("gate", "correction_bias", "w_gate", "w_up", "w_down"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.shared.w_down, b.shared.w_down)
    assert not torch.equal(a.w_gate, c.w_gate) and c.shared is None and c.correction_bias is None
    assert a.shared.intermediate_size == 2 * I and a.correction_bias.abs().max() > 0
    # expert values do not depend on the optional tensors
    assert torch.equal(a.w_up, MoEWeights.random(E, H, I, seed=3).w_up)
    x = torch.randn(256, H)
    out, _ = reference_moe(x, a, _router())
    assert 0.05 < out.std().item() < 5.0
    bf = MoEWeights.random(E, H, I, I, seed=3, dtype=torch.bfloat16)
    assert bf.w_gate.dtype == torch.bfloat16 and bf.shared.w_up.dtype == torch.bfloat16
    assert bf.gate.dtype == torch.float32


def test_shard_and_random_local():
    w = MoEWeights.random(E, H, I, seed=5)
    placement = ExpertPlacement(E, 4, 2)
    local = w.shard(placement, 1, 2)
    assert isinstance(local, LocalExpertWeights)
    assert local.w_gate.shape == (2, I // 2, H) and local.w_down.shape == (2, H, I // 2)
    assert torch.equal(local.w_gate, w.w_gate[4:6, I // 2:])
    assert torch.equal(local.w_down, w.w_down[4:6, :, I // 2:])
    again = MoEWeights.random_local(placement, 1, 2, H, I, seed=5)
    for name in ("w_gate", "w_up", "w_down"):
        assert torch.equal(getattr(local, name), getattr(again, name))
    moved = local.to(dtype=torch.bfloat16)
    assert moved.dtype == torch.bfloat16 and moved.placement == placement


def test_shard_errors_name_values():
    w = MoEWeights.random(E, H, I, seed=0)
    with pytest.raises(MoeA2AError, match=r"24 is not divisible by moe_tp_size=5"):
        w.shard(ExpertPlacement(E, 1, 0), 0, 5)
    with pytest.raises(ValueError, match=r"num_experts=8 .* ep_size=3"):
        w.shard(ExpertPlacement(E, 3, 0), 0, 1)
    with pytest.raises(MoeA2AError, match="num_experts=4"):
        w.shard(ExpertPlacement(4, 2, 0))
    with pytest.raises(MoeA2AError, match=r"expected \[E, H\]"):
        dataclasses.replace(w, gate=torch.zeros(E, H + 1))
    with pytest.raises(MoeA2AError, match="shared_intermediate=-1"):
        MoEWeights.random(E, H, I, -1)
    with pytest.raises(MoeA2AError, match="not divisible"):
        SharedExpertWeights(torch.zeros(6, H), torch.zeros(6, H), torch.zeros(H, 6)).shard(0, 4)


# ---------------------------------------------------------------- experts vs reference


@pytest.mark.parametrize("fmt", [STANDARD, SUBSET])
@pytest.mark.parametrize("ep, tp", [(1, 1), (2, 1), (4, 1), (2, 2), (1, 3)])
def test_reference_experts_match_reference_moe(fmt, ep, tp):
    weights = MoEWeights.random(E, H, I, seed=11, with_correction_bias=True)
    hidden = torch.randn(37, H, generator=torch.Generator().manual_seed(ep * 10 + tp))
    ref, topk = reference_moe(hidden, weights, _router())
    got = _distributed_routed(weights, hidden, topk, fmt, ep, tp)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_rows_without_local_experts_are_zero_and_minus_one_ignored():
    weights = MoEWeights.random(E, H, I, seed=2)
    placement = ExpertPlacement(E, 2, 0)  # experts 0..3 here
    hidden = torch.randn(4, H)
    ids = torch.tensor([[0, 5], [6, 7], [3, 0], [4, 1]])
    topk = TopK(ids=ids, weights=torch.tensor([[0.5, 9.0], [1.0, 1.0], [0.25, 0.75], [3.0, 2.0]]))
    out = _local_dispatch(STANDARD, hidden, topk, placement)
    assert out.topk_ids[1].tolist() == [-1, -1]
    y = run_experts(weights.shard(placement), out)
    assert torch.equal(y[1], torch.zeros(H))

    def expert(e, x):
        g = x @ weights.w_gate[e].T
        return (torch.nn.functional.silu(g) * (x @ weights.w_up[e].T)) @ weights.w_down[e].T

    torch.testing.assert_close(y[0], 0.5 * expert(0, hidden[0]))
    torch.testing.assert_close(y[2], 0.25 * expert(3, hidden[2]) + 0.75 * expert(0, hidden[2]))
    torch.testing.assert_close(y[3], 2.0 * expert(1, hidden[3]))


@pytest.mark.parametrize("fmt", [STANDARD, SUBSET])
def test_empty_rows(fmt):
    weights = MoEWeights.random(E, H, I, seed=1)
    placement = ExpertPlacement(E, 2, 1)
    empty = TopK(ids=torch.zeros(0, 2, dtype=torch.int64), weights=torch.zeros(0, 2))
    for dtype in (torch.float32, torch.bfloat16):
        out = _local_dispatch(fmt, torch.zeros(0, H, dtype=dtype), empty, placement)
        y = run_experts(weights.shard(placement).to(dtype=dtype), out)
        assert y.shape == (0, H) and y.dtype == dtype
    # rows present, none routed here
    topk = TopK(ids=torch.zeros(3, 2, dtype=torch.int64), weights=torch.ones(3, 2))
    out = _local_dispatch(fmt, torch.randn(3, H), topk, placement)
    assert torch.equal(run_experts(weights.shard(placement), out), torch.zeros(3, H))


def test_all_tokens_on_one_expert_and_top_k_equals_experts():
    weights = MoEWeights.random(E, H, I, seed=9)
    hidden = torch.randn(20, H)
    router = RouterConfig(num_experts=E, top_k=E, renormalize=True)
    ref, topk = reference_moe(hidden, weights, router)
    torch.testing.assert_close(_distributed_routed(weights, hidden, topk, SUBSET, 4, 1), ref,
                               rtol=1e-5, atol=1e-5)
    one = TopK(ids=torch.full((20, 1), 6, dtype=torch.int64), weights=torch.full((20, 1), 0.5))
    got = _distributed_routed(weights, hidden, one, STANDARD, 2, 2)
    g = hidden @ weights.w_gate[6].T
    want = 0.5 * (torch.nn.functional.silu(g) * (hidden @ weights.w_up[6].T)) @ weights.w_down[6].T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", [STANDARD, SUBSET])
def test_bf16_close_to_fp32_reference(fmt):
    weights = MoEWeights.random(E, H, I, seed=4, dtype=torch.bfloat16, with_correction_bias=True)
    hidden = torch.randn(33, H).to(torch.bfloat16).float()
    ref, topk = reference_moe(hidden, weights, _router())
    got = _distributed_routed(weights, hidden, topk, fmt, 2, 2, dtype=torch.bfloat16)
    torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_shared_expert_and_full_layer():
    weights = MoEWeights.random(E, H, I, 2 * I, seed=6, with_correction_bias=True)
    hidden = torch.randn(29, H)
    ref, topk = reference_moe(hidden, weights, _router())
    routed = _distributed_routed(weights, hidden, topk, SUBSET, 2, 1)
    shared = SharedExpert(weights.shared)(hidden)
    torch.testing.assert_close(routed + shared, ref, rtol=1e-5, atol=1e-5)
    halves = sum(SharedExpert(weights.shared.shard(r, 2))(hidden) for r in range(2))
    torch.testing.assert_close(halves, shared, rtol=1e-5, atol=1e-5)
    ref_routed, _ = reference_moe(hidden, _routed_only(weights), _router())
    torch.testing.assert_close(routed, ref_routed, rtol=1e-5, atol=1e-5)
    bf = SharedExpert(weights.shared.to(dtype=torch.bfloat16))(hidden.to(torch.bfloat16))
    assert bf.dtype == torch.bfloat16
    with pytest.raises(MoeA2AError, match=r"expected \[T, 32\]"):
        SharedExpert(weights.shared)(torch.zeros(2, 5))


def test_unsupported_format_and_shape_errors():
    weights = MoEWeights.random(E, H, I, seed=0)
    placement = ExpertPlacement(E, 2, 0)
    topk = TopK(ids=torch.zeros(2, 1, dtype=torch.int64), weights=torch.ones(2, 1))
    out = _local_dispatch(STANDARD, torch.randn(2, H), topk, placement)
    local = weights.shard(placement)

    class Foreign(type(out).__mro__[1]):  # a DispatchOutput no runner knows
        pass

    with pytest.raises(UnsupportedDispatchFormat, match="Foreign.*StandardDispatchOutput, DeepEPNormalOutput"):
        run_experts(local, Foreign(hidden_states=out.hidden_states))
    with pytest.raises(MoeA2AError, match="4 local experts"):
        run_experts(local, dataclasses.replace(out, tokens_per_expert=torch.zeros(3, dtype=torch.int64)))
    with pytest.raises(MoeA2AError, match=r"expected \[R, 32\]"):
        run_experts(local, dataclasses.replace(out, hidden_states=torch.zeros(2, 7)))


def test_deepep_formats_match_the_standard_consumer():
    """The DeepEP normal and low-latency consumers compute what the standard one does."""
    weights = MoEWeights.random(E, H, I, seed=8)
    placement = ExpertPlacement(E, 2, 1)
    local = weights.shard(placement)
    hidden = torch.randn(9, H)
    ids = torch.randint(0, E, (9, 3), generator=torch.Generator().manual_seed(1))
    topk = TopK(ids=ids, weights=torch.rand(9, 3))
    std = _local_dispatch(STANDARD, hidden, topk, placement)
    want = run_experts(local, std)
    normal = DeepEPNormalOutput(hidden_states=hidden, topk_ids=std.topk_ids,
                                topk_weights=std.topk_weights,
                                num_recv_tokens_per_expert=std.tokens_per_expert.tolist())
    torch.testing.assert_close(run_experts(local, normal), want)
    # low latency: per expert its rows (unweighted), padded to cap; combine weighs them
    cap = 12
    x = torch.zeros(placement.num_local_experts, cap, H)
    masked = torch.zeros(placement.num_local_experts, dtype=torch.int32)
    where = []
    for e in range(placement.num_local_experts):
        rows, cols = torch.nonzero(std.topk_ids == e, as_tuple=True)
        x[e, :rows.numel()] = hidden[rows]
        masked[e] = rows.numel()
        where.append((rows, cols))
    ll = DeepEPLowLatencyOutput(hidden_states=x, masked_m=masked, expected_m=4)
    y = run_experts(local, ll)
    assert torch.equal(y[0, masked[0]:], torch.zeros_like(y[0, masked[0]:]))
    combined = torch.zeros(9, H)
    for e, (rows, cols) in enumerate(where):
        combined.index_add_(0, rows, y[e, :rows.numel()] * std.topk_weights[rows, cols, None])
    torch.testing.assert_close(combined, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- grouped-GEMM runner

from moe_a2a.runners import GroupedMMExperts, select_runner  # noqa: E402


@pytest.mark.parametrize("fmt", [STANDARD, SUBSET])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_runner_matches_reference_runner(fmt, dtype):
    weights = MoEWeights.random(E, H, I, seed=21, dtype=dtype, with_correction_bias=True)
    hidden = torch.randn(41, H, generator=torch.Generator().manual_seed(3)).to(dtype)
    _, topk = reference_moe(hidden.float(), weights, _router())
    for ep in (1, 2, 4):
        placement = ExpertPlacement(E, ep, ep - 1)
        rows = None
        if fmt == SUBSET:
            rows = (placement.to_local(topk.ids) >= 0).any(dim=1).nonzero(as_tuple=True)[0]
        out = _local_dispatch(fmt, hidden, topk, placement, rows)
        local = weights.shard(placement)
        want = ReferenceExperts()(out, local)
        got = GroupedMMExperts()(out, local)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def test_grouped_mm_runner_deepep_formats_and_empty():
    weights = MoEWeights.random(E, H, I, seed=8)
    placement = ExpertPlacement(E, 2, 0)
    local = weights.shard(placement)
    ids = torch.randint(0, E, (9, 3), generator=torch.Generator().manual_seed(4))
    std = _local_dispatch(STANDARD, torch.randn(9, H), TopK(ids=ids, weights=torch.rand(9, 3)), placement)
    normal = DeepEPNormalOutput(hidden_states=std.hidden_states, topk_ids=std.topk_ids,
                                topk_weights=std.topk_weights,
                                num_recv_tokens_per_expert=std.tokens_per_expert.tolist())
    torch.testing.assert_close(GroupedMMExperts()(normal, local), ReferenceExperts()(std, local))
    x = torch.randn(4, 6, H)
    ll = DeepEPLowLatencyOutput(hidden_states=x, masked_m=torch.tensor([2, 0, 6, 1], dtype=torch.int32),
                                expected_m=2)
    torch.testing.assert_close(GroupedMMExperts()(ll, local), ReferenceExperts()(ll, local),
                               rtol=1e-5, atol=1e-5)
    empty = _local_dispatch(STANDARD, torch.zeros(0, H), TopK(ids=torch.zeros(0, 2, dtype=torch.int64),
                                                              weights=torch.zeros(0, 2)), placement)
    assert GroupedMMExperts()(empty, local).shape == (0, H)
    # rows delivered, none of their pairs routed to this rank: zeros, no GEMM on zero rows
    elsewhere = _local_dispatch(STANDARD, torch.randn(5, H),
                                TopK(ids=torch.full((5, 3), E - 1), weights=torch.rand(5, 3)), placement)
    assert int(elsewhere.tokens_per_expert.sum()) == 0
    assert torch.equal(GroupedMMExperts()(elsewhere, local), torch.zeros(5, H))


def test_runner_selection():
    assert isinstance(select_runner("auto", torch.device("cpu"), torch.float32), ReferenceExperts)
    assert isinstance(select_runner("grouped_mm", torch.device("cpu"), torch.bfloat16), GroupedMMExperts)
    with pytest.raises(MoeA2AError, match="not provided here"):
        select_runner("cutlass", torch.device("cpu"), torch.float32)
