"""Routed-experts capture: what it costs, side by side in one run.

    python benchmarks/routed_experts.py [--parts layers,capture,get_topk,wire] [--device cpu]
                                        [--out results.json]

* ``layers``: a MoE layer stack on 4 ranks (tp 4, dp 2, DP attention, alltoall: attention-TP
  2, so captured ids really are gathered) with capture off, ``early`` and ``late``: median
  time per layer and all-gathers per step.
* ``capture``: the capture alone at a DeepSeek-V3 depth (61 layers, top-8) on the same 4-rank
  layout: median time of one step (61 ``observe`` + ``on_step_end``) per strategy, so the
  gather cost is not hidden in the experts' time.
* ``get_topk``: one request of a 32k-token sequence out of a 40k-slot host cache (61 layers,
  top-8): median time against ``start_len``.
* ``wire``: one 32k-row request (61 layers, top-8) in the wire format vs SGLang's plain int32
  base64 payload: bytes, encode and decode time, at 128, 256 and 384 experts.

Times are medians of repeated runs on this machine; compare within one run only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist

from moe_a2a.dispatchers import BatchInfo, ForwardMode
from moe_a2a.parallel import (ParallelSizes, default_backend, destroy_distributed, init_distributed,
                              make_parallel_context)
from moe_a2a.routed_experts import RoutedExpertsCapturer, capture_sizes
from moe_a2a.routed_experts_wire import decode_routed_experts, encode_routed_experts
from moe_a2a.routing import LogicalTopK, RouterConfig
from moe_a2a.run import free_port
from moe_a2a.server_args import resolve
from moe_a2a.stack import MoEStack
from moe_a2a.step import RowSpan, StepContext
from moe_a2a.weights import MoEWeights

RANKS = 4
LAYOUT = dict(moe_a2a_backend="alltoall", tp_size=RANKS, dp_size=2, enable_dp_attention=True)
DEEP_LAYERS, DEEP_TOP_K = 61, 8   # DeepSeek-V3


def _medians_ms(fns: Dict[str, Callable[[], Any]], reps: int,
                sync: Callable[[], None] = lambda: None) -> Dict[str, float]:
    """Median milliseconds of each function, run in turn within every repetition (a machine
    shared with other work drifts; interleaving keeps the comparison side by side)."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


# ---- multi-rank parts ------------------------------------------------------------------------

def _worker(rank: int, opts: argparse.Namespace, init_method: str, out_path: str) -> None:
    device = torch.device(opts.device, rank) if opts.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    init_distributed(rank, RANKS, backend=default_backend(device), init_method=init_method,
                     device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    results: Dict[str, Any] = {}
    try:
        if "layers" in opts.parts:
            results["layers"] = _bench_layers(rank, device, opts, sync)
        if "capture" in opts.parts:
            results["capture"] = _bench_capture(rank, device, opts, sync)
    finally:
        destroy_distributed()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def _bench_layers(rank, device, opts, sync) -> List[Dict[str, Any]]:
    num_layers, tokens = opts.layers, opts.tokens
    router = RouterConfig(num_experts=64, top_k=8, scoring="sigmoid", n_group=8, topk_group=4,
                          renormalize=True, routed_scaling_factor=2.5, has_correction_bias=True)
    weights = [MoEWeights.random(64, opts.hidden, 64, 64, seed=i, with_correction_bias=True)
               for i in range(num_layers)]
    x = torch.randn(tokens, opts.hidden, generator=torch.Generator().manual_seed(rank // 2))
    x = x.to(device)
    stacks, steps = {}, {}
    for mode in ("off", "early", "late"):
        extra = {} if mode == "off" else dict(enable_return_routed_experts=True,
                                              routed_experts_gather=mode)
        args = resolve(env={}, **LAYOUT, **extra)
        ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, device)
        capture = None if mode == "off" else capture_sizes(args, num_token_slots=tokens * 64,
                                                           max_step_tokens=tokens)
        stack = MoEStack.build(weights, router, args, ctx, capture=capture).to(device)
        stacks[mode] = stack

        def one_step(stack=stack, count=[0]):
            slots = torch.arange(tokens, device=device) + (count[0] % 64) * tokens
            count[0] += 1
            with stack.step(tokens, token_slots=slots if stack.routed_experts else None):
                h = x
                for layer in stack.layers:
                    h = h + layer(h)

        steps[mode] = one_step
        one_step()
        one_step()
    before = {m: s.routed_experts.collectives if s.routed_experts else 0 for m, s in stacks.items()}
    ms = _medians_ms(steps, opts.reps, sync)
    rows = []
    for mode, stack in stacks.items():
        after = stack.routed_experts.collectives if stack.routed_experts else 0
        rows.append({"mode": mode, "ms_per_layer": ms[mode] / num_layers,
                     "collectives_per_step": (after - before[mode]) / opts.reps,
                     "layers": num_layers, "tokens_per_dp_rank": tokens, "hidden": opts.hidden})
        stack.close()
    return rows


def _bench_capture(rank, device, opts, sync) -> List[Dict[str, Any]]:
    rows = []
    for tokens in opts.capture_tokens:
        caps, steps = {}, {}
        for mode in ("early", "late"):
            args = resolve(env={}, **LAYOUT, enable_return_routed_experts=True,
                           routed_experts_gather=mode)
            ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, device)
            g = ctx.groups
            cap = RoutedExpertsCapturer(
                sizes=capture_sizes(args, num_token_slots=tokens * 4, max_step_tokens=tokens),
                layer_ids=range(DEEP_LAYERS), top_k=DEEP_TOP_K, num_experts=256,
                groups=g, gather=mode, device=device)
            span = RowSpan.slice_of(tokens, g.attn_tp_size, g.attn_tp_rank)
            ids = torch.randint(0, 256, (span.num_rows, DEEP_TOP_K), device=device)
            topk = LogicalTopK(ids=ids, weights=torch.ones(ids.shape, device=device))
            batch = BatchInfo(forward_mode=ForwardMode.DECODE, num_tokens=tokens,
                              dp_num_tokens=(tokens,) * g.dp_size,
                              dp_forward_modes=(ForwardMode.DECODE,) * g.dp_size)
            step = StepContext(index=0, batch=batch, groups=g,
                               token_slots=torch.arange(tokens, device=device))

            def one_step(cap=cap, topk=topk, span=span, step=step):
                cap.on_step_begin(step)
                for layer in range(DEEP_LAYERS):
                    cap.observe(layer, topk, span, step)
                cap.on_step_end(step)

            one_step()
            caps[mode], steps[mode] = cap, one_step
        before = {m: c.collectives for m, c in caps.items()}
        ms = _medians_ms(steps, opts.reps, sync)
        for mode, cap in caps.items():
            rows.append({"mode": mode, "tokens_per_dp_rank": tokens, "layers": DEEP_LAYERS,
                         "top_k": DEEP_TOP_K, "ms_per_step": ms[mode],
                         "collectives_per_step": (cap.collectives - before[mode]) / opts.reps})
            cap.close()
    return rows


def _spawn(opts: argparse.Namespace) -> Dict[str, Any]:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        mp.spawn(_worker, args=(opts, f"tcp://127.0.0.1:{free_port()}", out), nprocs=RANKS)
        with open(out) as f:
            return json.load(f)


# ---- single-process parts ----------------------------------------------------------------------

def bench_get_topk(reps: int) -> List[Dict[str, Any]]:
    seq, slots = 32_768, 40_960
    args = resolve(env={}, moe_a2a_backend="none", enable_return_routed_experts=True)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), 0, torch.device("cpu"))
    cap = RoutedExpertsCapturer(sizes=capture_sizes(args, num_token_slots=slots, max_step_tokens=1),
                                layer_ids=range(DEEP_LAYERS), top_k=DEEP_TOP_K, num_experts=256,
                                groups=ctx.groups, gather="none")
    cap.host_cache.copy_(torch.randint(0, 256, cap.host_cache.shape, dtype=torch.int32))
    table = torch.randperm(slots)[:seq + 1].unsqueeze(0)
    starts = (0, 8_192, 16_384, 24_576, 32_000, seq - 1)
    ms = _medians_ms({str(s): (lambda s=s: cap.get_topk(0, seq + 1, table, s)) for s in starts},
                     reps)
    return [{"seq_len": seq, "start_len": s, "rows": seq - s, "ms": ms[str(s)]} for s in starts]


