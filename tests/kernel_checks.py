"""Rank-pool checks of the deepep and megamoe backends over the kernel emulations (gloo).

Module-level functions, importable by name (``RankPool.run`` pickles them). Every check enters
``moe_a2a.testing.emulate_kernels`` in its own rank, as a user's multi-rank test would.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from moe_a2a.dispatchers import DispatcherError, ForwardMode
from moe_a2a.parallel import ParallelSizes, make_parallel_context
from moe_a2a.reference import reference_moe
from moe_a2a.routing import RouterConfig
from moe_a2a.server_args import resolve
from moe_a2a.stack import MoEStack
from moe_a2a.testing import emulate_kernels
from moe_a2a.weights import MoEWeights

P, D = ForwardMode.PREFILL, ForwardMode.DECODE


def _router(num_experts: int, top_k: int = 2) -> RouterConfig:
    return RouterConfig(num_experts=num_experts, top_k=top_k, scoring="sigmoid", renormalize=True,
                        routed_scaling_factor=1.5, has_correction_bias=True)


def _x(step: int, dp_rank: int, n: int, hidden: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step * 31 + dp_rank)
    return torch.randn(n, hidden, generator=gen).to(torch.bfloat16)


def run_kernel_cases(rank: int, world: int, cases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each case: a MoEStack on deepep/megamoe under the emulation; ``steps`` is a list of
    ``(dp_batches, dp_modes)``. Returns, per case, the worst error against the single-process
    reference (bf16 weights upcast), the paths and kernel modes per step, what was built, and
    the error of a step that raised (then the case stops)."""
    results = []
    for case in cases:
        with emulate_kernels(compute_capability=case.get("cc", (10, 0))):
            results.append(_run_case(rank, case))
    return results


def _run_case(rank: int, case: Dict[str, Any]) -> Dict[str, Any]:
    args = resolve(env={}, **case["args"])
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, torch.device("cpu"))
    experts, hidden, inter = case.get("experts", 8), case["hidden"], case.get("inter", 16)
    router = _router(experts, case.get("top_k", 2))
    weights = [MoEWeights.random(experts, hidden, inter, inter, seed=i, with_correction_bias=True,
                                 dtype=torch.bfloat16) for i in range(case.get("layers", 1))]
    stack = MoEStack.build(weights, router, args, ctx, dtype=torch.bfloat16)
    g = ctx.groups
    worst, scale, paths, modes, error = 0.0, 0.0, [], [], None
    try:
        for step, (sizes, dp_modes) in enumerate(case["steps"]):
            n = sizes[g.dp_rank]
            x = _x(step, g.dp_rank, n, hidden)
            before_paths = dict(stack.path_counts())
            before_modes = _mode_counts(stack)
            with stack.step(n, dp_modes[g.dp_rank]):
                h = x
                for layer, w in zip(stack.layers, weights):
                    out = layer(h)
                    if n:
                        ref, _ = reference_moe(h.float(), w, router)
                        worst = max(worst, float((out.float() - ref).abs().max()))
                        scale = max(scale, float(ref.abs().max()))
                    h = h + out
            now = stack.path_counts()
            paths.append(sorted(p for p in now if now[p] > before_paths.get(p, 0)))
            after = _mode_counts(stack)
            modes.append(sorted(m for m in after if after[m] > before_modes.get(m, 0)))
    except DispatcherError as exc:
        error = str(exc)
    layer = stack.layers[0]
    comm = (layer.fused or layer.dispatcher).comm
    out = {"name": case["name"], "err": worst, "scale": scale, "paths": paths, "modes": modes,
           "error": error, "communicators": len(stack.communicators),
           "cleans": getattr(comm, "cleans", None),
           "buffer_bytes": (getattr(comm, "num_nvl_bytes", None), getattr(comm, "num_rdma_bytes", None)),
           "output": layer.dispatcher.output_class.__name__ if layer.dispatcher else None,
           "variant": getattr(getattr(layer.fused, "variant", None), "name", None),
           "shared_storage": getattr(layer.fused, "shared_storage", None),
           "symm_buffers": getattr(comm, "num_buffers", None),
           "qps": getattr(comm, "num_qps_per_rank", None),
           "dispatch_sms": getattr(getattr(comm, "dispatch_config", None), "num_sms", None)}
    stack.close()
    out["closed"] = comm.closed and getattr(comm, "buffer", None) is None
    return out


