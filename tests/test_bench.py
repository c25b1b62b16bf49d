"""``moe-a2a bench``: the report's schema, ratios from the run's own samples, the plot, plugins,
wrong backends caught, bad input. Small sizes only: timings are never asserted (they belong in
benchmarks/, not in tests)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import bench_checks
from moe_a2a.bench_report import fit_cost, format_table, paired_ratio
from moe_a2a.cli import main

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PARTS = ("dispatch", "experts", "combine", "total", "comm")


def _bench(*argv, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOE_A2A_", "SGLANG_"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "moe_a2a", "bench", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def _check_report(report, backends, sizes, tp):
    assert report["passed"] is True
    assert set(report["machine"]) >= {"cpu", "cpu_count", "torch", "torch_threads_per_rank"}
    job = report["job"]
    assert (job["device"], job["dist_backend"], job["tp_size"]) == ("cpu", "gloo", tp)
    assert list(report["backends"]) == list(backends)
    for name, layout in report["backends"].items():
        # bench's defaults: every rank owns its tokens, experts over every rank
        assert (layout["attn_tp_size"], layout["ep_size"]) == (1, tp), name
    assert [r["num_tokens"] for r in report["results"]] == list(sizes)
    assert {c["what"] for c in report["checks"]} == {
        f"{w}@{n}" for n in sizes for w in ("floor_a", "floor_b", *backends)}
    for entry in report["results"]:
        fa, fb = entry["samples_ms"]["floor_a"], entry["samples_ms"]["floor_b"]
        assert len(fa) == len(fb) == job["repeats"]
        assert entry["floor_a_ms"] == statistics.median(fa) > 0
        assert entry["floor_b_ms"] == statistics.median(fb) > 0
        assert entry["floor_a_rows_sent"] >= entry["num_tokens"]  # top-k >= 1: every token sent
        for name in backends:
            t = entry["backends"][name]
            for part in PARTS:  # medians of this run's own samples
                assert t[f"{part}_ms"] == statistics.median(t["samples_ms"][part]) > 0
            # ratios from the same rounds of the same run
            assert t["ratio_floor_a"] == paired_ratio(t["samples_ms"]["comm"], fa)
            assert t["ratio_floor_b"] == paired_ratio(t["samples_ms"]["comm"], fb)
            assert t["best_ratio_floor_a"] == min(t["samples_ms"]["comm"]) / min(fa)
            assert t["best_ratio_floor_b"] == min(t["samples_ms"]["comm"]) / min(fb)
            assert t["tokens_per_s"] == pytest.approx(tp * entry["num_tokens"] / t["total_ms"] * 1e3)
            assert t["path"] == "dispatch"


@pytest.mark.multiproc
def test_cli_json_and_plot_on_4_ranks(tmp_path):
    """The issue's command at small sizes: exit 0, the JSON per backend and size, a PNG."""
    png = tmp_path / "out.png"
    proc = _bench("--device", "cpu", "--tp-size", "4", "--backends", "none,alltoall",
                  "--num-tokens", "8,32", "--hidden-size", "64", "--repeats", "3", "--warmup", "1",
                  "--json", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    _check_report(report, ("none", "alltoall"), (8, 32), tp=4)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    # progress on stderr: the start and one line per size
    assert "[moe-a2a bench] none, alltoall: starting 4 local cpu ranks" in proc.stderr
    assert proc.stderr.count("tokens/rank (3 repeats)") == 2
    table = format_table(report)
    for needle in ("floor (a)", "floor (b)", "none", "alltoall", "comm/floor(a)", "AMD" if "AMD" in
                   report["machine"]["cpu"] else report["machine"]["cpu"]):
        assert needle in table


@pytest.mark.multiproc
def test_cli_on_one_rank():
    """One rank: the floors' collectives run on a 1-rank group (local copies)."""
    proc = _bench("--tp-size", "1", "--num-tokens", "4", "--repeats", "1", "--warmup", "0",
                  "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["job"]["tp_size"] == 1
    assert report["results"][0]["backends"]["alltoall"]["ratio_floor_a"] > 0


@pytest.mark.multiproc
def test_registered_backends_and_layouts(pool2):
    """Any registered backend: the DeepEP normal and low-latency layouts, a fused backend."""
    report = pool2.run(bench_checks.bench_case, [
        dict(moe_a2a_backend="alltoall"),
        dict(moe_a2a_backend="test_deepep_normal"),
        dict(moe_a2a_backend="test_deepep_ll", deepep_num_max_dispatch_tokens_per_rank=16),
        dict(moe_a2a_backend="test_fused", mega_moe_num_max_tokens_per_rank=16),
    ], (1, 4, 16), repeats=2, warmup=0)[0]
    assert report["passed"] is True
    growth = report["cost_growth"]  # three sizes: a fit per floor and per backend part
    assert set(growth) == {"floor_a", "floor_b", "test_fused/total"} | {
        f"{n}/{p}" for n in ("alltoall", "test_deepep_normal", "test_deepep_ll")
        for p in ("comm", "total")}
    entry = report["results"][-1]
    for name in ("alltoall", "test_deepep_normal", "test_deepep_ll"):
        t = entry["backends"][name]
        assert t["path"] == "dispatch" and t["ratio_floor_a"] > 0 and t["comm_ms"] > 0
    fused = entry["backends"]["test_fused"]
    assert fused["path"] == "fused" and fused["total_ms"] > 0
    assert fused["dispatch_ms"] is None and fused["ratio_floor_a"] is None
    assert report["backends"]["test_deepep_ll"]["class"] == "LowLatencyLayoutDispatcher"


def test_cost_fit_recovers_a_line_and_the_slopes():
    sizes = [1, 2, 4, 8, 1024, 2048]
    fit = fit_cost(sizes, [5.0 + 0.04 * n for n in sizes])  # 5 ms fixed, 40 us per token
    assert fit["fixed_ms"] == pytest.approx(5.0) and fit["per_token_us"] == pytest.approx(40.0)
    assert fit["balance_tokens"] == pytest.approx(125.0)
    assert fit["slope_small"] < 0.02 and 0.9 < fit["slope_large"] < 1.0
    assert fit_cost([1, 2], [1.0, 2.0]) is None
    assert paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 3.0]) == 2.0  # same-round ratios 2, 3, 1


