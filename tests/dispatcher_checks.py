"""Checks the rank pool runs for tests/test_dispatchers*.py (module-level, importable by name).

Every rank regenerates every batch from the case's seed, so each rank can compute the
single-process reference for its own rows without any extra communication.

Expert function (deterministic, easy to get wrong in every way that matters): global
expert ``e`` maps ``x -> x * (e + 1) + e``; a token's output is the weighted sum over its
``(id, weight)`` columns with ``id >= 0``. With ``moe_tp_size > 1`` moe-TP rank ``m`` computes
the share ``(m + 1) / (1 + 2 + ... + moe_tp)`` of it, so the shares sum to the full result and
a double count or a missing reduction shows.
"""

from __future__ import annotations

import zlib
from typing import Any, Dict, List, Tuple
from unittest import mock

import torch
import torch.distributed as dist

from moe_a2a.dispatchers.alltoall import AllToAllDispatcher
from moe_a2a.dispatchers import BatchInfo, CombineInput, DispatcherSetup, ForwardMode, StandardDispatchOutput, TopK
from moe_a2a.dispatchers.collectives import (
    all_gather_known_sizes,
    all_gather_v,
    all_reduce,
    all_to_all_v,
    exchange_sizes,
    reduce_scatter_known_sizes,
)
from moe_a2a.dispatchers.standard import StandardDispatcher
from moe_a2a.parallel import ParallelSizes, build_comm_groups

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_GROUPS: Dict[Tuple[int, int, int], Any] = {}


def _device(rank: int, case: Dict[str, Any]) -> torch.device:
    """``cpu``, or this rank's GPU for ``case["device"] == "cuda"`` (nccl pools)."""
    if case.get("device", "cpu") != "cuda":
        return torch.device("cpu")
    index = rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _groups(rank: int, tp: int, dp: int, ep: int):
    """Groups per layout, created once per worker process (same order on every rank)."""
    key = (tp, dp, ep)
    if key not in _GROUPS:
        _GROUPS[key] = build_comm_groups(ParallelSizes(tp, dp, ep), rank)
    return _GROUPS[key]


# --------------------------------------------------------------------------- inputs

def make_batch(case: Dict[str, Any], index: int):
    """Batch ``index`` of a case, the same on every rank.

    Returns ``(hidden [T, H] case dtype, ids [T, K] int64 with -1, weights [T, K] float32)``.
    """
    T, H, E, K = case["sizes"][index], case["hidden"], case["experts"], case["top_k"]
    gen = torch.Generator().manual_seed(case["seed"] * 1009 + index)
    x = torch.randn(T, H, generator=gen).to(_DTYPES[case.get("dtype", "fp32")])
    mode = case.get("mode", "random")
    if mode == "one_expert":
        ids = torch.full((T, K), -1, dtype=torch.int64)
        ids[:, 0] = case["expert"]
    elif mode == "nowhere":
        ids = torch.full((T, K), -1, dtype=torch.int64)
    else:
        ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].to(torch.int64)
        neg = case.get("neg", 0.0)
        if neg:
            ids[torch.rand(T, K, generator=gen) < neg] = -1
    w = torch.rand(T, K, generator=gen)
    return x, ids, w


