"""The deep_ep / deep_gemm emulations: importable under the real names, the real signatures,
exact results over gloo ranks, and the kernels' refusals."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types

import pytest
import torch

import kernel_checks
from moe_a2a.testing import EMULATED_PACKAGES, emulate_kernels

# ---- the real APIs, recorded ------------------------------------------------------------------
# Parameter names, order and defaults as the real sources declare them (annotations dropped):
#   DeepEP v1.2.1 (tag v1.2.1, commit 9af0e0d0e74f3577af1979c9b9e1ac2cad0104ee):
#     deep_ep/buffer.py, deep_ep/utils.py; Config from csrc/deep_ep.cpp's pybind11 py::arg list
#   DeepGEMM (deepseek-ai/DeepGEMM commit 54e22612409371d6364144b69086735beb54e98b):
#     deep_gemm/mega/__init__.py
#   SGLang's DeepGEMM fork, SM90 Mega-MoE: transform_weights_for_mega_moe_sm90 and fp8_mega_moe
#     from sgl-project/DeepGEMM refs/pull/24/head (commit
#     805f7e800cbece9b8d84f35bedfd0b3788c47bb2) deep_gemm/mega/__init__.py;
#     get_symm_buffer_for_sm90_mega_moe and SM90SymmBuffer from the sgl-deep-gemm wheel
#     interface (a fork's deep_gemm/__init__.py, __version__ 2.8.0; the code index did not name
#     its commit), whose fp8_mega_moe / transform signatures equal the ones above.
REAL_DEEP_EP = {
    "Buffer.__init__": "(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=False, comm=None)",
    "Buffer.destroy": "(self)",
    "Buffer.is_sm90_compiled": "()",
    "Buffer.set_num_sms": "(new_num_sms)",
    "Buffer.capture": "()",
    "Buffer.get_low_latency_rdma_size_hint": "(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)",
    "Buffer.get_comm_stream": "(self)",
    "Buffer.get_local_buffer_tensor": "(self, dtype, size=None, offset=0, use_rdma_buffer=False)",
    "Buffer.get_dispatch_config": "(num_ranks)",
    "Buffer.get_combine_config": "(num_ranks)",
    "Buffer.get_dispatch_layout": "(self, topk_idx, num_experts, previous_event=None, async_finish=False, allocate_on_comm_stream=False)",
    "Buffer.dispatch": "(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None, expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False, allocate_on_comm_stream=False)",
    "Buffer.combine": "(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False, allocate_on_comm_stream=False)",
    "Buffer.clean_low_latency_buffer": "(self, num_max_dispatch_tokens_per_rank, hidden, num_experts)",
    "Buffer.low_latency_dispatch": "(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None, use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False, return_recv_hook=False)",
    "Buffer.low_latency_combine": "(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False, async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None)",
    "Buffer.get_next_low_latency_combine_buffer": "(self, handle)",
    "EventOverlap.__init__": "(self, event=None, extra_tensors=None)",
    "EventOverlap.current_stream_wait": "(self)",
    "EventOverlap.__enter__": "(self)",
    "EventOverlap.__exit__": "(self, exc_type, exc_val, exc_tb)",
    "Config.__init__": "(self, num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256, num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256)",
}
REAL_DEEP_GEMM = {
    "SymmBuffer.__init__": "(self, group, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden, num_ring_tokens, mma_type='fp8xfp4', activation='swiglu')",
    "SymmBuffer.destroy": "(self)",
    "get_symm_buffer_for_mega_moe": "(group, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden, use_fp8_dispatch=None, mma_type='fp8xfp4', activation='swiglu')",
    "transform_weights_for_mega_moe": "(l1_weights, l2_weights, activation='swiglu')",
    "fp8_fp4_mega_moe": "(y, l1_weights, l2_weights, sym_buffer, cumulative_local_expert_recv_stats=None, recipe=(1, 1, 32), activation='swiglu', activation_clamp=None, fast_math=True)",
    "bf16_mega_moe": "(y, l1_weights, l2_weights, sym_buffer, cumulative_local_expert_recv_stats=None, activation='swiglu', activation_clamp=None, fast_math=True)",
    "SM90SymmBuffer.__init__": "(self, group, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden, use_fp8_dispatch=True, activation='swiglu')",
    "get_symm_buffer_for_sm90_mega_moe": "(group, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden, use_fp8_dispatch=True, activation='swiglu')",
    "transform_weights_for_mega_moe_sm90": "(l1_weights, l2_weights)",
    "fp8_mega_moe": "(y, l1_weights, l2_weights, sym_buffer, cumulative_local_expert_recv_stats=None, recipe=(128, 128, 128), activation='swiglu', activation_clamp=None, fast_math=True)",
}


def _signature(obj) -> str:
    params = []
    for p in inspect.signature(obj).parameters.values():
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, (obj, p)
        params.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
    return f"({', '.join(params)})"


def _resolve(module, dotted: str):
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part) if not isinstance(obj, type) else obj.__dict__[part]
    return obj.__func__ if isinstance(obj, staticmethod) else obj


@pytest.mark.parametrize("package, recorded", [("deep_ep", REAL_DEEP_EP),
                                               ("deep_gemm", REAL_DEEP_GEMM)])
def test_signatures_match_the_real_apis(package, recorded):
    with emulate_kernels([package]):
        module = __import__(package)
        seen = {name: _signature(_resolve(module, name)) for name in recorded}
    assert seen == recorded


def test_importable_in_a_plain_python_process():
    code = ("from moe_a2a.testing import emulate_kernels\n"
            "with emulate_kernels():\n"
            "    import deep_ep, deep_gemm\n"
            "    from deep_ep import Buffer, Config, EventOverlap\n"
            "    from deep_gemm.mega import bf16_mega_moe\n"
            "    import deep_ep.buffer, deep_ep.utils\n"
            "    print(deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0


def test_installs_and_restores_sys_modules(monkeypatch):
    real = types.ModuleType("deep_ep")  # a "real" installed package must come back
    real_sub = types.ModuleType("deep_ep.buffer")
    monkeypatch.setitem(sys.modules, "deep_ep", real)
    monkeypatch.setitem(sys.modules, "deep_ep.buffer", real_sub)
    with emulate_kernels(["deep_ep"], compute_capability=(9, 0)) as infos:
        import deep_ep

        assert deep_ep is not real and deep_ep.__moe_a2a_emulation__ is infos[0]
        assert infos[0].compute_capability == (9, 0) and "DeepEP v1.2.1" in infos[0].emulates
        assert "deep_gemm" not in sys.modules
        with emulate_kernels(["deep_gemm"]):  # nesting
            import deep_gemm

            assert sys.modules["deep_ep"] is deep_ep and deep_gemm.__moe_a2a_emulation__
        assert "deep_gemm" not in sys.modules
    assert sys.modules["deep_ep"] is real and sys.modules["deep_ep.buffer"] is real_sub
    with pytest.raises(ValueError, match="no emulation for \\['pplx'\\]"):
        with emulate_kernels(["pplx"]):
            pass
    assert set(EMULATED_PACKAGES) == {"deep_ep", "deep_gemm"}


def test_importing_moe_a2a_does_not_import_kernel_packages():
    code = ("import sys, moe_a2a.dispatchers, moe_a2a.dispatchers.deepep, "
            "moe_a2a.dispatchers.megamoe, moe_a2a.testing\n"
            "print(sorted(m for m in sys.modules if m.startswith(('deep_ep', 'deep_gemm'))))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_config_and_size_hints_follow_deepep():
    with emulate_kernels(["deep_ep"]):
        import deep_ep

        config = deep_ep.Config(24, 6, 256, 6, 128)
        assert config.get_rdma_buffer_size_hint(4096, 8) == 0        # intranode: no RDMA
        assert config.get_nvl_buffer_size_hint(4096, 8) % 128 == 0
        # larger rows, more ranks -> more bytes; the recommended configs exist per EP size
        assert config.get_nvl_buffer_size_hint(8192, 8) > config.get_nvl_buffer_size_hint(4096, 8)
        assert deep_ep.Buffer.get_dispatch_config(4).num_max_nvl_chunked_send_tokens == 6
        with pytest.raises(AssertionError, match="Unsupported number of EP ranks: 6"):
            deep_ep.Buffer.get_dispatch_config(6)
        with pytest.raises(RuntimeError, match="num_max_nvl_chunked_send_tokens < "):
            deep_ep.Config(20, 300, 256)
        hint = deep_ep.Buffer.get_low_latency_rdma_size_hint
        assert hint(128, 7168, 8, 256) % 128 == 0 and hint(256, 7168, 8, 256) > hint(128, 7168, 8, 256)
        with pytest.raises(ValueError, match="Either 'group' or 'comm'"):
            deep_ep.Buffer(None)
        with pytest.raises(AssertionError, match="SM count must be even"):
            deep_ep.Buffer.set_num_sms(3)


@pytest.mark.multiproc
def test_deep_ep_emulation_exact_on_2_ranks(pool2):
    for r in pool2.run(kernel_checks.check_deep_ep_emulation):
        for key in ("normal_rows", "normal_rows_uniform", "normal_ids", "normal_weights",
                    "normal_counts", "event_is_overlap", "normal_combine", "normal_combine_weights",
                    "cached", "worst", "dirty_refused", "ll_count", "ll_layout", "ll_combine", "hook"):
            assert r[key] is True, (key, r)
        assert r["handle_types"] == ["torch.int32"] * 4 + ["torch.bool", "torch.int32"]
        assert r["ll_shapes"] == ((4, 32, 2048), "torch.bfloat16", (4,), "torch.int32", True)
        assert r["fp8"] == ("torch.float8_e4m3fn", "torch.float32", (4, 32, 16), True, True)
        assert r["ue8m0"] == ("torch.int32", (4, 32, 4))
        refused = r["refused"]
        assert "num_max_dispatch_tokens_per_rank" in refused["capacity"]
        assert "Unsupported hidden" in refused["hidden"] and "2048" in refused["hidden"]
        assert "kBFloat16" in refused["ll_dtype"]
        assert "Unsupported type" in refused["combine_dtype"]
        assert "round_scale" in refused["ue8m0_needs_round"]
        assert "kInt64" in refused["topk_int64"]
        assert "num_nvl_bytes=1024" in r["small_nvl"] and "get_nvl_buffer_size_hint" in r["small_nvl"]
        assert "low_latency_mode" in r["not_ll"]
        assert "'NoneType' object has no attribute" in r["destroyed"]


@pytest.mark.multiproc
def test_deep_gemm_emulation_on_2_ranks(pool2):
    for r in pool2.run(kernel_checks.check_deep_gemm_emulation):
        assert r["interleaved"] and r["aligned_cap"] == 384
        assert r["views"] == ("torch.bfloat16", True, "torch.int64", "torch.float32", (384, 512))
        assert r["bf16_err"] < 1e-2, r          # the bf16 kernel's own rounding only
        assert r["fp8_err"] < 0.12, r           # e4m3 weights and activations, twice
        assert "l1 [E, 2I, H]" in r["refused"]["untransformed_shape"]
        assert "kBFloat16" in r["refused"]["fp32_weights"]
        assert "num_tokens <= num_max_tokens_per_rank" in r["refused"]["too_many_tokens"]
        assert "Unsupported architecture" in r["arch"] and "SM100" in r["arch"]


def test_fp8_fp4_kernel_is_checked_but_not_computed():
    with emulate_kernels(["deep_gemm"]):
        import deep_gemm

        class One:
            def size(self):
                return 1

            def rank(self):
                return 0

        buf = deep_gemm.get_symm_buffer_for_mega_moe(One(), 2, 8, 1, 128, 128)
        assert buf.x.dtype == torch.float8_e4m3fn and buf.x_sf.dtype == torch.int32
        y = torch.empty(1, 128, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="rk == 32"):
            deep_gemm.fp8_fp4_mega_moe(y, (torch.empty(2, 256, 64),), None, buf, recipe=(1, 1, 128))
        with pytest.raises(NotImplementedError, match="FP4 weight layouts"):
            deep_gemm.fp8_fp4_mega_moe(y, (torch.empty(2, 256, 64),), None, buf)
        with pytest.warns(DeprecationWarning, match="use_fp8_dispatch"):
            deep_gemm.get_symm_buffer_for_mega_moe(One(), 2, 8, 1, 128, 128, use_fp8_dispatch=True)


def test_pytest_fixture(emulated_kernels):
    import deep_ep
    import deep_gemm

    assert [i.package for i in emulated_kernels] == ["deep_ep", "deep_gemm"]
    assert deep_ep.__moe_a2a_emulation__.compute_capability == (10, 0)
    assert deep_gemm.__moe_a2a_emulation__ is emulated_kernels[1]


@pytest.mark.parametrize("emulated_kernels", [{"packages": ["deep_gemm"],
                                               "compute_capability": (9, 0)}], indirect=True)
def test_pytest_fixture_options(emulated_kernels):
    import deep_gemm

    assert deep_gemm.__moe_a2a_emulation__.compute_capability == (9, 0)
    assert "deep_ep" not in sys.modules
