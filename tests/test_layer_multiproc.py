"""EPMoE on 2 and 4 gloo ranks against the single-process reference (one pool per size)."""

import pytest

import layer_checks

pytestmark = pytest.mark.multiproc

FP32_TOL = 1e-4
BF16_TOL = 3e-2


def _check(per_rank_results, cases):
    """Every rank within tolerance; some rank really computed something in every case."""
    by_name = [{r["name"]: r for r in results} for results in per_rank_results]
    for case in cases:
        rows = [ranks[case["name"]] for ranks in by_name]
        assert max(r["scale"] for r in rows) > 0, f"{case['name']}: no rank had tokens"
        for rank, r in enumerate(rows):
            tol = (BF16_TOL if case.get("dtype") == "bfloat16" else FP32_TOL) * max(1.0, r["scale"])
            assert r["max_abs_err"] <= tol, f"{case['name']} rank {rank}: err {r['max_abs_err']} > {tol}"
    return by_name[0]


def _case(name, dp_batches, **kw):
    args = kw.pop("args")
    return {"name": name, "args": args, "dp_batches": dp_batches, **kw}


CASES_2 = [
    _case("none_tp2_moe_tp2", [[9], [0], [1]], args=dict(moe_a2a_backend="none", tp_size=2)),
    _case("none_tp2_ep2", [[9], [1]], args=dict(moe_a2a_backend="none", tp_size=2, ep_size=2)),
    _case("alltoall_tp2", [[9], [1], [0]], args=dict(moe_a2a_backend="alltoall", tp_size=2)),
    _case("none_tp2_dp2", [[5, 3], [0, 4], [0, 0]],
          args=dict(moe_a2a_backend="none", tp_size=2, ep_size=2, dp_size=2, enable_dp_attention=True)),
    _case("alltoall_tp2_dp2", [[5, 3], [4, 0]],
          args=dict(moe_a2a_backend="alltoall", tp_size=2, dp_size=2, enable_dp_attention=True)),
    _case("alltoall_tp2_bf16", [[12]], dtype="bfloat16",
          args=dict(moe_a2a_backend="alltoall", tp_size=2)),
    _case("none_tp2_bf16", [[12]], dtype="bfloat16",
          args=dict(moe_a2a_backend="none", tp_size=2, ep_size=2)),
    _case("none_tp2_dp2_standalone", [[5, 3], [0, 2]], standalone=True,
          args=dict(moe_a2a_backend="none", tp_size=2, ep_size=2, dp_size=2, enable_dp_attention=True)),
]

CASES_4 = [
    _case("none_tp4_ep4", [[10], [1]], args=dict(moe_a2a_backend="none", tp_size=4, ep_size=4)),
    _case("none_tp4_ep2", [[10]], args=dict(moe_a2a_backend="none", tp_size=4, ep_size=2)),
    _case("none_tp4_ep2_dp2", [[7, 2], [0, 5]],
          args=dict(moe_a2a_backend="none", tp_size=4, ep_size=2, dp_size=2, enable_dp_attention=True)),
    _case("none_tp4_ep4_dp4", [[3, 0, 6, 1]],
          args=dict(moe_a2a_backend="none", tp_size=4, ep_size=4, dp_size=4, enable_dp_attention=True)),
    _case("alltoall_tp4", [[13], [1], [0]], args=dict(moe_a2a_backend="alltoall", tp_size=4)),
    _case("alltoall_tp4_dp2", [[7, 3], [0, 5], [1, 0]],
          args=dict(moe_a2a_backend="alltoall", tp_size=4, dp_size=2, enable_dp_attention=True)),
    _case("alltoall_tp4_dp4", [[3, 0, 6, 1], [0, 0, 0, 2]],
          args=dict(moe_a2a_backend="alltoall", tp_size=4, dp_size=4, enable_dp_attention=True)),
    _case("alltoall_all_on_one_expert", [[16]], scoring="softmax", top_k=1, one_expert=6,
          args=dict(moe_a2a_backend="alltoall", tp_size=4)),
    _case("none_all_on_one_expert", [[16]], scoring="softmax", top_k=1, one_expert=6,
          args=dict(moe_a2a_backend="none", tp_size=4, ep_size=4)),
    _case("alltoall_topk_all_experts", [[6]], scoring="softmax", top_k=8,
          args=dict(moe_a2a_backend="alltoall", tp_size=4)),
    _case("none_topk_all_experts_grouped", [[6, 4]], top_k=8, n_group=4, topk_group=4,
          args=dict(moe_a2a_backend="none", tp_size=4, ep_size=2, dp_size=2, enable_dp_attention=True)),
    _case("alltoall_no_shared", [[8]], shared_intermediate=0,
          args=dict(moe_a2a_backend="alltoall", tp_size=4)),
    _case("alltoall_tp4_dp2_bf16", [[9, 7]], dtype="bfloat16",
          args=dict(moe_a2a_backend="alltoall", tp_size=4, dp_size=2, enable_dp_attention=True)),
]


def test_layer_2_ranks(pool2):
    by_name = _check(pool2.run(layer_checks.run_layer_cases, CASES_2), CASES_2)
    assert by_name["alltoall_tp2"]["dispatcher"] == "AllToAllDispatcher"
    assert by_name["none_tp2_moe_tp2"]["dispatcher"] == "StandardDispatcher"
    assert by_name["none_tp2_moe_tp2"]["moe_tp_size"] == 2
    assert by_name["alltoall_tp2"]["ep_size"] == 2  # derived from tp by the backend's ep policy


def test_layer_4_ranks(pool4):
    by_name = _check(pool4.run(layer_checks.run_layer_cases, CASES_4), CASES_4)
    assert by_name["alltoall_tp4_dp2"]["attn_tp_size"] == 2  # the scatter/gather really runs
    assert by_name["none_tp4_ep2_dp2"]["moe_tp_size"] == 2


HF_CASES = [
    {"name": "deepseek_v3_alltoall", "config": "deepseek_v3",
     "args": dict(moe_a2a_backend="alltoall", tp_size=2), "dp_batches": [[7], [1]]},
    {"name": "qwen3_moe_none_dp2", "config": "qwen3_moe",
     "args": dict(moe_a2a_backend="none", tp_size=2, ep_size=2, dp_size=2, enable_dp_attention=True),
     "dp_batches": [[5, 0], [2, 3]]},
    {"name": "mixtral_alltoall", "config": "mixtral",
     "args": dict(moe_a2a_backend="alltoall", tp_size=2), "dp_batches": [[6]]},
]


def test_hf_blocks_2_ranks(pool2):
    from moe_a2a.hf import example_hf_config

    cases = [dict(c, config=str(example_hf_config(c["config"]))) for c in HF_CASES]
    results = pool2.run(layer_checks.run_hf_cases, cases)
    for rank_results in results:
        for r in rank_results:
            assert r["max_abs_err"] <= 1e-4, r
