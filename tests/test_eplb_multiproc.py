"""EPLB over real gloo ranks: rebalancing moves weights, Waterfill moves shared work, and every
layer's output still equals the single-process reference."""

import pytest

from eplb_checks import run_eplb_case, waterfill_exactly_once

pytestmark = pytest.mark.multiproc

SKEW = {"hot": (3, 9), "skew": 2.0}


def _check_outputs(results):
    for r in results:
        assert r["worst_ratio"] <= 1.0, r
        assert r["weights_match"], "a slot does not hold its logical expert's weights"


def test_rebalance_alltoall_static_moves_weights_and_keeps_outputs(pool4):
    case = {"args": {"moe_a2a_backend": "alltoall", "tp_size": 4, "enable_eplb": True,
                     "ep_num_redundant_experts": 4, "eplb_rebalance_num_iterations": 2},
            "batches": [[24], [24], [9], [24]], **SKEW}
    results = pool4.run(run_eplb_case, case)
    _check_outputs(results)
    first = results[0]["reports"][0]
    assert first["layers_changed"] == (0, 1) and first["window_steps"] == 2
    assert first["utilization_predicted"] > first["utilization_before"] + 0.1
    assert sum(r["reports"][0]["slots_received"] for r in results) > 0
    assert all(r["p2l"] == results[0]["p2l"] for r in results)  # one placement everywhere
    assert results[0]["p2l_changed"]


def test_rebalance_dynamic_dispatch_with_fused_shared_experts(pool4):
    case = {"args": {"moe_a2a_backend": "alltoall", "tp_size": 4, "enable_eplb": True,
                     "ep_num_redundant_experts": 4, "eplb_rebalance_num_iterations": 2,
                     "ep_dispatch_algorithm": "dynamic", "enforce_shared_experts_fusion": True,
                     "eplb_algorithm": "deepseek_hierarchical"},
            "batches": [[24], [0], [17], [24], [5]], **SKEW}
    results = pool4.run(run_eplb_case, case)
    _check_outputs(results)
    assert len(results[0]["reports"]) == 2 and results[0]["reports"][0]["layers_changed"]
    assert all(r["remote_shared"] == 0 for r in results)  # own slot: no traffic


@pytest.mark.parametrize("layout", [
    # moe-TP 2: slices move within their EP group; attention-TP ranks 0..3 span EP ranks 0, 1
    {"ep_size": 2},
    # DP attention: attention-TP pairs {0, 1}, {2, 3} span EP ranks, batches differ per DP rank
    {"ep_size": 4, "dp_size": 2, "enable_dp_attention": True},
])
def test_rebalance_replicated_layout(pool4, layout):
    """backend none: every attention-TP rank routes the same rows and computes its own experts,
    so replica and shared-slot choices must agree across ranks (row-based, never per rank)."""
    case = {"args": {"moe_a2a_backend": "none", "tp_size": 4, **layout, "enable_eplb": True,
                     "ep_num_redundant_experts": 4, "eplb_rebalance_num_iterations": 2,
                     "enforce_shared_experts_fusion": True},
            "batches": [[24, 10], [0, 7], [5, 0], [12, 12]], **SKEW}
    results = pool4.run(run_eplb_case, case)
    _check_outputs(results)
    assert results[0]["reports"][0]["layers_changed"]
    assert sum(r["remote_shared"] for r in results) > 0  # rows spread over the EP ranks


@pytest.mark.parametrize("dynamic", [False, True])
def test_waterfill_on_alltoall_keeps_outputs(pool4, dynamic):
    case = {"args": {"moe_a2a_backend": "alltoall", "tp_size": 4, "enforce_shared_experts_fusion": True,
                     "ep_num_redundant_experts": 4},
            "config": {"waterfill": True, "waterfill_dynamic": dynamic, "waterfill_min_batch": 4},
            "batches": [[64], [3], [0], [40]], **SKEW}
    results = pool4.run(run_eplb_case, case)
    _check_outputs(results)
    assert sum(r["remote_shared"] for r in results) > 0  # shared work really left home


@pytest.mark.parametrize("dynamic", [False, True])
def test_waterfill_places_every_shared_expert_once_and_levels_the_load(pool4, dynamic):
    case = {"num_experts": 16, "top_k": 4, "hot": [4, 5, 6], "tokens": [200, 150, 0, 90],
            "dynamic": dynamic, "min_batch": 64}
    load, shared = pool4.run(waterfill_exactly_once, case)[0]
    assert sum(shared) == sum(case["tokens"])               # exactly once per token
    local = [n for n in case["tokens"]]                      # everyone computing its own
    assert max(a + b for a, b in zip(load, shared)) < max(a + b for a, b in zip(load, local))


def test_recorder_counts_each_token_once(pool4):
    cases = [
        {"args": {"moe_a2a_backend": "alltoall", "tp_size": 4,
                  "expert_distribution_recorder_mode": "stat"},
         "config": {"enable_rebalance": False}, "batches": [[13], [7]]},
        {"args": {"moe_a2a_backend": "none", "tp_size": 4, "ep_size": 2,
                  "expert_distribution_recorder_mode": "per_pass"},
         "batches": [[13], [7]]},
    ]
    for case in cases:
        results = pool4.run(run_eplb_case, case)
        _check_outputs(results)
        assert results[0]["count_total"] == (13 + 7) * 4 * 2  # tokens x top-k x layers


def test_rebalance_on_two_ranks_dynamic_replicated(pool2):
    case = {"args": {"moe_a2a_backend": "none", "tp_size": 2, "ep_size": 2, "enable_eplb": True,
                     "ep_num_redundant_experts": 2, "eplb_rebalance_num_iterations": 1,
                     "ep_dispatch_algorithm": "dynamic"},
            "num_experts": 8, "top_k": 2, "n_group": 2, "topk_group": 1,
            "batches": [[20], [11], [6]], "hot": (5,), "skew": 2.0}
    results = pool2.run(run_eplb_case, case)
    _check_outputs(results)
    assert len(results[0]["reports"]) == 3
