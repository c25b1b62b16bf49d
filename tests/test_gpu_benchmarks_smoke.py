"""The GPU benchmark scripts of benchmarks/ run on a CPU at toy size (the figures in
docs/performance.md come from the same code on an H200)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script, tmp_path, *args):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu",
                           "--small", "--repeats", "1", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_gpu_layer_smoke(tmp_path):
    info = _run("gpu_layer.py", tmp_path, "--tokens", "8")
    assert info["card_figures"]["bf16_gemm_tflops"] > 0
    assert info["grouped_vs_reference_max_abs_diff"] < 0.1


def test_gpu_experts_ep_smoke(tmp_path):
    info = _run("gpu_experts_ep.py", tmp_path, "--ep", "1,2", "--tokens", "16")
    rows = {(r["ep"], r["tokens_per_rank"]): r for r in info["rows"]}
    assert set(rows) == {(1, 16), (2, 16)}
    assert rows[1, 16]["pairs"] == 16 * 4 and rows[1, 16]["rows"] == 16  # top-4, all local
    two = rows[2, 16]
    assert 0 < two["pairs"] < 2 * 16 * 4 and two["rows"] <= 2 * 16  # half the experts
    assert two["experts_touched"] <= 8 and two["experts_ms"] > 0
