"""The timing core of ``moe-a2a bench`` (also used by ``benchmarks/``).

For each selected backend and tokens-per-rank size, on real ranks, time a MoE layer's
``dispatch``, experts and ``combine`` separately and together, beside two plain-torch floors
(``moe_a2a.bench_floors``) measured in the same run on the same routing and payload.

Method (every choice here is what the numbers mean):

* **Tokens per rank** ``T``: every rank owns ``T`` distinct tokens. A DP rank's batch is
  ``T * attn_tp_size`` tokens; a scattered backend dispatches this rank's ``T``-row slice, a
  replicated one the DP rank's batch (as the layer would hand them over).
* **Routing**: the real router (DeepSeek-style grouped sigmoid top-k with correction bias, as in
  ``moe-a2a run``) on seeded inputs, computed once per size; every backend and both floors get
  the same ids, weights and hidden states.
* **Timed parts**, per backend: ``dispatch``, ``experts`` and ``combine`` each timed alone (a
  barrier before each, so a part does not absorb a peer's lag from the part before);
  ``total``: dispatch → experts → combine as one region; ``comm``: dispatch → combine with the
  experts replaced by handing the dispatched rows straight back (the communication path alone,
  what the floors measure). Fused backends have ``total`` only.
* **Clock**: a barrier, then ``time.perf_counter`` around the region on CPU; on CUDA, CUDA
  events around it (the host work inside the region counts: the start event fires as soon as
  the idle stream reaches it). Each sample is the slowest rank's time (max over ranks), and
  each figure the median over ``repeats`` samples after ``warmup`` unrecorded rounds.
* **Interleaving**: one round times every subject (floors, then each backend) once, and the
  rounds repeat, so a change of machine load (shared CI cores) hits every subject alike.
* **Ratios** come from the same run and the same rounds: ``ratio_floor_a`` is the median over
  rounds of ``comm / floor_a`` measured in that round (likewise ``ratio_floor_b``), so that a
  change of load between rounds cancels; every round's samples are in the report
  (``samples_ms``). On a shared machine other processes only ever add time, so the
  ``best_ratio_floor_*`` fields (fastest round over fastest round) are reported as well.
  ``tokens_per_s = W * T / total`` (every rank's tokens through dispatch,
  experts and combine).
* **Check** (unless disabled): before timing, each backend's output is compared with the
  single-process reference on the same tokens (``moe_a2a.reference``), and each floor's with
  what it must return; a wrong result stops the run (``passed`` false, the failing checks
  listed, exit 1 on the command line), never a figure.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from moe_a2a.bench_report import cost_growth, paired_ratio
from moe_a2a.errors import MoeA2AError
from moe_a2a.run_plan import ModelShape

#: Parts timed per backend (``comm`` = dispatch → combine without experts).
PARTS = ("dispatch", "experts", "combine", "total", "comm")


@dataclass(frozen=True, kw_only=True)
class BenchPlan:
    """Everything a rank needs (picklable; sent to spawned ranks).

    Attributes:
        backends: backend names, in report order.
        args_json: the resolved ``ServerArgs`` of each backend, as JSON (same order).
        shape: the layer's shape (``num_layers`` and the shared expert are not used).
        num_tokens: tokens per rank, one measurement per entry (``>= 1``).
        warmup: unrecorded rounds per size. repeats: recorded rounds per size.
        seed: weights and inputs. dtype: activation and expert dtype name. device: cpu / cuda.
        check: compare outputs with the reference before timing.
        progress: rank 0 reports progress on stderr.
        plugins: ``--plugin`` modules every rank imports first (they register backends).
    """

    backends: Tuple[str, ...]
    args_json: Tuple[str, ...]
    shape: ModelShape
    num_tokens: Tuple[int, ...]
    warmup: int = 3
    repeats: int = 10
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    check: bool = True
    progress: bool = True
    plugins: Tuple[str, ...] = ()  # --plugin modules, imported on every rank


# ------------------------------------------------------------------------------ machine


def machine_description(device: torch.device) -> Dict[str, Any]:
    """What the figures were measured on (no host names)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: Dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_per_rank": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):  # other work on the host makes CPU timings noisy
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, card_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, card_count=torch.cuda.device_count())
    return info


