"""How a ``moe-a2a bench`` report is shown: a text table and a log-log PNG plot.

The report is the dict ``moe_a2a.bench.bench_rank`` returns (what ``--json`` prints).
matplotlib is optional (``pip install 'moe-a2a[bench]'``); only ``write_plot`` needs it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from moe_a2a.errors import MoeA2AError

PLOT_INSTALL = "pip install 'moe-a2a[bench]'  (or: pip install matplotlib)"


class PlotUnavailable(MoeA2AError):
    """``--plot`` was asked for but matplotlib is not installed."""


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median over rounds of ``numerator[i] / denominator[i]`` (same-round samples)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def fit_cost(sizes: Sequence[int], times_ms: Sequence[float]) -> Optional[Dict[str, float]]:
    """Fit ``t(T) = fixed + per_token * T`` (least squares on relative errors, so that the small
    sizes count as much as the large ones), with the log-log slopes at both ends.

    Returns None for fewer than 3 sizes. ``fixed_ms``: the cost of a call with no tokens;
    ``per_token_us``: the cost of one more token per rank; ``balance_tokens``: the size at
    which both halves cost the same (below it the fixed cost dominates, above it the
    per-token cost); ``slope_small`` / ``slope_large``: d log t / d log T between the two
    smallest and the two largest sizes (0 = fixed cost only, 1 = proportional to T).
    """
    if len(sizes) < 3:
        return None
    u = [1.0 / t for t in times_ms]
    s_uu = sum(x * x for x in u)
    s_tuu = sum(n * x * x for n, x in zip(sizes, u))
    s_ttuu = sum(n * n * x * x for n, x in zip(sizes, u))
    s_u = sum(u)
    s_tu = sum(n * x for n, x in zip(sizes, u))
    det = s_uu * s_ttuu - s_tuu * s_tuu
    fixed = (s_u * s_ttuu - s_tu * s_tuu) / det
    per_token = (s_uu * s_tu - s_tuu * s_u) / det

    def slope(i: int, j: int) -> float:
        return math.log(times_ms[j] / times_ms[i]) / math.log(sizes[j] / sizes[i])

    return {"fixed_ms": fixed, "per_token_us": per_token * 1e3,
            "balance_tokens": fixed / per_token if per_token > 0 else math.inf,
            "slope_small": slope(0, 1), "slope_large": slope(-2, -1)}


def cost_growth(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """``fit_cost`` of each floor and of each backend's ``comm`` and ``total`` over the sizes."""
    sizes = [e["num_tokens"] for e in results]
    if len(sizes) < 3:
        return {}
    growth: Dict[str, Any] = {"floor_a": fit_cost(sizes, [e["floor_a_ms"] for e in results]),
                              "floor_b": fit_cost(sizes, [e["floor_b_ms"] for e in results])}
    for name in results[0]["backends"]:
        for part in ("comm", "total"):
            series = [e["backends"][name][f"{part}_ms"] for e in results]
            if all(v is not None for v in series):
                growth[f"{name}/{part}"] = fit_cost(sizes, series)
    return growth


