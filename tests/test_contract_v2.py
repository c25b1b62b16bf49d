"""The contract-v2 seams: per-format outputs, BatchInfo, one communicator per process, the
fused path with its per-step fallback, LogicalTopK/PhysicalTopK, the model-level step."""

from __future__ import annotations

import pytest
import torch

import v2_backends
import v2_checks
from moe_a2a.backends import registry_snapshot
from moe_a2a.dispatchers import BatchInfo, DispatcherError, ForwardMode, PhysicalTopK
from moe_a2a.errors import MoeA2AError
from moe_a2a.parallel import ParallelSizes, make_parallel_context
from moe_a2a.reference import reference_moe
from moe_a2a.remap import IdentityRemap
from moe_a2a.routing import LogicalTopK, RouterConfig, route
from moe_a2a.server_args import resolve
from moe_a2a.stack import MoEStack
from moe_a2a.step import RowSpan, StepObserver
from moe_a2a.weights import MoEWeights

TOL = 1e-4


# ---- single process ----------------------------------------------------------------------

def test_batch_info_facts():
    single = BatchInfo.single(7, ForwardMode.DECODE)
    assert single.agreed and single.max_num_tokens == 7 and not single.any_prefill
    assert BatchInfo.single(0).forward_mode is ForwardMode.IDLE
    mixed = BatchInfo(forward_mode=ForwardMode.DECODE, num_tokens=3, dp_num_tokens=(3, 9),
                      dp_forward_modes=(ForwardMode.DECODE, ForwardMode.PREFILL))
    assert mixed.any_prefill and mixed.max_num_tokens == 9 and mixed.global_num_tokens == 12
    assert mixed.max_tokens_per_rank(attn_tp_size=2) == 5  # tensor_split: the first gets the ceiling
    assert mixed.max_tokens_per_rank(attn_tp_size=2, scattered=False) == 9
    local = BatchInfo(forward_mode=ForwardMode.PREFILL, num_tokens=4)
    assert not local.agreed
    with pytest.raises(DispatcherError, match="not agreed"):
        local.require_agreed("deepep auto")
    with pytest.raises(DispatcherError, match="together"):
        BatchInfo(forward_mode=ForwardMode.DECODE, num_tokens=1, dp_num_tokens=(1,))


def test_routing_stages_are_types():
    router = RouterConfig(num_experts=8, top_k=2)
    topk = route(torch.randn(5, 8), router)
    assert isinstance(topk, LogicalTopK) and not isinstance(topk, PhysicalTopK)
    physical = IdentityRemap(8).to_physical(topk, layer_id=0)
    assert isinstance(physical, PhysicalTopK) and torch.equal(physical.ids, topk.ids)


def _one_rank_stack(layers=2, backend="none", **kw):
    args = resolve(env={}, moe_a2a_backend=backend, **kw)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), 0, torch.device("cpu"))
    router = RouterConfig(num_experts=8, top_k=2, scoring="sigmoid", has_correction_bias=True)
    weights = [MoEWeights.random(8, 16, 8, 8, seed=i, with_correction_bias=True)
               for i in range(layers)]
    return MoEStack.build(weights, router, args, ctx), weights, router


class Recorder(StepObserver):
    def __init__(self):
        self.events = []

    def on_step_begin(self, step):
        self.events.append(("begin", step.index, step.num_tokens))

    def observe(self, layer_id, topk, rows, step):
        assert isinstance(topk, LogicalTopK) and isinstance(rows, RowSpan)
        self.events.append(("observe", layer_id, rows.start, rows.stop))

    def on_step_end(self, step):
        self.events.append(("end", step.index))


def test_stack_step_observers_and_module_behaviour():
    stack, weights, router = _one_rank_stack()
    rec = Recorder()
    stack.observers.append(rec)
    x = torch.randn(6, 16)
    out = stack(x)  # one step over both layers, residual between them
    h = x
    for w in weights:
        h = h + reference_moe(h, w, router)[0]
    torch.testing.assert_close(out, h, rtol=TOL, atol=TOL)
    assert rec.events == [("begin", 0, 6), ("observe", 0, 0, 6), ("observe", 1, 0, 6), ("end", 0)]
    # an nn.Module: parameters, state_dict, .to()
    names = dict(stack.named_parameters())
    assert "layers.0.gate" in names and "layers.1.experts.w_gate" in names
    assert "layers.0.correction_bias" in stack.state_dict()
    stack.to(torch.float64)
    assert stack.layers[0].experts.w_gate.dtype == torch.float64
    stack.close()


def test_step_protocol_errors():
    stack, _, _ = _one_rank_stack(layers=1)
    with pytest.raises(MoeA2AError, match="no step was begun"):
        stack.end_step()
    stack.begin_step(3)
    with pytest.raises(MoeA2AError, match="was not ended"):
        stack.begin_step(3)
    with pytest.raises(MoeA2AError, match="got 4 tokens but the step was begun with 3"):
        stack.layers[0](torch.randn(4, 16))
    stack.end_step()
    with pytest.raises(MoeA2AError, match="token_slots"):
        stack.begin_step(3, token_slots=torch.arange(2))
    stack.close()