def _mode_counts(stack: MoEStack) -> Dict[str, int]:
    total: Dict[str, int] = {}
    for layer in stack.layers:
        for mode, n in getattr(layer.dispatcher, "mode_counts", {}).items():
            total[mode] = total.get(mode, 0) + n
    return total


# ---- the deep_ep emulation itself, against hand-computed expectations ----------------------

def check_deep_ep_emulation(rank: int, world: int) -> Dict[str, Any]:
    """Exact checks of the emulated Buffer on integer-valued rows (exact in bf16)."""
    import torch.distributed as dist

    out: Dict[str, Any] = {}
    with emulate_kernels(["deep_ep"]):
        import deep_ep

        group = dist.new_group(list(range(world)))
        num_experts, hidden, cap, top_k, num_tokens = 4 * world, 2048, 16, 3, 5 + rank
        local = num_experts // world
        config = deep_ep.Buffer.get_dispatch_config(world)
        nvl = max(config.get_nvl_buffer_size_hint(hidden * 2, world),
                  deep_ep.Buffer.get_combine_config(world).get_nvl_buffer_size_hint(hidden * 2, world))
        rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(cap, hidden, world, num_experts)
        buffer = deep_ep.Buffer(group, nvl, rdma, low_latency_mode=True,
                                num_qps_per_rank=local, explicitly_destroy=True)
        gen = torch.Generator().manual_seed(rank)
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k]
                           for _ in range(num_tokens)])
        ids[0, 1] = -1                                     # a masked column
        weights = torch.rand(num_tokens, top_k, generator=gen)
        # row t of rank r holds the value 100 * r + t everywhere (exact in bf16)
        x = (100 * rank + torch.arange(num_tokens)).to(torch.bfloat16)[:, None].repeat(1, hidden)

        # normal: layout, dispatch, combine
        per_rank, rdma_counts, per_expert, in_rank, _ = buffer.get_dispatch_layout(ids, num_experts)
        recv_x, recv_ids, recv_w, counts, handle, event = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=rdma_counts,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=ids,
            topk_weights=weights)
        gathered = _gather_objects((ids, weights, num_tokens), group, world)
        expect_rows, expect_ids, expect_w = [], [], []
        for src, (sids, sw, sn) in enumerate(gathered):
            for t in range(sn):
                row = sids[t]
                mine = (row >= rank * local) & (row < (rank + 1) * local)
                if mine.any():
                    expect_rows.append(100 * src + t)
                    expect_ids.append(torch.where(mine, row - rank * local, torch.full_like(row, -1)))
                    expect_w.append(torch.where(mine, sw[t], torch.zeros_like(sw[t])))
        out["normal_rows"] = recv_x[:, 0].float().tolist() == [float(v) for v in expect_rows]
        out["normal_rows_uniform"] = bool((recv_x == recv_x[:, :1]).all())
        out["normal_ids"] = torch.equal(recv_ids, torch.stack(expect_ids)) if expect_ids else recv_ids.numel() == 0
        out["normal_weights"] = torch.equal(recv_w, torch.stack(expect_w)) if expect_w else True
        stacked = torch.stack(expect_ids) if expect_ids else torch.empty(0, top_k)
        ref_counts = [int((stacked == e).sum()) for e in range(local)]
        out["normal_counts"] = counts == ref_counts
        out["handle_types"] = [str(t.dtype) for t in handle]
        out["event_is_overlap"] = type(event).__name__ == "EventOverlap" and event.event is None
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
        reached = in_rank.sum(dim=1, keepdim=True).to(torch.float32)
        out["normal_combine"] = torch.equal(combined.float(), x.float() * reached)
        masked_w = weights.masked_fill(ids < 0, 0)
        out["normal_combine_weights"] = torch.allclose(combined_w, masked_w)
        cached_x, *rest = buffer.dispatch(x, handle=handle)
        out["cached"] = torch.equal(cached_x, recv_x) and all(r is None for r in rest[:4])
        worst = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                num_tokens_per_expert=per_expert, topk_idx=ids,
                                topk_weights=weights, num_worst_tokens=64)
        out["worst"] = (worst[0].shape[0] == 64 and worst[3] == []
                        and bool((worst[1][recv_x.shape[0]:] == -1).all()))

        # low latency: refuses before the buffer is cleaned, then dispatch/combine
        try:
            buffer.low_latency_dispatch(x, ids, cap, num_experts, use_fp8=False)
            out["dirty_refused"] = False
        except RuntimeError as exc:
            out["dirty_refused"] = "clean_low_latency_buffer" in str(exc)
        buffer.clean_low_latency_buffer(cap, hidden, num_experts)
        stats = torch.zeros(local, dtype=torch.int32)
        packed, count, ll_handle, event, hook = buffer.low_latency_dispatch(
            x, ids, cap, num_experts, cumulative_local_expert_recv_stats=stats, use_fp8=False)
        out["ll_shapes"] = (tuple(packed.shape), str(packed.dtype), tuple(count.shape), str(count.dtype),
                            hook is None)
        expect_count = [sum(int((s_ids == rank * local + e).sum()) for s_ids, _, _ in gathered)
                        for e in range(local)]
        out["ll_count"] = count.tolist() == expect_count and stats.tolist() == expect_count
        src_info, layout_range = ll_handle[0], ll_handle[1]
        ok = True
        for e in range(local):
            for src in range(world):
                begin, n = int(layout_range[e, src]) >> 32, int(layout_range[e, src]) & (2**32 - 1)
                want = [t for t in range(gathered[src][2])
                        if bool((gathered[src][0][t] == rank * local + e).any())]
                got = src_info[e, begin:begin + n].tolist()
                rows = packed[e, begin:begin + n, 0].float().tolist()
                ok &= got == want and rows == [float(100 * src + t) for t in want]
        out["ll_layout"] = ok
        combined = buffer.low_latency_combine(packed.nan_to_num(0.0), ids, weights, ll_handle)[0]
        out["ll_combine"] = torch.allclose(combined.float(),
                                           x.float() * masked_w.sum(dim=1, keepdim=True),
                                           rtol=1e-2)
        packed_h, _, _, _, hook = buffer.low_latency_dispatch(x, ids, cap, num_experts,
                                                              use_fp8=False, return_recv_hook=True)
        before = bool(torch.isnan(packed_h.float()).all())
        hook()
        out["hook"] = before and torch.equal(packed_h.nan_to_num(0), packed.nan_to_num(0))
        fp8, _, _, _, _ = buffer.low_latency_dispatch(x, ids, cap, num_experts, use_fp8=True)
        data, scales = fp8
        from moe_a2a.dispatchers.fp8 import dequantize_per_token

        valid = ~torch.isnan(packed.float()[..., 0])
        deq = dequantize_per_token(data[valid], scales[valid])
        out["fp8"] = (str(data.dtype), str(scales.dtype), tuple(scales.shape), scales.stride()[1] == 1,
                      bool(torch.allclose(deq, packed.float()[valid], rtol=0.07)))
        ue8m0, _, _, _, _ = buffer.low_latency_dispatch(x, ids, cap, num_experts, use_fp8=True,
                                                        round_scale=True, use_ue8m0=True)
        out["ue8m0"] = (str(ue8m0[1].dtype), tuple(ue8m0[1].shape))

        # what the kernels refuse
        refused = {}
        for name, call in {
            "capacity": lambda: buffer.low_latency_dispatch(
                torch.zeros(cap + 1, hidden, dtype=torch.bfloat16),
                torch.zeros(cap + 1, top_k, dtype=torch.int64), cap, num_experts),
            "hidden": lambda: buffer.low_latency_dispatch(
                torch.zeros(2, 1024, dtype=torch.bfloat16), ids[:2], cap, num_experts),
            "ll_dtype": lambda: buffer.low_latency_dispatch(x.float(), ids, cap, num_experts),
            "combine_dtype": lambda: buffer.combine(recv_x.float(), handle),
            "ue8m0_needs_round": lambda: buffer.low_latency_dispatch(x, ids, cap, num_experts,
                                                                     use_ue8m0=True),
            "topk_int64": lambda: buffer.low_latency_dispatch(x, ids.int(), cap, num_experts),
        }.items():
            refused[name] = _refusal(call)
        out["refused"] = refused
        small = deep_ep.Buffer(group, 1024, 0, explicitly_destroy=True)
        try:
            small.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                           num_tokens_per_expert=per_expert, topk_idx=ids, topk_weights=weights)
            out["small_nvl"] = None
        except RuntimeError as exc:
            out["small_nvl"] = str(exc)
        try:
            small.clean_low_latency_buffer(cap, hidden, num_experts)
            out["not_ll"] = None
        except RuntimeError as exc:
            out["not_ll"] = str(exc)
        small.destroy()
        buffer.destroy()
        try:
            buffer.get_dispatch_layout(ids, num_experts)
            out["destroyed"] = None
        except AttributeError as exc:
            out["destroyed"] = str(exc)
    return out