def format_growth(growth: Dict[str, Any]) -> List[str]:
    if not growth:
        return []
    head = ("cost growth", "fixed ms", "per token us", "balance at T", "slope small", "slope large")
    rows = [head] + [(name, f"{f['fixed_ms']:.3g}", f"{f['per_token_us']:.3g}",
                      f"{f['balance_tokens']:.0f}", f"{f['slope_small']:.2f}",
                      f"{f['slope_large']:.2f}") for name, f in growth.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def describe_job(report: Dict[str, Any]) -> str:
    job, shape = report["job"], report["job"]["shape"]
    return (f"moe-a2a bench: {job['tp_size']} {job['device']} ranks ({job['dist_backend']}), "
            f"hidden {shape['hidden_size']}, {shape['num_experts']} experts, top-{shape['top_k']}, "
            f"intermediate {shape['intermediate_size']}, {job['dtype']}; median of "
            f"{job['repeats']} rounds after {job['warmup']} warm-up, slowest rank, ms")


def describe_machine(report: Dict[str, Any]) -> str:
    m = report["machine"]
    card = f", {m['card_count']} x {m['card']} ({m['card_memory_gib']} GiB)" if "card" in m else ""
    load = (f", load average {m['load_average_1min']} at the end"
            if "load_average_1min" in m else "")
    return (f"machine: {m['cpu']} ({m['cpu_count']} cores){card}; torch {m['torch']}, "
            f"{m['torch_threads_per_rank']} thread(s) per rank{load}")


def format_table(report: Dict[str, Any]) -> str:
    """Rows per size: the floors, then each backend (parts, comm, ratios, tokens/s)."""
    head = ("tokens/rank", "subject", "dispatch", "experts", "combine", "total", "comm",
            "comm/floor(a)", "comm/floor(b)", "best (a)", "best (b)", "tokens/s")
    rows: List[Tuple[str, ...]] = []
    for entry in report["results"]:
        n = str(entry["num_tokens"])
        fa, fb = entry["samples_ms"]["floor_a"], entry["samples_ms"]["floor_b"]
        rows.append((n, "floor (a)", "-", "-", "-", "-", _ms(entry["floor_a_ms"]), "1.00",
                     _ratio(paired_ratio(fa, fb)), "1.00", _ratio(min(fa) / min(fb)), "-"))
        rows.append((n, "floor (b)", "-", "-", "-", "-", _ms(entry["floor_b_ms"]),
                     _ratio(paired_ratio(fb, fa)), "1.00", _ratio(min(fb) / min(fa)), "1.00", "-"))
        for name, t in entry["backends"].items():
            comm = t["samples_ms"].get("comm")
            rows.append((n, name, _ms(t["dispatch_ms"]), _ms(t["experts_ms"]),
                         _ms(t["combine_ms"]), _ms(t["total_ms"]), _ms(t["comm_ms"]),
                         _ratio(t["ratio_floor_a"]), _ratio(t["ratio_floor_b"]),
                         _ratio(comm and min(comm) / min(fa)), _ratio(comm and min(comm) / min(fb)),
                         f"{t['tokens_per_s']:.0f}"))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [describe_job(report)]
    lines += ["  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in
                        enumerate(zip(r, widths))).rstrip() for r in [head, *rows]]
    lines.append("comm = dispatch -> combine with the experts skipped (what the floors measure); "
                 "ratios: median over rounds of the same round's ratio; best: fastest round over "
                 "fastest round; floor (a): gather + 2 all-to-all + weighted scatter-add; "
                 "floor (b): all-gather + reduce-scatter")
    lines += format_growth(report.get("cost_growth", {}))
    lines.append(describe_machine(report))
    return "\n".join(lines)


def check_plot_available() -> None:
    """Raise ``PlotUnavailable`` (naming the install command) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailable(f"--plot needs matplotlib ({exc}); fix: {PLOT_INSTALL}") from None


def write_plot(report: Dict[str, Any], path: str) -> None:
    """A log-log PNG: time per layer call against tokens per rank; per backend its ``comm``
    (solid) and ``total`` (dashed, experts included); the floors in grey and black."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    results = report["results"]
    sizes = [e["num_tokens"] for e in results]
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    ax.plot(sizes, [e["floor_a_ms"] for e in results], color="black", marker="s",
            label="floor (a): gather + 2 all-to-all + scatter-add")
    ax.plot(sizes, [e["floor_b_ms"] for e in results], color="grey", marker="s",
            label="floor (b): all-gather + reduce-scatter")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(report["backends"]):
        color = colors[i % len(colors)]
        comm = [e["backends"][name]["comm_ms"] for e in results]
        if all(v is not None for v in comm):
            ax.plot(sizes, comm, color=color, marker="o", label=f"{name}: dispatch + combine")
        ax.plot(sizes, [e["backends"][name]["total_ms"] for e in results], color=color,
                linestyle="--", marker=".", label=f"{name}: with experts")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.set_xticks(sizes)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("time per layer call (ms, median, slowest rank)")
    job = report["job"]
    ax.set_title(f"{job['tp_size']} {job['device']} ranks ({job['dist_backend']}), hidden "
                 f"{job['shape']['hidden_size']}, {job['dtype']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, describe_machine(report), fontsize=6, color="dimgrey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, format="png")
    plt.close(fig)


__all__ = ["PLOT_INSTALL", "PlotUnavailable", "check_plot_available", "cost_growth",
           "describe_job", "describe_machine", "fit_cost", "format_table", "paired_ratio",
           "write_plot"]
