"""The deepep and megamoe backends, end to end over the kernel emulations (multi-process gloo),
their kernel requirements and their errors."""

from __future__ import annotations

import pytest
import torch

import kernel_checks
from kernel_checks import D, P
from moe_a2a.backends import DeepEPSettings, MegaMoESettings
from moe_a2a.dispatchers import CommGroups, DispatcherError, DispatcherSetup
from moe_a2a.dispatchers.deepep import DeepEPDispatcher, deepep_requirements
from moe_a2a.dispatchers.megamoe import MEGA_MOE_REQUIREMENTS, MegaMoE
from moe_a2a.testing import emulate_kernels

BF16_TOL = 2.5e-2  # relative to the output scale (bf16 activations and weights)
FP8_TOL = 1e-1     # e4m3 weights and activations


def _case(name, steps, hidden=2048, **kw):
    return {"name": name, "steps": steps, "hidden": hidden, **kw}


CASES_4 = [
    # DeepEP normal under DP attention (attention-TP 2): uneven DP batches, empty ranks
    _case("normal_tp4_dp2", [([7, 3], [P, P]), ([0, 5], [P, P]), ([1, 0], [P, P])], layers=2,
          args=dict(moe_a2a_backend="deepep", deepep_mode="normal", tp_size=4, dp_size=2,
                    enable_dp_attention=True,
                    deepep_config='{"normal_dispatch": {"num_sms": 24}, "normal_combine": '
                                  '{"num_sms": 24, "num_max_nvl_chunked_recv_tokens": 128}}')),
    # low latency over 4 attention-TP ranks: 13 tokens -> at most 4 per rank = the capacity
    _case("ll_tp4", [([13], [D]), ([1], [D]), ([0], [D])],
          args=dict(moe_a2a_backend="deepep", deepep_mode="low_latency", tp_size=4,
                    deepep_num_max_dispatch_tokens_per_rank=4)),
    # auto: a prefill step, decode steps, a step where one DP rank prefills (normal everywhere)
    _case("auto_tp4_dp2", [([6, 4], [P, P]), ([3, 5], [D, D]), ([0, 2], [D, D]), ([5, 1], [P, D]),
                           ([2, 2], [D, D])],
          args=dict(moe_a2a_backend="deepep", deepep_mode="auto", tp_size=4, dp_size=2,
                    enable_dp_attention=True, deepep_num_max_dispatch_tokens_per_rank=8)),
    # a decode batch above the low-latency capacity: every rank raises, naming the flag
    _case("ll_over_cap", [([4, 1], [D, D]), ([5, 0], [D, D])],
          args=dict(moe_a2a_backend="deepep", deepep_mode="low_latency", tp_size=4, dp_size=2,
                    enable_dp_attention=True, deepep_num_max_dispatch_tokens_per_rank=2)),
    # Mega-MoE, SM100 bf16 API: cap 3 per kernel rank; steps 1-2 exceed it on one DP rank
    _case("mega_sm100", [([6, 4], [P, P]), ([7, 2], [P, P]), ([2, 9], [D, D]), ([0, 0], [D, D])],
          hidden=512, inter=512,
          args=dict(moe_a2a_backend="megamoe", tp_size=4, dp_size=2, enable_dp_attention=True,
                    mega_moe_num_max_tokens_per_rank=3)),
    # Mega-MoE, SM90 FP8 API (SGLang's fork), without weight sharing
    _case("mega_sm90", [([12], [P]), ([13], [D]), ([0], [D])], hidden=512, inter=512, cc=(9, 0),
          args=dict(moe_a2a_backend="megamoe", tp_size=4, mega_moe_num_max_tokens_per_rank=3,
                    mega_moe_fix_memory=False)),
]


