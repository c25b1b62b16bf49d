"""The grouped-GEMM experts of one EP rank at the DeepSeek-V3 shape, for several EP sizes, on
one GPU: what rank 0 computes when ``ep`` ranks each route ``T`` tokens.

    python benchmarks/gpu_experts_ep.py --out experts_ep.json          # needs: a GPU
    python benchmarks/gpu_experts_ep.py --device cpu --small --out x.json

At ep 1 every expert sees ``T * 8 / 256`` (row, k) pairs on average (128 at 4096 tokens), which
is about the GEMM's ridge point on an H200: the experts are bound by reading their weights. At ep
8 rank 0 holds 32 experts and receives the pairs of 8 ranks' tokens, 8 times as many per
expert: compute-bound, as on a real EP deployment. The rows are those an all-to-all delivers
(tokens with at least one pair on rank 0) with the real router's choices; the runner is the
library's ``GroupedMMExperts`` on a ``StandardDispatchOutput`` built as ``alltoall`` builds it.
Card peak and bandwidth are measured first, in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_layer import _timer, card_figures, dsv3_setup  # noqa: E402

from moe_a2a.dispatchers import ExpertPlacement, StandardDispatchOutput  # noqa: E402
from moe_a2a.routing import route  # noqa: E402
from moe_a2a.runners import GroupedMMExperts  # noqa: E402


def rank0_output(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 placement: ExpertPlacement) -> StandardDispatchOutput:
    local = placement.to_local(ids)
    keep = (local >= 0).any(dim=1)  # an all-to-all sends only these rows to rank 0
    local, w, rows = local[keep], weights[keep], x[keep]
    w = torch.where(local >= 0, w, torch.zeros_like(w))
    e_local = placement.num_local_experts
    flat = local.reshape(-1)
    order = torch.argsort(torch.where(flat >= 0, flat, torch.full_like(flat, e_local)), stable=True)
    counts = torch.bincount(flat[flat >= 0], minlength=e_local)
    return StandardDispatchOutput(hidden_states=rows, topk_ids=local, topk_weights=w,
                                  tokens_per_expert=counts, pair_order=order)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--ep", default="1,8")
    p.add_argument("--tokens", default="128,512,4096", help="tokens per rank")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", required=True)
    opts = p.parse_args()
    device = torch.device(opts.device)
    measure = _timer(device)
    card = card_figures(device, measure, opts.small)
    (e, h, i, k), weights, router = dsv3_setup(device, opts.small)
    runner = GroupedMMExperts()
    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for ep in (int(v) for v in opts.ep.split(",")):
        placement = ExpertPlacement(num_experts=e, ep_size=ep, ep_rank=0)
        local_w = weights.shard(placement)
        for t in (int(v) for v in opts.tokens.split(",")):
            x = torch.randn(ep * t, h, generator=gen, device=device).to(torch.bfloat16)
            topk = route(x.float() @ weights.gate.t(), router, weights.correction_bias)
            out = rank0_output(x, topk.ids, topk.weights, placement)
            runner(out, local_w)
            ms = measure(lambda: runner(out, local_w), opts.repeats)
            counts = out.tokens_per_expert
            pairs = int(counts.sum())
            touched = int((counts > 0).sum())
            flops = 2 * pairs * h * i * 3
            weight_bytes = touched * 3 * h * i * 2
            row = {"ep": ep, "tokens_per_rank": t, "rows": int(out.hidden_states.shape[0]),
                   "pairs": pairs, "experts_touched": touched,
                   "pairs_per_expert_mean": pairs / max(touched, 1),
                   "pairs_per_expert_max": int(counts.max()), "experts_ms": ms,
                   "tflops": flops / (ms * 1e-3) / 1e12,
                   "fraction_of_peak": flops / (ms * 1e-3) / 1e12 / card["bf16_gemm_tflops"],
                   "weight_read_floor_ms": weight_bytes / (card["copy_gb_per_s"] * 1e9) * 1e3}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del x, out
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "card": card, "rows": rows}
    with open(opts.out, "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
