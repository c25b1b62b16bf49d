"""Where the grouped-GEMM experts spend time on one GPU (raw torch ops at the DeepSeek-V3 shape).

    OUT=/tmp python benchmarks/grouped_mm_parts.py     # writes $OUT/prof.json

Times, per token count, the grouped GEMMs (gate+up fused and separate, down), the SwiGLU
elementwise, the row gather, a float32 weighted index_add_ (the old combine of the runner), the
pair sort, and gate+up with perfectly uniform groups (what a balanced router would give).
Routing is random top-8 over 256 experts.
"""
import torch, json, statistics, os
import torch.nn.functional as F
dev = torch.device("cuda", 0)
E, H, I, K = 256, 7168, 2048, 8
g = torch.Generator(device=dev).manual_seed(0)
w13 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16, generator=g) * H ** -0.5
w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16, generator=g) * I ** -0.5
def timeit(fn, n=10):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3): fn()
    ts = []
    for _ in range(n):
        s.record(); fn(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    return statistics.median(ts)
res = {}
for T in (128, 512, 4096):
    M = T * K
    # balanced-ish random routing like a router: multinomial over experts with a skew
    logits = torch.randn(T, E, device=dev, generator=g)
    ids = logits.topk(K, dim=1).indices.reshape(-1)
    counts = torch.bincount(ids, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(M, H, device=dev, dtype=torch.bfloat16, generator=g)
    r = {}
    r["gate_up_fused"] = timeit(lambda: torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs))
    wg, wu = w13[:, :I], w13[:, I:]
    r["gate_sep"] = timeit(lambda: torch._grouped_mm(x, wg.transpose(-2, -1), offs=offs))
    wgc = wg.contiguous(); 
    r["gate_sep_contig"] = timeit(lambda: torch._grouped_mm(x, wgc.transpose(-2, -1), offs=offs))
    h = torch.randn(M, I, device=dev, dtype=torch.bfloat16, generator=g)
    r["down"] = timeit(lambda: torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs))
    hh = torch.randn(M, 2 * I, device=dev, dtype=torch.bfloat16, generator=g)
    r["silu_mul"] = timeit(lambda: F.silu(hh[:, :I]) * hh[:, I:])
    rows = torch.randint(0, T, (M,), device=dev, generator=g)
    r["index_select"] = timeit(lambda: x.index_select(0, rows))
    y = torch.randn(M, H, device=dev, dtype=torch.bfloat16, generator=g)
    wts = torch.rand(M, device=dev, generator=g)
    acc = torch.zeros(T, H, device=dev)
    r["weighted_index_add_fp32"] = timeit(lambda: acc.index_add_(0, rows, y.float() * wts[:, None]))
    r["sort"] = timeit(lambda: torch.argsort(ids, stable=True))
    # padded uniform groups (what a balanced router would give)
    offs_u = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (M // E)
    r["gate_up_fused_uniform"] = timeit(lambda: torch._grouped_mm(x[: (M // E) * E], w13.transpose(-2, -1), offs=offs_u))
    r["max_count"] = int(counts.max()); r["touched"] = int((counts > 0).sum())
    res[T] = r
    print(T, json.dumps(r), flush=True)
json.dump(res, open(os.environ["OUT"] + "/prof.json", "w"), indent=1)