@pytest.mark.multiproc
def test_kernel_backends_on_4_ranks(pool4):
    per_rank = pool4.run(kernel_checks.run_kernel_cases, CASES_4)
    by_rank = [{r["name"]: r for r in results} for results in per_rank]
    for rank, results in enumerate(by_rank):
        for name, r in results.items():
            tol = FP8_TOL if name == "mega_sm90" else BF16_TOL
            assert r["err"] <= tol * max(1.0, r["scale"]), (rank, r)
            assert r["closed"], r  # close() destroyed the DeepEP buffer / symmetric buffers
    normal = by_rank[0]["normal_tp4_dp2"]
    assert normal["error"] is None and normal["output"] == "DeepEPNormalOutput"
    assert normal["modes"] == [["normal"]] * 3 and normal["communicators"] == 1
    assert normal["buffer_bytes"][0] > 0 and normal["buffer_bytes"][1] == 0  # intranode: NVL only
    assert normal["dispatch_sms"] == 24 and normal["qps"] == 24  # --deepep-config reached it
    ll = by_rank[0]["ll_tp4"]
    assert ll["output"] == "DeepEPLowLatencyOutput" and ll["modes"] == [["low_latency"]] * 3
    assert ll["buffer_bytes"][0] == 0 and ll["buffer_bytes"][1] > 0
    for r in by_rank:
        auto = r["auto_tp4_dp2"]
        assert auto["error"] is None
        assert auto["modes"] == [["normal"], ["low_latency"], ["low_latency"], ["normal"],
                                 ["low_latency"]], auto
        assert auto["cleans"] == 2  # normal -> low_latency twice, each cleaned
        over = r["ll_over_cap"]
        assert over["modes"] == [["low_latency"]]  # the first step fit (2 tokens per rank)
        assert "3 tokens on one rank exceed --deepep-num-max-dispatch-tokens-per-rank 2" in over["error"]
        assert "raise --deepep-num-max-dispatch-tokens-per-rank to at least 3" in over["error"]
        mega = r["mega_sm100"]
        assert mega["paths"] == [["fused"], ["fallback"], ["fallback"], ["fused"]], mega
        assert mega["variant"] == "sm100_bf16" and mega["shared_storage"] == ("w_down",)
        assert mega["communicators"] == 2 and mega["symm_buffers"] == 1
        sm90 = r["mega_sm90"]
        assert sm90["paths"] == [["fused"], ["fallback"], ["fused"]], sm90
        assert sm90["variant"] == "sm90_fp8" and sm90["shared_storage"] == ()


@pytest.mark.multiproc
def test_deepep_fp8_dispatch_on_2_ranks(pool2):
    for r in pool2.run(kernel_checks.check_fp8_dispatch):
        assert r["normal"]["format"] == "DeepEPNormalOutput"
        assert r["low_latency"]["format"] == "DeepEPLowLatencyOutput"
        for mode in ("normal", "low_latency"):
            assert r[mode]["payload"] == "torch.float8_e4m3fn" and r[mode]["scales"] == "torch.float32"
            assert r[mode]["dtype"] == "torch.bfloat16"
            assert r[mode]["grouped_runner_agrees"] is True  # both runners dequantise
            assert r[mode]["rel_err"] < FP8_TOL, r


# ---- single process --------------------------------------------------------------------------

def test_deepep_requirements_per_mode():
    ll = deepep_requirements("low_latency")
    assert ll.hidden_sizes == (2048, 2560, 4096, 5120, 6144, 7168, 8192) and ll.max_top_k == 11
    normal = deepep_requirements("normal")
    assert normal.hidden_sizes is None and normal.ep_sizes[:3] == (2, 4, 8)
    auto = deepep_requirements("auto")
    assert auto.hidden_sizes == ll.hidden_sizes and auto.ep_sizes == normal.ep_sizes
    assert auto.max_top_k == 11 and auto.dtypes == ("bfloat16",)
    assert deepep_requirements("low_latency", fp8_dispatch=True).hidden_sizes == ll.hidden_sizes  # all % 512
    problems = {p.field for p in auto.problems(dtype=torch.float32, hidden_size=128, top_k=12,
                                               ep_size=6, num_experts=12)}
    assert problems == {"dtype", "hidden_size", "top_k", "ep_size"}
    assert auto.default_hidden_size(128) == 2048 and auto.default_dtype("float32") == "bfloat16"
    assert MEGA_MOE_REQUIREMENTS.default_intermediate_size(64) == 512
    with pytest.raises(DispatcherError, match="DeepEP low-latency kernels are compiled for hidden "
                                              "sizes 2048, .* not 1000"):
        ll.check("x", hidden_size=1000)


