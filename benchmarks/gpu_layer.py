"""One MoE layer on one device at the DeepSeek-V3 MoE shape: time per part, experts TFLOP/s
against the card's measured bf16 peak, decode time against the weight-read floor, host
overhead (eager minus CUDA-graph replay) and the CUDA-graph speed-up at decode sizes.

    python benchmarks/gpu_layer.py --out results.json                  # H200: the real shape
    python benchmarks/gpu_layer.py --device cpu --small --out x.json   # smoke test on a CPU

Everything is measured in one process, side by side: the card's peak (a large bf16 GEMM) and
bandwidth (a large device copy) first, then each runner and token count. GPU times are CUDA
events around many repetitions after warm-up (median).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch

from moe_a2a.dispatchers import CombineInput
from moe_a2a.parallel import ParallelSizes, make_parallel_context
from moe_a2a.routing import RouterConfig, route
from moe_a2a.runners import GroupedMMExperts
from moe_a2a.experts import ReferenceExperts
from moe_a2a.server_args import resolve
from moe_a2a.stack import MoEStack
from moe_a2a.weights import MoEWeights, SharedExpertWeights


def _timer(device: torch.device):
    if device.type == "cuda":
        def measure(fn: Callable[[], object], repeats: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(repeats):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
    else:
        def measure(fn: Callable[[], object], repeats: int) -> float:
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
    return measure


def card_figures(device: torch.device, measure, small: bool) -> Dict[str, float]:
    """bf16 GEMM TFLOP/s and device-copy GB/s, measured here."""
    n = 1024 if small else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ms = measure(lambda: a @ b, 5 if small else 30)
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    numel = (1 << 22) if small else (1 << 31)  # 4 GiB of bf16 on the GPU
    src = torch.empty(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms_copy = measure(lambda: dst.copy_(src), 5 if small else 20)
    gbps = 2 * numel * 2 / (ms_copy * 1e-3) / 1e9  # read + write
    del a, b, src, dst
    return {"bf16_gemm_tflops": tflops, "copy_gb_per_s": gbps, "gemm_n": n}


def dsv3_weights(device, dtype, e, h, i, shared_i, seed=0) -> MoEWeights:
    """DeepSeek-V3-like random weights created directly on the device (22.5 GB at full size)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    w_gate = torch.empty(e, i, h, device=device, dtype=dtype)
    w_up = torch.empty_like(w_gate)
    w_down = torch.empty(e, h, i, device=device, dtype=dtype)
    for k in range(e):  # one expert at a time: no fp32 copy of the whole stack
        w_gate[k] = randn(i, h, scale=h ** -0.5)
        w_up[k] = randn(i, h, scale=h ** -0.5)
        w_down[k] = randn(h, i, scale=i ** -0.5)
    shared = SharedExpertWeights(randn(shared_i, h, scale=h ** -0.5), randn(shared_i, h, scale=h ** -0.5),
                                 randn(h, shared_i, scale=shared_i ** -0.5))
    return MoEWeights(gate=randn(e, h, scale=h ** -0.5).float(),
                      correction_bias=(torch.randn(e, generator=g, device=device) * 0.1),
                      w_gate=w_gate, w_up=w_up, w_down=w_down, shared=shared)


def dsv3_setup(device: torch.device, small: bool):
    """``((E, H, I, K), weights, router)``: the DeepSeek-V3 MoE shape with random weights and
    its router (grouped top-k 8/4, sigmoid, correction bias, scaling 2.5); tiny with ``small``."""
    e, h, i, k = (16, 256, 128, 4) if small else (256, 7168, 2048, 8)
    n_group, topk_group = (4, 2) if small else (8, 4)
    weights = dsv3_weights(device, torch.bfloat16, e, h, i, i)
    router = RouterConfig(num_experts=e, top_k=k, scoring="sigmoid", n_group=n_group,
                          topk_group=topk_group, renormalize=True, routed_scaling_factor=2.5,
                          has_correction_bias=True)
    return (e, h, i, k), weights, router


