"""Layouts of torch._grouped_mm for the experts at the DeepSeek-V3 shape on one GPU (raw torch).

    OUT=/tmp python benchmarks/grouped_mm_variants.py     # writes $OUT/variants.json

Per routing skew (0: random top-8; 0.6: a per-expert bias, a few hot experts) and token count:
gate+up with the weights column- or row-major, groups padded to multiples of 8 and of 128 rows,
the transposed (N-grouped) form with tokens as the second operand, the down projection, and
gate+up with perfectly uniform groups. Times in ms (CUDA events, median of 10 after warm-up).
"""
import torch, json, statistics, os, sys
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
for skew in (0.0, 0.6):
  for T in (512, 4096):
    M = T * K
    bias = torch.randn(E, device=dev, generator=g) * skew
    logits = torch.randn(T, E, device=dev, generator=g) + bias
    ids = logits.topk(K, dim=1).indices.reshape(-1)
    counts = torch.bincount(ids, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(M, H, device=dev, dtype=torch.bfloat16, generator=g)
    h = torch.randn(M, I, device=dev, dtype=torch.bfloat16, generator=g)
    r = {"max": int(counts.max()), "mean": M / E}
    r["m_gateup_colB"] = timeit(lambda: torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs))
    w13r = w13.transpose(-2, -1).contiguous()
    r["m_gateup_rowB"] = timeit(lambda: torch._grouped_mm(x, w13r, offs=offs))
    del w13r
    r["m_down_colB"] = timeit(lambda: torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs))
    # N-grouped: weights as mat_a [E, 2I, H], activations as mat_b [H, M]
    # N-grouped needs every group a multiple of 8 rows (16 bytes of bf16): pad the groups
    cp = (counts + 7) // 8 * 8
    offs8 = torch.cumsum(cp, 0).to(torch.int32)
    Mp = int(offs8[-1])
    r["pad_rows"] = Mp - M
    xp = torch.randn(Mp, H, device=dev, dtype=torch.bfloat16, generator=g)
    hp = torch.randn(Mp, I, device=dev, dtype=torch.bfloat16, generator=g)
    r["m_gateup_pad8"] = timeit(lambda: torch._grouped_mm(xp, w13.transpose(-2, -1), offs=offs8))
    out = torch._grouped_mm(w13, xp.t(), offs=offs8)
    ref = torch._grouped_mm(xp, w13.transpose(-2, -1), offs=offs8)
    r["n_gateup_err"] = float((out.t().float() - ref.float()).abs().max())
    r["n_gateup"] = timeit(lambda: torch._grouped_mm(w13, xp.t(), offs=offs8))
    r["n_down_colB"] = timeit(lambda: torch._grouped_mm(w2, hp.t(), offs=offs8))
    hTr = hp.t().contiguous()
    r["n_down_rowB"] = timeit(lambda: torch._grouped_mm(w2, hTr, offs=offs8))
    # pad each group to the 128-row tile: more rows, no partial tile
    c128 = (counts + 127) // 128 * 128
    offs128 = torch.cumsum(c128, 0).to(torch.int32)
    M128 = int(offs128[-1]); r["rows128"] = M128
    x128 = torch.randn(M128, H, device=dev, dtype=torch.bfloat16, generator=g)
    r["m_gateup_pad128"] = timeit(lambda: torch._grouped_mm(x128, w13.transpose(-2, -1), offs=offs128))
    del x128
    # uniform reference
    offs_u = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (M // E)
    r["m_gateup_uniform"] = timeit(lambda: torch._grouped_mm(x[: (M // E) * E], w13.transpose(-2, -1), offs=offs_u))
    res[f"skew{skew}_T{T}"] = r
    print(skew, T, json.dumps(r), flush=True)
json.dump(res, open(os.environ["OUT"] + "/variants.json", "w"), indent=1)