def reference(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[T, H]`` float32 single-process result."""
    xf = x.float()
    out = torch.zeros_like(xf)
    for k in range(ids.shape[1]):
        e = ids[:, k]
        ok = (e >= 0).float().unsqueeze(1)
        ef = e.clamp(min=0).float().unsqueeze(1)
        out += ok * w[:, k:k + 1] * (xf * (ef + 1) + ef)
    return out


def apply_experts(d: StandardDispatchOutput, first_local_expert: int, share: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The test experts through ``pair_order`` / ``tokens_per_expert``; also checks the layout."""
    R, K = d.topk_ids.shape
    x = d.hidden_states.float()
    flat_ids = d.topk_ids.reshape(-1)
    flat_w = d.topk_weights.reshape(-1)
    if not torch.all(flat_w[flat_ids < 0] == 0):
        raise AssertionError("weights must be 0 where topk_ids == -1")
    if int(d.tokens_per_expert.sum()) != int((flat_ids >= 0).sum()) or \
            d.pair_order.numel() != R * K or \
            sorted(d.pair_order.tolist()) != list(range(R * K)):
        raise AssertionError("pair_order / tokens_per_expert do not cover the routed pairs")
    y = torch.zeros(R, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for local, n in enumerate(d.tokens_per_expert.tolist()):
        pairs = d.pair_order[start:start + n]
        start += n
        if not torch.all(flat_ids[pairs] == local):
            raise AssertionError(f"pair_order group {local} holds other experts")
        rows = pairs // K
        e = first_local_expert + local
        y.index_add_(0, rows, (x[rows] * (e + 1) + e) * flat_w[pairs].unsqueeze(1) * share)
    return y.to(dtype)


def _tolerance(case: Dict[str, Any], ref: torch.Tensor) -> float:
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    return (3e-2 if case.get("dtype") == "bf16" else 1e-5) * max(scale, 1.0)


def _setup(case: Dict[str, Any], groups) -> DispatcherSetup:
    return DispatcherSetup(groups=groups, num_experts=case["experts"], top_k=case["top_k"],
                           hidden_size=case["hidden"], dtype=_DTYPES[case.get("dtype", "fp32")])


# --------------------------------------------------------------------------- cases

def case(kind: str, name: str, tp: int, **kw) -> Dict[str, Any]:
    """A check case: ``kind`` (standard, alltoall, collectives), layout ``tp/dp/ep``, shapes,
    ``sizes`` (tokens per DP rank for standard, per rank for alltoall and collectives),
    ``mode`` (random, one_expert, nowhere), ``neg`` (fraction of ``-1`` columns), dtype."""
    base = {"kind": kind, "name": name, "tp": tp, "dp": 1, "ep": tp, "hidden": 8,
            "experts": 2 * tp, "top_k": 2, "neg": 0.25,
            "seed": zlib.crc32(f"{name}/{tp}".encode()) % 100_000,
            "dtype": "fp32", "sizes": [5]}
    base.update(kw)
    return base


def collective_cases(tp):
    sizes = [2, 0] if tp == 2 else [2, 0, 3, 1]
    return [
        case("collectives", "coll-uneven", tp, sizes=sizes),
        case("collectives", "coll-bf16", tp, sizes=sizes, dtype="bf16"),
        case("collectives", "coll-equal", tp, sizes=[3] * tp),
        case("collectives", "coll-zero", tp, sizes=[0] * tp),
        case("collectives", "coll-dp", tp, dp=2, sizes=sizes),
    ]


def standard_cases(tp):
    c = lambda name, **kw: case("standard", name, tp, **kw)  # noqa: E731
    cases = [
        c("ep=tp", sizes=[6]),
        c("ep<tp", ep=tp // 2, sizes=[6]),                       # moe_tp 2
        c("ep=1", ep=1, sizes=[5], dtype="bf16"),                # moe_tp = tp
        c("no-tokens", sizes=[0]),
        c("dp=tp", dp=tp, sizes=[3] + [0] * (tp - 2) + [4]),
        c("dp=tp-unagreed", dp=tp, sizes=[2] + [0] * (tp - 2) + [5], agreed=False),
        c("dp=tp-zero", dp=tp, sizes=[0] * tp),
        c("one-expert", dp=tp, sizes=[4] * tp, mode="one_expert", expert=tp),
        c("topk=E", sizes=[5], top_k=2 * tp, neg=0.0),
        c("bf16-dp", dp=tp, ep=tp // 2, sizes=[2] * (tp - 1) + [5], dtype="bf16"),
    ]
    if tp == 4:
        cases += [
            c("1<dp<tp", dp=2, ep=2, sizes=[3, 0]),               # attn_tp 2, moe_tp 2
            c("1<dp<tp-ep4", dp=2, sizes=[2, 6], neg=0.5),
            c("1<dp<tp-bf16", dp=2, ep=1, sizes=[4, 1], dtype="bf16"),
            c("1<dp<tp-zero", dp=2, sizes=[0, 0]),
        ]
    return cases


def alltoall_cases(tp):
    c = lambda name, **kw: case("alltoall", name, tp, **kw)  # noqa: E731
    uneven = [5, 0] if tp == 2 else [3, 0, 6, 2]
    return [
        c("a2a", sizes=uneven),
        c("a2a-equal", sizes=[4] * tp, neg=0.0),
        c("a2a-zero", sizes=[0] * tp),
        c("a2a-one-expert", sizes=[3] * tp, mode="one_expert", expert=2 * tp - 1),
        c("a2a-topk=E", sizes=uneven, top_k=2 * tp, neg=0.0),
        c("a2a-nowhere", sizes=[2] * tp, mode="nowhere"),
        c("a2a-bf16", sizes=uneven, dtype="bf16", neg=0.4),
        c("a2a-dp", dp=tp, sizes=uneven[::-1], experts=4 * tp, top_k=3),
    ]


def large_cases(tp):
    """A DeepSeek-like shape (hidden 7168, 256 experts, top-8, bf16) for GPU runs."""
    sizes = [256, 0, 512, 128][:tp] if tp <= 4 else [256] * tp
    shape = dict(hidden=7168, experts=256, top_k=8, dtype="bf16", neg=0.0)
    return [
        case("alltoall", "large-a2a", tp, sizes=sizes, **shape),
        case("standard", "large-standard", tp, sizes=[384], **shape),
        case("standard", "large-standard-dp", tp, dp=tp, sizes=sizes, **shape),
    ]


def all_cases(tp: int, device: str = "cpu", large: bool = False) -> List[Dict[str, Any]]:
    """Every case for a ``tp``-rank pool, in the order all ranks run them."""
    cases = collective_cases(tp) + standard_cases(tp) + alltoall_cases(tp)
    if large:
        cases += large_cases(tp)
    for c in cases:
        c["device"] = device
    return cases


# --------------------------------------------------------------------------- dispatchers

def check_standard(rank: int, case: Dict[str, Any]) -> Dict[str, Any]:
    tp, dp, ep = case["tp"], case["dp"], case["ep"]
    if len(case["sizes"]) != dp:
        raise AssertionError(f"{case['name']}: standard cases give one size per DP rank")
    g = _groups(rank, tp, dp, ep)
    disp = StandardDispatcher(_setup(case, g))
    batches = [make_batch(case, d) for d in range(dp)]
    x, ids, w = batches[g.dp_rank]
    dev = _device(rank, case)
    if case.get("agreed", True):  # the step's DP sizes are known: no exchange in dispatch
        batch = BatchInfo(forward_mode=ForwardMode.PREFILL, num_tokens=x.shape[0],
                          dp_num_tokens=tuple(case["sizes"]),
                          dp_forward_modes=(ForwardMode.PREFILL,) * dp)
    else:
        batch = BatchInfo(forward_mode=ForwardMode.PREFILL, num_tokens=x.shape[0])
    d = disp.dispatch(x.to(dev), TopK(ids.to(dev), w.to(dev)), batch=batch)
    if d.num_rows != (sum(case["sizes"]) if dp > 1 else case["sizes"][0]):
        raise AssertionError(f"{case['name']}: {d.num_rows} rows dispatched")
    if dp > 1:  # every rank holds the DP-global batch, in DP-rank order
        if not torch.equal(d.hidden_states.cpu(), torch.cat([b[0] for b in batches])):
            raise AssertionError(f"{case['name']}: gathered hidden states differ")
    mtp = g.moe_tp_size
    share = (g.moe_tp_rank + 1) / (mtp * (mtp + 1) / 2)
    y = apply_experts(d, disp.placement.first_local_expert, share, x.dtype)
    out = disp.combine(CombineInput(expert_output=y, dispatch_output=d), batch=batch)
    ref = reference(x, ids, w)
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype or out.device != dev:
        raise AssertionError(f"{case['name']}: output {tuple(out.shape)} {out.dtype} {out.device}")
    err = float((out.float().cpu() - ref).abs().max()) if ref.numel() else 0.0
    if err > _tolerance(case, ref):
        raise AssertionError(f"{case['name']} rank {rank}: max abs err {err}")
    if g.world_size > 1 and y.numel() and y.data_ptr() == out.data_ptr():
        raise AssertionError(f"{case['name']}: combine returned its input buffer")
    return {"name": case["name"], "err": err, "rows": d.num_rows}


def check_alltoall(rank: int, case: Dict[str, Any]) -> Dict[str, Any]:
    tp = case["tp"]
    g = _groups(rank, tp, case.get("dp", 1), tp)
    disp = AllToAllDispatcher(_setup(case, g))
    E_local = case["experts"] // tp
    batches = [make_batch(case, r) for r in range(tp)]
    x, ids, w = batches[rank]
    dev = _device(rank, case)
    calls = {"a2a": 0}
    real = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls["a2a"] += 1
        return real(*args, **kwargs)

    batch = BatchInfo(forward_mode=ForwardMode.PREFILL, num_tokens=x.shape[0])
    with mock.patch.object(dist, "all_to_all_single", counting):
        d = disp.dispatch(x.to(dev), TopK(ids.to(dev), w.to(dev)), batch=batch)
        dispatch_calls = calls["a2a"]
        y = apply_experts(d, disp.placement.first_local_expert, 1.0, x.dtype)
        out = disp.combine(CombineInput(expert_output=y, dispatch_output=d), batch=batch)
    combine_calls = calls["a2a"] - dispatch_calls
    if (dispatch_calls, combine_calls) != (3, 1):
        raise AssertionError(f"{case['name']}: {dispatch_calls} all_to_all_single calls in "
                             f"dispatch (want 3), {combine_calls} in combine (want 1)")

    # each token is sent exactly once per destination owning one of its experts
    owner = torch.where(ids >= 0, ids // E_local, torch.full_like(ids, -1))
    want_send = [int((owner == r).any(dim=1).sum()) for r in range(tp)]
    h = d.handle
    if list(h.send_splits) != want_send:
        raise AssertionError(f"{case['name']}: send splits {h.send_splits}, want {want_send}")
    # the received rows are exactly the source tokens, by source rank then token order,
    # with ids already local to this rank
    exp_x, exp_ids, recv = [], [], []
    for src, (bx, bids, _) in enumerate(batches):
        sel = ((bids >= 0) & (bids // E_local == rank)).any(dim=1)
        exp_x.append(bx[sel])
        loc = bids[sel] - rank * E_local
        exp_ids.append(torch.where((bids[sel] >= 0) & (loc >= 0) & (loc < E_local), loc,
                                   torch.full_like(loc, -1)))
        recv.append(int(sel.sum()))
    if list(h.recv_splits) != recv:
        raise AssertionError(f"{case['name']}: recv splits {h.recv_splits}, want {recv}")
    if not torch.equal(d.hidden_states.cpu(), torch.cat(exp_x)) or \
            not torch.equal(d.topk_ids.cpu(), torch.cat(exp_ids)):
        raise AssertionError(f"{case['name']}: received rows differ from the sources' tokens")
    ref = reference(x, ids, w)
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype or out.device != dev:
        raise AssertionError(f"{case['name']}: output {tuple(out.shape)} {out.dtype} {out.device}")
    out = out.cpu()
    err = float((out.float() - ref).abs().max()) if ref.numel() else 0.0
    if err > _tolerance(case, ref):
        raise AssertionError(f"{case['name']} rank {rank}: max abs err {err}")
    nowhere = (ids < 0).all(dim=1)
    if nowhere.any() and not torch.all(out[nowhere] == 0):
        raise AssertionError(f"{case['name']}: tokens routed nowhere must return zeros")
    return {"name": case["name"], "err": err, "send": list(h.send_splits),
            "recv": list(h.recv_splits)}


# --------------------------------------------------------------------------- collectives

def check_collectives(rank: int, case: Dict[str, Any]) -> Dict[str, Any]:
    tp = case["tp"]
    g = _groups(rank, tp, case.get("dp", 1), tp)
    dtype = _DTYPES[case.get("dtype", "fp32")]
    dev = _device(rank, case)
    world_sizes = case["sizes"]  # one per world rank
    results = {}
    for label, group, members in (("world", g.world_group, list(range(tp))),
                                  ("attn_tp", g.attn_tp_group,
                                   [r for r in range(tp) if r // g.attn_tp_size == g.dp_rank])):
        sizes = [world_sizes[m] for m in members]

        def rows(r: int, n: int) -> torch.Tensor:
            return (torch.arange(n * 3, dtype=torch.float32, device=dev).reshape(n, 3)
                    + 100 * r).to(dtype)

        mine = rows(rank, world_sizes[rank])
        got_sizes = exchange_sizes(mine.shape[0], group, dev)
        if got_sizes != sizes:
            raise AssertionError(f"{label}: exchange_sizes {got_sizes}, want {sizes}")
        want = torch.cat([rows(m, world_sizes[m]) for m in members])
        if not torch.equal(all_gather_v(mine, group), want) or \
                not torch.equal(all_gather_known_sizes(mine, sizes, group), want):
            raise AssertionError(f"{label}: all_gather_v wrong")
        # reduce-scatter: every rank contributes (rank + 1) * ones over the gathered layout
        full = torch.ones(sum(sizes), 3, dtype=dtype, device=dev) * (rank + 1)
        before = full.clone()
        part = reduce_scatter_known_sizes(full, sizes, group)
        total = sum(m + 1 for m in members)
        idx = members.index(rank)
        if not torch.equal(full, before):
            raise AssertionError(f"{label}: reduce_scatter modified its input")
        if tuple(part.shape) != (sizes[idx], 3) or part.dtype != dtype or \
                not torch.all(part == total):
            raise AssertionError(f"{label}: reduce_scatter_v gave {part}")
        summed = all_reduce(torch.full((2, 2), float(rank + 1), dtype=dtype, device=dev), group)
        if not torch.all(summed == total):
            raise AssertionError(f"{label}: all_reduce gave {summed}")
        # all-to-all: rank i sends (i + j) % 3 rows to rank j
        n = len(members)
        send = [(idx + j) % 3 for j in range(n)]
        recv_sz = [(j + idx) % 3 for j in range(n)]
        data = torch.cat([torch.full((send[j], 2), float(10 * idx + j), device=dev)
                          for j in range(n)]).to(dtype)
        got = all_to_all_v(data, recv_sz, send, group)
        want_a2a = torch.cat([torch.full((recv_sz[j], 2), float(10 * j + idx), device=dev)
                              for j in range(n)]).to(dtype)
        if not torch.equal(got, want_a2a):
            raise AssertionError(f"{label}: all_to_all_v gave {got}")
        results[label] = sizes
    if dtype == torch.bfloat16:  # every bf16 bit pattern (NaN payloads too) moves bit-exactly
        bits = torch.arange(-32768, 32768, dtype=torch.int32, device=dev).to(torch.int16)
        pattern = bits.view(torch.bfloat16).reshape(-1, 64)
        gathered = all_gather_v(pattern, g.world_group)
        if not torch.equal(gathered.view(torch.int16), bits.reshape(-1, 64).repeat(tp, 1)):
            raise AssertionError("bf16 all_gather_v is not bit-exact")
        split = [pattern.shape[0] // tp] * tp
        moved = all_to_all_v(pattern, split, split, g.world_group)
        mine = bits.reshape(-1, 64).chunk(tp)[rank].repeat(tp, 1)
        if not torch.equal(moved.view(torch.int16), mine):
            raise AssertionError("bf16 all_to_all_v is not bit-exact")
    return results


_CHECKS = {"standard": check_standard, "alltoall": check_alltoall,
           "collectives": check_collectives}


def run_cases(rank: int, world_size: int, cases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Run every case in order on this rank (all ranks run the same list)."""
    out = []
    for case in cases:
        if case["tp"] != world_size:
            raise AssertionError(f"{case['name']}: tp={case['tp']} on a {world_size}-rank pool")
        try:
            out.append(_CHECKS[case["kind"]](rank, case))
        except AssertionError as exc:
            raise AssertionError(f"case {case['name']!r}: {exc}") from exc
    return out


# --------------------------------------------------------------------------- nccl runner

def run_nccl(world: int) -> List[List[Dict[str, Any]]]:
    """Every case (plus the large ones) over nccl, one process per GPU."""
    from moe_a2a.testing import RankPool

    import dispatcher_checks as module  # functions pickled by module name, also from __main__

    with RankPool(world, backend="nccl") as pool:
        return pool.run(module.run_cases, module.all_cases(world, device="cuda", large=True))


if __name__ == "__main__":  # on a GPU machine: python tests/dispatcher_checks.py 2 4
    import os
    import sys
    import time

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    for arg in sys.argv[1:] or ["2"]:
        began = time.perf_counter()
        per_rank = run_nccl(int(arg))
        errors = {c["name"]: max(r[i].get("err", 0.0) for r in per_rank)
                  for i, c in enumerate(per_rank[0]) if "name" in c}
        print(f"nccl world={arg}: {len(per_rank[0])} cases passed on every rank in "
              f"{time.perf_counter() - began:.1f}s; max abs errors {errors}", flush=True)