@pytest.mark.multiproc
def test_wrong_backend_gives_no_timings(pool2):
    report = pool2.run(bench_checks.bench_case, [dict(moe_a2a_backend="alltoall"),
                                                 dict(moe_a2a_backend="test_wrong")],
                       (8,), repeats=1, warmup=0)[0]
    assert report["passed"] is False and report["results"] == []
    verdicts = {c["what"]: c["passed"] for c in report["checks"]}
    assert verdicts == {"floor_a@8": True, "floor_b@8": True, "alltoall@8": True,
                        "test_wrong@8": False}


def _exit_code(argv):
    """``moe-a2a ARGV`` in this process (argparse errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, message", [
    (["--backends", "nope"], "nope"),
    (["--backends", "none,none"], "names a backend twice"),
    (["--num-tokens", "0"], "every value must be >= 1"),
    (["--num-tokens", "12,x"], "comma-separated integers"),
    (["--repeats", "0"], "--repeats 0 is invalid"),
    (["--warmup", "-1"], "--warmup -1 is invalid"),
    (["--moe-a2a-backend", "alltoall"], "fix: --backends alltoall"),
    (["--tp-size", "4", "--num-experts", "6"], "--num-experts 6 cannot be split"),
    (["--backends", "deepep"], "cannot run on cpu"),
    (["--plot", "/nonexistent-folder/x.png"], "does not exist"),
    (["--enable-eplb"], "--enable-eplb: EPLB is not built by `moe-a2a bench`"),
    (["--backends", "alltoall", "--enforce-shared-experts-fusion"], "not built by `moe-a2a bench`"),
    (["--ep-szie", "2"], "did you mean"),
])
def test_bad_input_exits_2(argv, message, capsys):
    assert _exit_code(["bench", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_plot_without_matplotlib_exits_2_naming_the_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert _exit_code(["bench", "--quiet", "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'moe-a2a[bench]'" in err and "matplotlib" in err