# ------------------------------------------------------------------------------ clock


class Clock:
    """Times one region on every rank: barrier, then perf_counter (CPU) or CUDA events."""

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.device = device
        self.world_size = world_size

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, region: Callable[[], Any]) -> Tuple[float, Any]:
        """``(seconds on this rank, the region's result)``."""
        self._barrier()
        if self.device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            result = region()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, result
        begin = time.perf_counter()
        result = region()
        return time.perf_counter() - begin, result


# ------------------------------------------------------------------------------ subjects


def _router_and_weights(plan: BenchPlan, dtype: torch.dtype):
    from moe_a2a.routing import RouterConfig
    from moe_a2a.weights import MoEWeights

    s = plan.shape
    router = RouterConfig(num_experts=s.num_experts, top_k=s.top_k, scoring="sigmoid",
                          n_group=s.n_group or 1, topk_group=s.topk_group or 1, renormalize=True,
                          routed_scaling_factor=s.routed_scaling_factor, has_correction_bias=True)
    weights = MoEWeights.random(s.num_experts, s.hidden_size, s.intermediate_size, 0,
                                seed=plan.seed, dtype=dtype, with_correction_bias=True)
    return router, weights


class BackendSubject:
    """One backend's layer on this rank, and how to time its parts on one size."""

    def __init__(self, name: str, args_json: str, rank: int, device: torch.device,
                 router, weights, dtype: torch.dtype) -> None:
        from moe_a2a.layer import EPMoE
        from moe_a2a.parallel import ParallelSizes, make_parallel_context
        from moe_a2a.server_args import ServerArgs

        self.name = name
        self.args = ServerArgs.from_json(args_json)
        self.ctx = make_parallel_context(ParallelSizes.from_server_args(self.args), rank, device)
        self.layer = EPMoE.build(weights, router, self.args, self.ctx, dtype=dtype)
        self.groups = self.ctx.groups

    @property
    def attn_tp_size(self) -> int:
        return self.groups.attn_tp_size

    def describe(self) -> Dict[str, Any]:
        a, layer = self.args, self.layer
        impl = layer.fused if layer.fused is not None else layer.dispatcher
        return {"ep_size": a.ep_size, "moe_tp_size": a.moe_tp_size,
                "attn_tp_size": a.attn_tp_size, "dp_size": a.dp_size,
                "enable_dp_attention": a.enable_dp_attention,
                "token_layout": a.backend_spec.token_layout,
                "class": type(impl).__name__,
                "experts_runner": getattr(layer.experts.runner, "name", type(layer.experts.runner).__name__)}

    def prepare(self, batch_hidden: torch.Tensor, batch_topk, rows_per_rank: int) -> None:
        """Take this size's DP batch (and its routing); agree the batch once (untimed)."""
        from moe_a2a.dispatchers import ForwardMode, agree_batch

        layer = self.layer
        self.batch = agree_batch(self.groups, num_tokens=int(batch_hidden.shape[0]),
                                 forward_mode=ForwardMode.PREFILL, device=self.ctx.device)
        self.fused_path = layer.uses_fused_path(self.batch)
        if self.fused_path and layer.fused is not None:
            layout = layer.fused.token_layout
        elif layer.dispatcher is not None:
            layout = layer.dispatcher.token_layout or layer.spec.token_layout
        else:
            raise MoeA2AError(f"backend {layer.spec.name} has no fallback for a step above its "
                              f"capacity {layer.fused_capacity}")
        if layout == "scattered" and self.attn_tp_size > 1:
            start = self.groups.attn_tp_rank * rows_per_rank
            rows = slice(start, start + rows_per_rank)
        else:
            rows = slice(0, int(batch_hidden.shape[0]))
        self.rows = rows
        self.x = batch_hidden[rows]
        physical = layer.remap.to_physical(batch_topk, layer.layer_id)
        self.topk = type(physical)(ids=physical.ids[rows], weights=physical.weights[rows])

    # the regions --------------------------------------------------------------------------

    def dispatch(self):
        return self.layer.dispatcher.dispatch(self.x, self.topk, batch=self.batch)

    def experts(self, dispatched):
        return self.layer.experts(dispatched)

    def combine(self, dispatched, expert_output):
        from moe_a2a.dispatchers import CombineInput

        return self.layer.dispatcher.combine(
            CombineInput(expert_output=expert_output, dispatch_output=dispatched), batch=self.batch)

    def total(self):
        if self.fused_path:
            return self.layer.fused.forward(self.x, self.topk, batch=self.batch)
        dispatched = self.dispatch()
        return self.combine(dispatched, self.experts(dispatched))

    def comm(self):
        dispatched = self.dispatch()
        return self.combine(dispatched, dispatched.hidden_states)

    def close(self) -> None:
        self.layer.close()