def test_combine_output_is_checked():
    """A backend whose combine broadcasts or changes dtype is caught and named."""
    stack, _, _ = _one_rank_stack(layers=1)
    layer = stack.layers[0]
    real = layer.dispatcher.combine
    for bad, want in ((lambda ci, batch: real(ci, batch=batch)[:1], r"shape \(1, 16\) instead of \(5, 16\)"),
                      (lambda ci, batch: real(ci, batch=batch).double(), "dtype torch.float64"),
                      (lambda ci, batch: real(ci, batch=batch).to("meta"), "device meta instead of cpu")):
        layer.dispatcher.combine = bad
        with pytest.raises(MoeA2AError, match=want), stack.step(5):
            layer(torch.randn(5, 16))
    stack.close()


def test_closed_stack_cannot_run():
    stack, _, _ = _one_rank_stack(layers=1, backend="alltoall")
    stack.close()
    with pytest.raises(DispatcherError, match="closed"), stack.step(3):
        stack.layers[0](torch.randn(3, 16))


def test_fused_backend_single_rank_both_paths():
    with registry_snapshot():
        v2_backends.register_all()
        for share in (True, False):
            stack, weights, router = _one_rank_stack(
                layers=1, backend="test_fused", mega_moe_num_max_tokens_per_rank=4,
                mega_moe_fix_memory=share)
            layer = stack.layers[0]
            assert layer.fused.shares_storage is share
            for n, path in ((4, "fused"), (5, "fallback"), (0, "fused")):
                before = dict(layer.path_counts)
                x = torch.randn(n, 16)
                with stack.step(n):
                    out = layer(x)
                torch.testing.assert_close(out, reference_moe(x, weights[0], router)[0],
                                           rtol=TOL, atol=TOL)
                assert layer.path_counts[path] == before[path] + 1
            stack.close()


# ---- multi-process -------------------------------------------------------------------------

def _case(name, dp_batches, **kw):
    args = kw.pop("args")
    return {"name": name, "args": args, "dp_batches": dp_batches, **kw}


CASES_4 = [
    _case("normal_layout_tp4_dp2", [[7, 3], [0, 5], [1, 0]], layers=4,
          args=dict(moe_a2a_backend="test_deepep_normal", tp_size=4, dp_size=2,
                    enable_dp_attention=True)),
    _case("ll_layout_tp4", [[13], [1], [0]], mode="decode",
          args=dict(moe_a2a_backend="test_deepep_ll", tp_size=4,
                    deepep_num_max_dispatch_tokens_per_rank=8)),
    _case("ll_layout_tp4_dp2", [[7, 3], [0, 5]], mode="decode",
          args=dict(moe_a2a_backend="test_deepep_ll", tp_size=4, dp_size=2,
                    enable_dp_attention=True, deepep_num_max_dispatch_tokens_per_rank=4)),
    # cap 3 per kernel rank; attention-TP 2 splits each DP batch
    _case("fused_tp4_dp2", [[6, 4], [7, 2], [2, 9], [0, 0]],
          args=dict(moe_a2a_backend="test_fused", tp_size=4, dp_size=2, enable_dp_attention=True,
                    mega_moe_num_max_tokens_per_rank=3)),
]


@pytest.mark.multiproc
def test_seams_on_4_ranks(pool4):
    per_rank = pool4.run(v2_checks.run_stack_cases, CASES_4)
    by_rank = [{r["name"]: r for r in results} for results in per_rank]
    for rank in range(4):
        for case in CASES_4:
            r = by_rank[rank][case["name"]]
            assert r["err"] <= TOL * max(1.0, r["scale"]), (rank, r)
    normal = [r["normal_layout_tp4_dp2"] for r in by_rank]
    # four layers, one communicator per process
    assert all(r["communicators"] == 1 and r["counting_communicators"] == 1 for r in normal)
    assert normal[0]["output"] == "DeepEPNormalOutput"
    assert by_rank[0]["ll_layout_tp4"]["output"] == "DeepEPLowLatencyOutput"
    fused = [r["fused_tp4_dp2"]["paths"] for r in by_rank]
    # step 1: DP rank 0 has 7 tokens (4 on its first attention-TP rank > cap 3) while DP rank 1
    # fits: every rank takes the fallback; step 2 likewise from DP rank 1; steps 0, 3 fit
    assert all(p == [["fused"], ["fallback"], ["fallback"], ["fused"]] for p in fused), fused
    assert all(r["fused_tp4_dp2"]["communicators"] == 2 for r in by_rank)  # fused + fallback


@pytest.mark.multiproc
def test_agree_batch_on_4_ranks(pool4):
    results = pool4.run(v2_checks.check_agree_batch)
    for r in results:
        assert r["dp"] == (5, 0) and r["modes"] == ["decode", "idle"]
        assert r["any_prefill"] is False and r["max_per_rank"] == 3
        assert "ranks 0 and 1 share DP rank 0" in r["error"]


@pytest.mark.multiproc
def test_moe_jobs_on_sub_groups(pool4):
    results = pool4.run(v2_checks.check_subgroup_jobs)
    assert [r["local_rank"] for r in results] == [0, 1, 0, 1]
    assert all(r["err"] <= TOL for r in results)
