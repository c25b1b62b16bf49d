"""Routed-experts capture on 4 gloo ranks: every gather strategy against the reference router,
and the strategies against each other (identical rows)."""

import pytest
import torch

import routed_experts_checks

pytestmark = pytest.mark.multiproc

DP2 = dict(tp_size=4, dp_size=2, enable_dp_attention=True)
# uneven splits over attention-TP 2 (7 -> 4 + 3), an empty attention-TP rank (1 -> 1 + 0), an
# empty DP rank, a step where every rank is empty
BATCHES_DP2 = [[7, 3], [0, 5], [1, 0], [0, 0], [6, 6]]


def _case(name, batches, **kw):
    return {"name": name, "dp_batches": batches, **kw}


CASES = [
    # the gather really runs: attention-TP 2 under DP attention
    _case("alltoall_dp2_early", BATCHES_DP2, args=dict(moe_a2a_backend="alltoall",
                                                       routed_experts_gather="early", **DP2)),
    _case("alltoall_dp2_late", BATCHES_DP2, args=dict(moe_a2a_backend="alltoall",
                                                      routed_experts_gather="late", **DP2)),
    # replicated layout with DP attention: each DP rank's own rows, no collective
    _case("none_dp2_none", BATCHES_DP2, args=dict(moe_a2a_backend="none", ep_size=2,
                                                  routed_experts_gather="none", **DP2)),
    _case("none_dp2_early", BATCHES_DP2, args=dict(moe_a2a_backend="none", ep_size=2,
                                                   routed_experts_gather="early", **DP2)),
    _case("none_dp2_late", BATCHES_DP2, args=dict(moe_a2a_backend="none", ep_size=2,
                                                  routed_experts_gather="late", **DP2)),
    # attention-TP 4 (no DP attention): 9 -> 3 + 2 + 2 + 2, 1 -> 1 + 0 + 0 + 0
    _case("alltoall_tp4_early", [[9], [1], [0]], layers=3,
          args=dict(moe_a2a_backend="alltoall", tp_size=4, routed_experts_gather="early")),
    _case("alltoall_tp4_late", [[9], [1], [0]], layers=3,
          args=dict(moe_a2a_backend="alltoall", tp_size=4, routed_experts_gather="late")),
    # a fused backend: scattered on steps within its cap (3 per rank), replicated fallback above
    _case("fused_dp2_early", [[6, 4], [7, 2], [0, 0], [2, 9]], register_test_backends=True,
          args=dict(moe_a2a_backend="test_fused", mega_moe_num_max_tokens_per_rank=3,
                    routed_experts_gather="early", **DP2)),
    _case("fused_dp2_late", [[6, 4], [7, 2], [0, 0], [2, 9]], register_test_backends=True,
          args=dict(moe_a2a_backend="test_fused", mega_moe_num_max_tokens_per_rank=3,
                    routed_experts_gather="late", **DP2)),
    # the DeepEP normal output format (test backend, exact-split all-to-all underneath)
    _case("deepep_layout_dp2_early", BATCHES_DP2, register_test_backends=True,
          args=dict(moe_a2a_backend="test_deepep_normal", routed_experts_gather="early", **DP2)),
    # transformers' DeepseekV3 router as the reference (its columns are unsorted: sets)
    _case("hf_deepseek_v3_dp2_late", [[7, 3], [5, 0]], hf="deepseek_v3",
          args=dict(moe_a2a_backend="alltoall", routed_experts_gather="late", **DP2)),
]


@pytest.fixture(scope="module")
def results(pool4):
    per_rank = pool4.run(routed_experts_checks.run_capture_cases, CASES)
    return [{r["name"]: r for r in rank_results} for rank_results in per_rank]


def _rows(results, name, rank):
    return results[rank][name]["rows"]


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_every_row_matches_the_reference_router(results, case):
    for rank in range(4):
        r = results[rank][case]
        assert r["counts"]["mismatches"] == 0, (rank, r["counts"])
        assert r["counts"]["exact"] + r["counts"]["ties"] > 0 or not r["rows"]
        assert r["unwritten"] == [[-1] * len(row) for row in r["unwritten"]]  # sentinel
    # attention-TP ranks of one DP rank hold the same rows
    by_dp = {}
    for rank in range(4):
        by_dp.setdefault(results[rank][case]["dp_rank"], []).append(_rows(results, case, rank))
    for copies in by_dp.values():
        assert all(c == copies[0] for c in copies)


def test_gathers_really_ran(results):
    assert results[0]["alltoall_dp2_early"]["attn_tp_size"] == 2
    assert results[0]["alltoall_tp4_late"]["attn_tp_size"] == 4
    early = results[0]["alltoall_dp2_early"]["collectives"]
    late = results[0]["alltoall_dp2_late"]["collectives"]
    # DP rank 0's batches 7, 0, 1, 0, 6: one all-gather per layer (2) vs one per step, none
    # when the whole attention-TP group is empty
    assert early == [2, 0, 2, 0, 2] and late == [1, 0, 1, 0, 1]
    assert results[0]["none_dp2_none"]["collectives"] == [0] * 5
    # replicated layout: early and late find nothing scattered
    assert results[0]["none_dp2_late"]["collectives"] == [0] * 5


@pytest.mark.parametrize("a, b", [
    ("alltoall_dp2_early", "alltoall_dp2_late"),
    ("none_dp2_none", "none_dp2_early"),
    ("none_dp2_none", "none_dp2_late"),
    ("alltoall_tp4_early", "alltoall_tp4_late"),
    ("fused_dp2_early", "fused_dp2_late"),
    ("alltoall_dp2_early", "deepep_layout_dp2_early"),
])
def test_strategies_give_identical_rows(results, a, b):
    for rank in range(4):
        assert _rows(results, a, rank) == _rows(results, b, rank), rank


def test_fused_backend_mixes_scattered_and_replicated_steps(results):
    r = results[0]["fused_dp2_late"]
    assert r["paths"]["fused"] > 0 and r["paths"]["fallback"] > 0
    # fused steps (scattered) gather, fallback steps (replicated) do not
    assert r["collectives"] == [1, 0, 0, 0]


def test_an_oversized_step_is_refused_on_every_rank(pool4):
    messages = pool4.run(routed_experts_checks.check_refused_together)
    assert all("6 tokens on DP rank 1 but the device cache holds 4" in m for m in messages), messages


def test_deepep_through_the_emulation(pool4):
    """DeepEP normal and low-latency through ``moe_a2a.testing.emulate_kernels`` (issue 9)."""
    import moe_a2a.testing

    if not hasattr(moe_a2a.testing, "emulate_kernels"):
        pytest.skip("moe_a2a.testing.emulate_kernels (the DeepEP emulation) has not landed")
    cases = [
        _case(f"deepep_{mode}_{gather}", [[7, 3], [0, 5], [1, 0]], emulate=True,
              hidden=2048, dtype=torch.bfloat16,  # what DeepEP's kernels (and the emulation) take
              args=dict(moe_a2a_backend="deepep", deepep_mode=mode, routed_experts_gather=gather,
                        **DP2))
        for mode in ("normal", "low_latency") for gather in ("early", "late")]
    per_rank = pool4.run(routed_experts_checks.run_capture_cases, cases)
    for rank_results in per_rank:
        by_name = {r["name"]: r for r in rank_results}
        for case in cases:
            assert by_name[case["name"]]["counts"]["mismatches"] == 0
        for mode in ("normal", "low_latency"):
            assert by_name[f"deepep_{mode}_early"]["rows"] == by_name[f"deepep_{mode}_late"]["rows"]