# ------------------------------------------------------------------------------ per rank


def _inputs(plan: BenchPlan, size: int, dp_rank: int, dp_batch: int, hidden: int,
            device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(plan.seed * 1_000_003 + size * 101 + dp_rank)
    return torch.randn(dp_batch, hidden, generator=gen).to(device, dtype)


def _route(x: torch.Tensor, weights, router):
    from moe_a2a.routing import route

    bias = weights.correction_bias.to(x.device, torch.float32)
    return route(x.float() @ weights.gate.to(x.device, torch.float32).t(), router, bias)


def _max_over_ranks(values: List[float], device: torch.device, world_size: int) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else None)
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
           device: torch.device, world_size: int) -> Dict[str, Any]:
    from moe_a2a.run import tolerance

    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    scale = want.float().abs().max().item() if want.numel() else 0.0
    ratio = err / tolerance(dtype, scale)
    err, scale, ratio = _max_over_ranks([err, scale, ratio], device, world_size)
    return {"max_abs_err": err, "tolerance": tolerance(dtype, scale), "passed": ratio <= 1.0,
            "what": name}


def bench_rank(rank: int, plan: BenchPlan, init_method: str, world_size: int,
               local_rank: Optional[int] = None) -> Dict[str, Any]:
    """One spawned (or torchrun) rank of ``moe-a2a bench``: join the process group, measure
    (``bench_on_group``), leave. Returns the report (identical on every rank)."""
    from moe_a2a.parallel import default_backend, destroy_distributed, init_distributed
    from moe_a2a.plugins import load_plugins

    load_plugins(plan.plugins)  # backends registered by --plugin modules
    device = torch.device(plan.device)
    if device.type == "cuda":
        local = rank if local_rank is None else local_rank
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    # ranks share the host's cores (see moe_a2a.run.run_rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world_size)))
    if world_size == 1 and not dist.is_initialized():
        # the floors are plain torch.distributed calls: on one rank they still need a (1-rank)
        # process group, where they degenerate to local copies
        dist.init_process_group(backend=default_backend(device), init_method=init_method,
                                rank=0, world_size=1)
    else:
        init_distributed(rank, world_size, backend=default_backend(device),
                         init_method=init_method, device=device)
    try:
        return bench_on_group(plan, rank, world_size, device)
    finally:
        destroy_distributed()