def _refusal(call) -> Any:
    """The kernel's error text, or None when the call went through."""
    try:
        call()
    except RuntimeError as exc:
        return str(exc)
    return None


def _gather_objects(obj: Any, group, world: int) -> List[Any]:
    import torch.distributed as dist

    everyone: List[Any] = [None] * world
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def check_deep_gemm_emulation(rank: int, world: int) -> Dict[str, Any]:
    """The emulated Mega-MoE kernels against a plain per-pair computation of the same numerics."""
    import torch.distributed as dist

    from moe_a2a.dispatchers.fp8 import quantize_blocks, quantize_per_token

    out: Dict[str, Any] = {}
    group = dist.new_group(list(range(world)))
    num_experts, hidden, inter, top_k, cap = 2 * world, 512, 512, 2, 8
    local = num_experts // world
    gen = torch.Generator().manual_seed(11)  # the same global weights on every rank
    w_gate = torch.randn(num_experts, inter, hidden, generator=gen) * hidden ** -0.5
    w_up = torch.randn(num_experts, inter, hidden, generator=gen) * hidden ** -0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=gen) * inter ** -0.5
    mine = slice(rank * local, (rank + 1) * local)
    num_tokens = 3 + rank
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    ids[0, 0] = -1
    weights = torch.rand(num_tokens, top_k, generator=gen)

    def reference(wg, wu, wd) -> torch.Tensor:
        ref = torch.zeros(num_tokens, hidden)
        for t in range(num_tokens):
            for k in range(top_k):
                e = int(ids[t, k])
                if e < 0:
                    continue
                g = (x[t].float() @ wg[e].float().t()).bfloat16().float()
                u = (x[t].float() @ wu[e].float().t()).bfloat16().float()
                act = (torch.nn.functional.silu(g) * u * weights[t, k]).bfloat16().float()
                ref[t] += (act @ wd[e].float().t()).bfloat16().float()
        return ref

    with emulate_kernels(["deep_gemm"], compute_capability=(10, 0)):
        import deep_gemm

        l1 = torch.cat([w_gate[mine], w_up[mine]], dim=1).bfloat16()
        tl1, tl2 = deep_gemm.transform_weights_for_mega_moe(l1, w_down[mine].bfloat16().contiguous())
        out["interleaved"] = not torch.equal(tl1, l1) and torch.equal(tl1[:, 8:16], l1[:, inter:inter + 8])
        buf = deep_gemm.get_symm_buffer_for_mega_moe(group, num_experts, cap, top_k, hidden, inter,
                                                     mma_type="bf16xbf16")
        out["aligned_cap"] = buf.num_max_tokens_per_rank
        out["views"] = (str(buf.x.dtype), buf.x_sf is None, str(buf.topk_idx.dtype),
                        str(buf.topk_weights.dtype), tuple(buf.x.shape))
        buf.x[:num_tokens].copy_(x)
        buf.topk_idx[:num_tokens].copy_(ids)
        buf.topk_weights[:num_tokens].copy_(weights)
        y = torch.empty(num_tokens, hidden, dtype=torch.bfloat16)
        stats = torch.zeros(local, dtype=torch.int32)
        deep_gemm.bf16_mega_moe(y, tl1, tl2, buf, cumulative_local_expert_recv_stats=stats)
        ref = reference(w_gate.bfloat16(), w_up.bfloat16(), w_down.bfloat16())
        out["bf16_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
        refused = {}
        for name, call in {
            "untransformed_shape": lambda: deep_gemm.bf16_mega_moe(y, l1[:, :inter], tl2, buf),
            "fp32_weights": lambda: deep_gemm.bf16_mega_moe(y, tl1.float(), tl2, buf),
            "too_many_tokens": lambda: deep_gemm.bf16_mega_moe(
                torch.empty(buf.num_max_tokens_per_rank + 1, hidden, dtype=torch.bfloat16), tl1, tl2, buf),
        }.items():
            refused[name] = _refusal(call)
        out["refused"] = refused
        buf.destroy()
    with emulate_kernels(["deep_gemm"], compute_capability=(9, 0)):
        import deep_gemm

        q1, s1 = quantize_blocks(torch.cat([w_gate[mine], w_up[mine]], dim=1))
        q2, s2 = quantize_blocks(w_down[mine])
        tl1, tl2 = deep_gemm.transform_weights_for_mega_moe_sm90((q1, s1), (q2, s2))
        buf = deep_gemm.get_symm_buffer_for_sm90_mega_moe(group, num_experts, cap, top_k, hidden, inter)
        qx, sx = quantize_per_token(x)
        buf.x[:num_tokens].copy_(qx)
        buf.x_sf[:num_tokens].copy_(sx)
        buf.topk_idx[:num_tokens].copy_(ids)
        buf.topk_weights[:num_tokens].copy_(weights)
        y = torch.empty(num_tokens, hidden, dtype=torch.bfloat16)
        deep_gemm.fp8_mega_moe(y, tl1, tl2, buf)
        ref = reference(w_gate, w_up, w_down)
        out["fp8_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
        buf.destroy()
        sm100 = deep_gemm.get_symm_buffer_for_mega_moe(group, num_experts, cap, top_k, hidden,
                                                       inter, mma_type="bf16xbf16")
        try:  # the SM100 kernel on an (emulated) SM90 device
            deep_gemm.bf16_mega_moe(y, deep_gemm.transform_weights_for_mega_moe(
                l1, w_down[mine].bfloat16().contiguous())[0], w_down[mine].bfloat16().contiguous(),
                sm100)
            out["arch"] = None
        except RuntimeError as exc:
            out["arch"] = str(exc)
        sm100.destroy()
    return out


def check_fp8_dispatch(rank: int, world: int) -> Dict[str, Any]:
    """DeepEP with ``fp8_dispatch``, built directly (no server flag sets it): both modes move
    e4m3 rows with scales; the reference experts dequantise; the result matches the oracle."""
    from moe_a2a.backends import DeepEPSettings
    from moe_a2a.dispatchers import BatchInfo, CombineInput, DispatcherSetup
    from moe_a2a.dispatchers.deepep import DeepEPDispatcher
    from moe_a2a.experts import LocalExperts
    from moe_a2a.routing import route
    from moe_a2a.runners import GroupedMMExperts

    args = resolve(env={}, moe_a2a_backend="deepep", tp_size=world)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, torch.device("cpu"))
    experts, hidden = 4 * world, 2048
    weights = MoEWeights.random(experts, hidden, 16, 0, seed=5, dtype=torch.bfloat16)
    router = RouterConfig(num_experts=experts, top_k=2)
    out: Dict[str, Any] = {}
    with emulate_kernels(["deep_ep"]):
        for mode in ("normal", "low_latency"):
            setup = DispatcherSetup(groups=ctx.groups, num_experts=experts, top_k=2,
                                    hidden_size=hidden, dtype=torch.bfloat16,
                                    settings=DeepEPSettings(mode=mode, fp8_dispatch=True))
            dispatcher = DeepEPDispatcher(setup)
            local = LocalExperts(weights.shard(setup.placement))
            grouped = LocalExperts(weights.shard(setup.placement), GroupedMMExperts())
            x = _x(7, rank, 3 + rank, hidden)
            topk = route(x.float() @ weights.gate.float().t(), router)
            from moe_a2a.dispatchers import PhysicalTopK

            physical = PhysicalTopK(topk.ids, topk.weights)
            batch = BatchInfo(forward_mode=ForwardMode.DECODE, num_tokens=x.shape[0],
                              dp_num_tokens=tuple(3 + r for r in range(world)),
                              dp_forward_modes=(ForwardMode.DECODE,) * world)
            dispatched = dispatcher.dispatch(x, physical, batch=batch)
            expert_out = local(dispatched)
            same = torch.allclose(grouped(dispatched).float(), expert_out.float(), atol=0.05,
                                  rtol=0.05)
            y = dispatcher.combine(CombineInput(expert_output=expert_out,
                                                dispatch_output=dispatched), batch=batch)
            ref, _ = reference_moe(x.float(), weights, router)
            out[mode] = {"format": type(dispatched).__name__,
                         "payload": str(dispatched.hidden_states.dtype),
                         "scales": None if dispatched.scales is None else str(dispatched.scales.dtype),
                         "rel_err": float((y.float() - ref).abs().max() / ref.abs().max()),
                         "dtype": str(y.dtype), "grouped_runner_agrees": same}
            dispatcher.close()
    return out