def layer_figures(stack: MoEStack, runner_name: str, x: torch.Tensor, measure, card,
                  repeats: int, e: int, h: int, i: int, graph: bool) -> Dict[str, object]:
    layer = stack.layers[0]
    t = int(x.shape[0])
    router = layer.router
    out: Dict[str, object] = {"runner": runner_name, "tokens": t}

    def parts():
        topk = route(x.float() @ layer.gate.t(), router, layer.correction_bias)
        physical = layer.remap.to_physical(topk, 0)
        return topk, physical

    with stack.step(t):
        topk, physical = parts()
        batch = stack.current_step.batch
        d = layer.dispatcher.dispatch(x, physical, batch=batch)
        y = layer.experts(d)
        for _ in range(3):
            layer(x)
        out["router_ms"] = measure(lambda: parts(), repeats)
        out["dispatch_ms"] = measure(lambda: layer.dispatcher.dispatch(x, physical, batch=batch), repeats)
        out["experts_ms"] = measure(lambda: layer.experts(d), repeats)
        out["combine_ms"] = measure(lambda: layer.dispatcher.combine(
            CombineInput(expert_output=y, dispatch_output=d), batch=batch), repeats)
        out["shared_ms"] = measure(lambda: layer.shared(x), repeats)
        out["layer_ms"] = measure(lambda: layer(x), repeats)
        # host: how long the Python call takes to return (kernels launched, not waited for)
        launches = []
        for _ in range(repeats):
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            s = time.perf_counter()
            layer(x)
            launches.append((time.perf_counter() - s) * 1e3)
        out["host_call_ms"] = statistics.median(launches)
    pairs = t * router.top_k
    flops = 2 * pairs * h * i * 3
    out["experts_tflops"] = flops / (out["experts_ms"] * 1e-3) / 1e12
    out["experts_fraction_of_peak"] = out["experts_tflops"] / card["bf16_gemm_tflops"]
    touched = int(torch.unique(topk.ids).numel())
    weight_bytes = touched * 3 * h * i * x.element_size()
    out["experts_touched"] = touched
    # the copy's rate counts bytes read + written: the rate at which HBM moves bytes
    out["weight_read_floor_ms"] = weight_bytes / (card["copy_gb_per_s"] * 1e9) * 1e3
    out["layer_over_weight_floor"] = out["layer_ms"] / out["weight_read_floor_ms"]
    if graph and x.device.type == "cuda":
        out.update(graph_figures(stack, x, measure, repeats))
        out["host_overhead_ms"] = max(0.0, out["layer_ms"] - out["graph_layer_ms"])
        out["host_overhead_fraction"] = out["host_overhead_ms"] / out["layer_ms"]
    return out


def graph_figures(stack: MoEStack, x: torch.Tensor, measure, repeats: int) -> Dict[str, object]:
    """Capture the layer (the step agreed outside the graph) and replay it."""
    layer = stack.layers[0]
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with stack.step(int(x.shape[0]), capturing=True):
        with torch.cuda.stream(stream):
            for _ in range(3):
                eager = layer(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = layer(static_x)
    g.replay()
    torch.cuda.synchronize()
    err = float((static_out.float() - eager.float()).abs().max())
    ms = measure(lambda: g.replay(), repeats)
    return {"graph_layer_ms": ms, "graph_max_abs_diff_vs_eager": err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--tokens", default="128,512,4096")
    p.add_argument("--runners", default="reference,grouped_mm")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", required=True)
    opts = p.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    measure = _timer(device)
    card = card_figures(device, measure, opts.small)
    (e, h, i, k), weights, router = dsv3_setup(device, opts.small)
    args = resolve(env={}, moe_a2a_backend="none", tp_size=1)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), 0, device)
    runners = {"reference": ReferenceExperts(), "grouped_mm": GroupedMMExperts()}
    rows: List[Dict[str, object]] = []
    stacks = {}
    for name in opts.runners.split(","):
        stacks[name] = MoEStack.build([weights], router, args, ctx, dtype=torch.bfloat16,
                                      runner=runners[name])
    gen = torch.Generator(device=device).manual_seed(1)
    check = torch.randn(512 if not opts.small else 64, h, generator=gen, device=device).to(torch.bfloat16)
    outs = {}
    for name, stack in stacks.items():
        with stack.step(int(check.shape[0])):
            outs[name] = stack.layers[0](check).float()
    diff = (float((outs["grouped_mm"] - outs["reference"]).abs().max())
            if len(outs) == 2 else None)
    for t in (int(v) for v in opts.tokens.split(",")):
        x = torch.randn(t, h, generator=gen, device=device).to(torch.bfloat16)
        for name, stack in stacks.items():
            graph = name == "grouped_mm"
            rows.append(layer_figures(stack, name, x, measure, card, opts.repeats, e, h, i, graph))
            print(json.dumps(rows[-1]), flush=True)
    result = {"card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "shape": {"experts": e, "hidden": h, "intermediate": i,
                                                    "top_k": k, "dtype": "bfloat16"},
              "card_figures": card, "grouped_vs_reference_max_abs_diff": diff, "rows": rows}
    with open(opts.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)


if __name__ == "__main__":
    main()
