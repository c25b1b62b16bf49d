"""What EPLB adds to a forward and what a rebalance costs, at the DeepSeek-V3 shape.

    python benchmarks/eplb_overhead.py                   # CPU
    python benchmarks/eplb_overhead.py --device cuda     # one GPU

Per layer call (median over repetitions, one process, EP rank 0 of a virtual ep): the router's
top-k (the reference point), each remap stage (replica dispatch static/dynamic, fused shared
columns, Waterfill static) and the recorder's ``observe``. Per rebalance: the placement
algorithm for 61 layers x 256 experts -> 288 slots over 32 GPUs, flat and hierarchical, and the
static dispatch table of one rank. No collective runs here (Waterfill dynamic adds one small
all-reduce per layer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict

import torch

from moe_a2a.dispatchers.batch import BatchInfo
from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.eplb import ExpertDistributionRecorder, ExpertLocation, ReplicaDispatch, static_dispatch_table
from moe_a2a.eplb.remap import RemapState, SharedColumns
from moe_a2a.routing import LogicalTopK, RouterConfig, route
from moe_a2a.step import RowSpan, StepContext


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: stable figures on a shared machine)")
    ns = parser.parse_args()
    device = torch.device(ns.device)
    torch.set_num_threads(ns.threads)
    layers, experts, top_k, ep, redundant = 61, 256, 8, 32, 32
    physical = experts + redundant
    gen = torch.Generator().manual_seed(0)
    load = torch.rand(layers, experts, generator=gen) ** 4 * 1000
    out: Dict[str, object] = {"device": str(device), "threads": ns.threads, "shape": {"layers": layers, "experts": experts,
                                                               "top_k": top_k, "ep": ep,
                                                               "physical": physical}}
    rebalance = {}
    for algorithm, groups in (("deepseek", None), ("deepseek_hierarchical", 8)):
        start = time.perf_counter()
        location = ExpertLocation.from_counts(load, physical, ep, algorithm=algorithm, num_groups=groups,
                                              num_nodes=4 if groups else 1)
        rebalance[f"{algorithm}_s"] = time.perf_counter() - start
    start = time.perf_counter()
    static_dispatch_table(location, 0, num_nodes=4)
    rebalance["static_table_s"] = time.perf_counter() - start
    out["rebalance"] = rebalance

    router = RouterConfig(num_experts=experts, top_k=top_k, scoring="sigmoid", n_group=8, topk_group=4,
                          renormalize=True, routed_scaling_factor=2.5, has_correction_bias=True)
    bias = torch.zeros(experts, device=device)
    groups = CommGroups(ep_size=ep, ep_rank=0)
    stages = {
        "static": RemapState(groups=groups, num_routed_experts=physical, per_rank=True,
                             replicas=ReplicaDispatch(location, algorithm="static", per_rank=True,
                                                      ep_rank=0, device=device)),
        "dynamic": RemapState(groups=groups, num_routed_experts=physical, per_rank=True,
                              replicas=ReplicaDispatch(location, algorithm="dynamic", per_rank=True,
                                                       ep_rank=0, device=device)),
        "static+fused_shared": RemapState(groups=groups, num_routed_experts=physical, per_rank=True,
                                          replicas=ReplicaDispatch(location, algorithm="static",
                                                                   per_rank=True, ep_rank=0, device=device),
                                          shared=SharedColumns()),
        "static+waterfill": RemapState(groups=groups, num_routed_experts=physical, per_rank=True,
                                       replicas=ReplicaDispatch(location, algorithm="static",
                                                                per_rank=True, ep_rank=0, device=device),
                                       shared=SharedColumns(placement="waterfill")),
    }
    recorder = ExpertDistributionRecorder(num_layers=layers, num_logical_experts=experts, groups=groups,
                                          device=device)
    recorder.start()
    per_call = {}
    for tokens in ns.tokens:
        logits = torch.randn(tokens, experts, device=device)
        topk: LogicalTopK = route(logits, router, bias)
        row: Dict[str, float] = {"router_ms": _median_ms(lambda: route(logits, router, bias), device,
                                                         ns.repeats)}
        for name, state in stages.items():
            row[f"{name}_ms"] = _median_ms(lambda: state.to_physical(topk, 3), device, ns.repeats)
        step = StepContext(index=0, batch=BatchInfo.single(tokens), groups=groups)
        recorder.on_step_begin(step)
        rows = RowSpan.replicated(tokens)
        row["recorder_observe_ms"] = _median_ms(lambda: recorder.observe(3, topk, rows, step), device,
                                                ns.repeats)
        per_call[str(tokens)] = row
    out["per_layer_call"] = per_call
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