def _setup(backend_settings, *, hidden=2048, dtype=torch.bfloat16, ep=2):
    groups = CommGroups(rank=0, world_size=ep, world_group=object(), ep_size=ep, ep_group=object())
    return DispatcherSetup(groups=groups, num_experts=8, top_k=2, hidden_size=hidden, dtype=dtype,
                           settings=backend_settings)


def test_deepep_refuses_unsupported_shapes_before_building_a_buffer():
    with emulate_kernels(["deep_ep"]):
        with pytest.raises(DispatcherError, match="low-latency kernels are compiled for hidden sizes"):
            DeepEPDispatcher(_setup(DeepEPSettings(mode="low_latency"), hidden=1000))
        with pytest.raises(DispatcherError, match="take bfloat16 activations, not float32"):
            DeepEPDispatcher(_setup(DeepEPSettings(mode="normal"), dtype=torch.float32))
        with pytest.raises(DispatcherError, match="one EP group of all 2 ranks"):
            groups = CommGroups(rank=0, world_size=2, world_group=object(), ep_size=1,
                                moe_tp_size=2, moe_tp_group=object())
            DeepEPDispatcher(DispatcherSetup(groups=groups, num_experts=8, top_k=2,
                                             hidden_size=2048, dtype=torch.bfloat16))


def test_deepep_config_is_validated():
    from moe_a2a.dispatchers.deepep import _parse_config

    with emulate_kernels(["deep_ep"]):
        import deep_ep

        dispatch, combine, sms = _parse_config(deep_ep, {
            "normal_dispatch": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 8},
            "normal_combine": {"num_sms": 24}})
        assert dispatch.num_sms == 24 and dispatch.num_max_nvl_chunked_send_tokens == 8
        assert combine.num_max_nvl_chunked_recv_tokens == 256 and sms == 24
        assert _parse_config(deep_ep, None) == (None, None, None)
        for bad, needle in (({"low_latency": {}}, "has keys \\['low_latency'\\]"),
                            ({"normal_dispatch": {"sms": 2}}, "normal_dispatch has \\['sms'\\]"),
                            ({"normal_dispatch": {"num_sms": 20}, "normal_combine": {"num_sms": 24}},
                             "different num_sms \\[20, 24\\]"),
                            ({"normal_dispatch": {"num_max_nvl_chunked_send_tokens": 300}},
                             "deep_ep.Config\\(.*\\) for normal_dispatch failed")):
            with pytest.raises(DispatcherError, match=needle):
                _parse_config(deep_ep, bad)


def test_missing_packages_fail_with_the_import_error_and_hint():
    """Building without the package (and without the emulation) names both."""
    import importlib.util

    if importlib.util.find_spec("deep_ep") is None:
        with pytest.raises(DispatcherError, match="import deep_ep failed: ModuleNotFoundError.*"
                                                  "install: build DeepEP"):
            DeepEPDispatcher(_setup(DeepEPSettings(mode="normal")))
    if importlib.util.find_spec("deep_gemm") is None:
        with pytest.raises(DispatcherError, match="import deep_gemm failed: ModuleNotFoundError"):
            MegaMoE(_setup(MegaMoESettings(), hidden=512))


def test_megamoe_needs_a_device_variant_and_prepared_weights():
    from moe_a2a.dispatchers import BatchInfo, PhysicalTopK
    from moe_a2a.dispatchers.megamoe import select_variant

    with emulate_kernels(["deep_gemm"], compute_capability=(8, 0)):
        import deep_gemm

        with pytest.raises(DispatcherError, match="exist for compute capability 9.x .* 10.x"):
            select_variant(torch.device("cpu"), deep_gemm)
    with emulate_kernels(["deep_gemm"]):
        import deep_gemm

        assert select_variant(torch.device("cpu"), deep_gemm).name == "sm100_bf16"
        fused = MegaMoE(_setup(MegaMoESettings(), hidden=512))
        with pytest.raises(DispatcherError, match="before prepare_weights"):
            fused.forward(torch.zeros(1, 512, dtype=torch.bfloat16),
                          PhysicalTopK(torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2)),
                          batch=BatchInfo.single(1))
        with pytest.raises(DispatcherError, match="hidden size divisible by 512, not 500"):
            MegaMoE(_setup(MegaMoESettings(), hidden=500))