def bench_on_group(plan: BenchPlan, rank: int, world_size: int,
                   device: torch.device) -> Dict[str, Any]:
    """Measure ``plan`` on the already initialised default process group (``world_size``
    ranks, this one ``rank``). Returns the report (identical on every rank): ``machine``,
    ``job``, ``backends`` (each one's resolved layout), ``results`` (one entry per size),
    ``checks`` and ``passed``."""
    from moe_a2a.bench_floors import FloorA, FloorB
    from moe_a2a.run import DTYPES

    dtype = DTYPES[plan.dtype]
    subjects: List[BackendSubject] = []
    try:
        router, weights = _router_and_weights(plan, dtype)
        subjects = [BackendSubject(n, j, rank, device, router, weights, dtype)
                    for n, j in zip(plan.backends, plan.args_json)]
        clock = Clock(device, world_size)
        ref_weights = weights.to(device, torch.float32) if plan.check else None
        e_local = plan.shape.num_experts // world_size
        checks: List[Dict[str, Any]] = []
        results = []
        for size in plan.num_tokens:
            # every rank owns `size` tokens; a DP rank's batch spans its attention-TP ranks
            atp = max(s.attn_tp_size for s in subjects)
            if any(s.attn_tp_size != atp for s in subjects):
                raise MoeA2AError("every backend must run with the same attention-TP size; fix: "
                                  "give --dp-size/--enable-dp-attention so that they apply to all")
            g0 = subjects[0].groups
            batch = _inputs(plan, size, g0.dp_rank, size * atp, plan.shape.hidden_size, device, dtype)
            topk = _route(batch, weights, router)
            for s in subjects:
                s.prepare(batch, topk, size)
            mine = slice(g0.attn_tp_rank * size, (g0.attn_tp_rank + 1) * size)
            x, ids, w = batch[mine], topk.ids[mine], topk.weights[mine]
            floor_a, floor_b = FloorA(x, ids, w, e_local), FloorB(x)
            if plan.check:
                checks.extend(_check_size(size, subjects, floor_a, floor_b, x, w, batch,
                                          ref_weights, router, dtype, device, world_size))
                if not all(c["passed"] for c in checks):
                    break  # wrong results: no timings (every rank sees the same verdicts)
            samples = _measure(plan, clock, subjects, floor_a, floor_b)
            keys = sorted(samples)
            rounds = len(samples["floor_a"])
            maxed = _max_over_ranks([v for key in keys for v in samples[key]], device, world_size)
            slowest = {key: maxed[i * rounds: (i + 1) * rounds] for i, key in enumerate(keys)}
            results.append(_summarise(size, world_size, subjects, slowest, floor_a))
            if plan.progress and rank == 0:
                _report_progress(results[-1], plan)
        return {
            "machine": machine_description(device),
            "job": {"device": device.type,
                    "dist_backend": str(dist.get_backend()) if dist.is_initialized() else "none",
                    "tp_size": world_size, "dtype": plan.dtype, "warmup": plan.warmup,
                    "repeats": plan.repeats, "seed": plan.seed, "checked": plan.check,
                    "shape": {"num_experts": plan.shape.num_experts, "top_k": plan.shape.top_k,
                              "hidden_size": plan.shape.hidden_size,
                              "intermediate_size": plan.shape.intermediate_size,
                              "n_group": plan.shape.n_group, "topk_group": plan.shape.topk_group}},
            "backends": {s.name: s.describe() for s in subjects},
            "results": results,
            "cost_growth": cost_growth(results),
            "checks": checks,
            "passed": all(c["passed"] for c in checks),
        }
    finally:
        for s in subjects:
            s.close()


def _check_size(size, subjects, floor_a, floor_b, x, w, batch, ref_weights, router, dtype,
                device, world_size) -> List[Dict[str, Any]]:
    """Each backend against the reference, each floor against what it must return (untimed)."""
    from moe_a2a.reference import reference_moe

    world = world_size
    found = [
        _check(f"floor_a@{size}", floor_a(), x.float() * w.sum(dim=1, keepdim=True), dtype,
               device, world_size),
        _check(f"floor_b@{size}", floor_b(), x.float() * world, dtype, device, world_size),
    ]
    want = reference_moe(batch.float(), ref_weights, router).output
    for s in subjects:
        found.append(_check(f"{s.name}@{size}", s.total(), want[s.rows], dtype, device, world_size))
    for c in found:
        c["num_tokens"] = size
    return found