def bench_wire(reps: int) -> List[Dict[str, Any]]:
    import numpy as np

    rows_n = 32_768
    out = []
    for experts in (128, 256, 384):
        ids = torch.randint(0, experts, (rows_n, DEEP_LAYERS, DEEP_TOP_K), dtype=torch.int32)
        blob = encode_routed_experts(ids, num_experts=experts)
        text = base64.b64encode(blob).decode("ascii")
        plain = base64.b64encode(ids.numpy().tobytes())
        ms = _medians_ms({
            # the wire format, as a JSON consumer gets it: base64 text, then an int32 tensor
            "wire_encode": lambda: base64.b64encode(encode_routed_experts(ids, num_experts=experts)),
            "wire_decode": lambda: decode_routed_experts(text),
            # SGLang's payload: base64 of the int32 array, decoded to a read-only numpy view
            "plain_encode": lambda: base64.b64encode(ids.numpy().tobytes()),
            "plain_decode": lambda: np.frombuffer(base64.b64decode(plain), dtype=np.int32),
        }, reps)
        assert torch.equal(decode_routed_experts(text).ids, ids)
        out.append({"num_experts": experts, "rows": rows_n, "layers": DEEP_LAYERS,
                    "top_k": DEEP_TOP_K, "wire_bytes": len(blob), "wire_base64_bytes": len(text),
                    "plain_int32_base64_bytes": len(plain),
                    **{f"{name}_ms": value for name, value in ms.items()}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="layers,capture,get_topk,wire")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--layers", type=int, default=8, help="layers of the stack in `layers`")
    p.add_argument("--tokens", type=int, default=256, help="tokens per DP rank in `layers`")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--capture-tokens", default="64,2048", help="tokens per DP rank in `capture`")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the single-process parts (1: no wake-up latency of "
                        "idle worker threads on a shared machine)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    opts = p.parse_args(argv)
    opts.parts = set(opts.parts.split(","))
    opts.capture_tokens = [int(t) for t in opts.capture_tokens.split(",")]
    results: Dict[str, Any] = {"torch": torch.__version__, "device": opts.device,
                               "cpu_count": os.cpu_count()}
    if opts.parts & {"layers", "capture"}:
        results.update(_spawn(opts))
    torch.set_num_threads(opts.threads)
    results["threads"] = opts.threads
    if "get_topk" in opts.parts:
        results["get_topk"] = bench_get_topk(opts.reps)
    if "wire" in opts.parts:
        results["wire"] = bench_wire(opts.reps)
    results["loadavg_1_5_15"] = os.getloadavg()  # other work on the machine skews the times
    text = json.dumps(results, indent=1)
    print(text)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
