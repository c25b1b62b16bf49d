"""Where one EPMoE forward spends its time, per phase, on real ranks.

    python benchmarks/profile_layer.py --device cuda --tp-size 2 --backend alltoall

Spawns tp ranks; rank 0 prints median milliseconds per phase (router, dispatch, experts,
combine, whole layer) for a fixed batch, after warm-up, plus the first call of each new
batch size (to see one-off costs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from moe_a2a.dispatchers import CombineInput
from moe_a2a.layer import EPMoE
from moe_a2a.parallel import ParallelSizes, init_distributed, make_parallel_context, default_backend
from moe_a2a.routing import RouterConfig, default_groups
from moe_a2a.run import free_port
from moe_a2a.weights import MoEWeights
from moe_a2a.server_args import resolve


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - start) * 1e3


def worker(rank, opts, init_method):
    device = torch.device(opts.device, rank) if opts.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    init_distributed(rank, opts.tp_size, backend=default_backend(device), init_method=init_method)
    args = resolve(env={}, moe_a2a_backend=opts.backend, tp_size=opts.tp_size,
                   **({"ep_size": opts.tp_size} if opts.backend == "none" else {}))
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, device)
    dtype = getattr(torch, opts.dtype)
    n_group, topk_group = default_groups(opts.num_experts, opts.top_k)
    router = RouterConfig(num_experts=opts.num_experts, top_k=opts.top_k, scoring="sigmoid",
                          n_group=n_group, topk_group=topk_group, renormalize=True,
                          routed_scaling_factor=2.5, has_correction_bias=True)
    weights = MoEWeights.random(opts.num_experts, opts.hidden_size, opts.intermediate_size, 0,
                                seed=0, dtype=dtype, with_correction_bias=True)
    layer = EPMoE.build(weights, router, args, ctx, dtype=dtype)
    phases = {"router": [], "dispatch": [], "experts": [], "combine": [], "layer": []}

    def run_once(x, record):
        from moe_a2a.routing import route

        topk, t_r = _timed(lambda: route(x.float() @ layer.gate.t(), router, layer.correction_bias), device)
        d, t_d = _timed(lambda: layer.dispatcher.dispatch(x, topk), device)
        e, t_e = _timed(lambda: layer.experts(d), device)
        _, t_c = _timed(lambda: layer.dispatcher.combine(CombineInput(e, d)), device)
        _, t_l = _timed(lambda: layer(x), device)
        if record:
            for k, v in zip(phases, (t_r, t_d, t_e, t_c, t_l)):
                phases[k].append(v)
        return t_l

    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(opts.num_tokens, opts.hidden_size, generator=gen).to(device, dtype)
    for _ in range(opts.warmup):
        run_once(x, False)
    for _ in range(opts.iters):
        run_once(x, True)
    firsts = []
    for n in (opts.num_tokens + 7, opts.num_tokens + 13):
        y = torch.randn(n, opts.hidden_size, generator=gen).to(device, dtype)
        firsts.append((n, run_once(y, False), run_once(y, False)))
    if rank == 0:
        med = {k: round(statistics.median(v), 3) for k, v in phases.items()}
        print(f"backend={opts.backend} tp={opts.tp_size} device={device.type} tokens/rank="
              f"{opts.num_tokens} hidden={opts.hidden_size} E={opts.num_experts} k={opts.top_k} "
              f"{opts.dtype}: median ms {med}; new batch size (n, first ms, second ms): "
              + ", ".join(f"({n}, {a:.2f}, {b:.2f})" for n, a, b in firsts), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--tp-size", type=int, default=2)
    p.add_argument("--backend", default="alltoall")
    p.add_argument("--num-tokens", type=int, default=32)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=64)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    opts = p.parse_args()
    torch.multiprocessing.spawn(worker, args=(opts, f"tcp://127.0.0.1:{free_port()}"),
                                nprocs=opts.tp_size)


if __name__ == "__main__":
    main()