def _measure(plan: BenchPlan, clock: Clock, subjects: Sequence[BackendSubject],
             floor_a, floor_b) -> Dict[str, List[float]]:
    """Interleaved rounds; returns this rank's seconds per ``subject/part`` key."""
    samples: Dict[str, List[float]] = {"floor_a": [], "floor_b": []}
    for s in subjects:
        for part in (("total",) if s.fused_path else PARTS):
            samples[f"{s.name}/{part}"] = []
    for round_index in range(plan.warmup + plan.repeats):
        got: Dict[str, float] = {}
        got["floor_a"], _ = clock.time(floor_a)
        got["floor_b"], _ = clock.time(floor_b)
        for s in subjects:
            if s.fused_path:
                got[f"{s.name}/total"], _ = clock.time(s.total)
                continue
            got[f"{s.name}/dispatch"], dispatched = clock.time(s.dispatch)
            got[f"{s.name}/experts"], expert_out = clock.time(lambda: s.experts(dispatched))
            got[f"{s.name}/combine"], _ = clock.time(lambda: s.combine(dispatched, expert_out))
            del dispatched, expert_out
            got[f"{s.name}/total"], _ = clock.time(s.total)
            got[f"{s.name}/comm"], _ = clock.time(s.comm)
        if round_index >= plan.warmup:
            for key, value in got.items():
                samples[key].append(value)
    return samples


def _summarise(size: int, world_size: int, subjects: Sequence[BackendSubject],
               samples: Dict[str, List[float]], floor_a) -> Dict[str, Any]:
    """Medians per part; ratios as the median of the per-round ratios (each round's subjects
    were timed back to back, so a change of machine load cancels out of the ratio)."""
    ms = {key: [v * 1e3 for v in values] for key, values in samples.items()}
    fa, fb = ms["floor_a"], ms["floor_b"]
    entry: Dict[str, Any] = {"num_tokens": size, "floor_a_ms": statistics.median(fa),
                             "floor_b_ms": statistics.median(fb),
                             "floor_a_rows_sent": floor_a.rows_sent,
                             "samples_ms": {"floor_a": fa, "floor_b": fb}, "backends": {}}
    for s in subjects:
        own = {part: ms[f"{s.name}/{part}"] for part in PARTS if f"{s.name}/{part}" in ms}
        times: Dict[str, Any] = {f"{part}_ms": (statistics.median(own[part]) if part in own else None)
                                 for part in PARTS}
        comm = own.get("comm")
        times.update(
            ratio_floor_a=None if comm is None else paired_ratio(comm, fa),
            ratio_floor_b=None if comm is None else paired_ratio(comm, fb),
            # best of the rounds: what the code costs when no other process got in the way
            best_ratio_floor_a=None if comm is None else min(comm) / min(fa),
            best_ratio_floor_b=None if comm is None else min(comm) / min(fb),
            tokens_per_s=world_size * size / (times["total_ms"] / 1e3),
            path="fused" if s.fused_path else "dispatch",
            samples_ms=own,
        )
        entry["backends"][s.name] = times
    return entry


def _report_progress(entry: Dict[str, Any], plan: BenchPlan) -> None:
    parts = [f"floor (a) {entry['floor_a_ms']:.3g} ms", f"floor (b) {entry['floor_b_ms']:.3g} ms"]
    for name, t in entry["backends"].items():
        ratio = "" if t["ratio_floor_a"] is None else f", comm {t['ratio_floor_a']:.2f}x floor (a)"
        parts.append(f"{name} {t['total_ms']:.3g} ms{ratio}")
    print(f"[moe-a2a bench] {entry['num_tokens']} tokens/rank ({plan.repeats} repeats): "
          + "; ".join(parts), file=sys.stderr, flush=True)


def run_bench(plan: BenchPlan, world_size: int, timeout_s: float = 3600.0) -> Dict[str, Any]:
    """Spawn ``world_size`` local ranks (``moe_a2a.run.spawn_job``) and return the report."""
    from moe_a2a.run import spawn_job

    return spawn_job(plan, world_size, timeout_s=timeout_s, rank_fn=bench_rank)


__all__ = ["BenchPlan", "BackendSubject", "Clock", "PARTS", "bench_on_group", "bench_rank",
           "machine_description", "run_bench"]
