#!/usr/bin/env bash
# The CPU figures of docs/performance.md: 4 gloo ranks, hidden 1024, none and alltoall.
#   cost growth: 1 to 8192 tokens per rank, one run (JSON + PNG);
#   target: alltoall at 1024, 2048, 4096 and 8192 tokens per rank beside the floors, RUNS runs
#   of REPEATS rounds each (to see how stable the ratios are on a shared machine).
# Usage: [RUNS=3] [REPEATS=20] benchmarks/cpu_bench.sh OUT_DIR
set -euo pipefail
out=${1:-benchmarks/results/cpu-gloo-4ranks}; mkdir -p "$out"
bench=(python -m moe_a2a bench --device cpu --tp-size 4 --hidden-size 1024)
"${bench[@]}" --backends none,alltoall --num-tokens 1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192 \
  --json --plot "$out/cost-growth.png" > "$out/cost-growth.json"
for run in $(seq 1 "${RUNS:-3}"); do
  "${bench[@]}" --backends alltoall --num-tokens 1024,2048,4096,8192 --repeats "${REPEATS:-20}" \
    --json --plot "$out/target-run$run.png" > "$out/target-run$run.json"
done
python - "$out" <<'PY'
import json, pathlib, sys
from moe_a2a.bench_report import format_table
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*.json")):
    (out / (f.stem + ".txt")).write_text(format_table(json.loads(f.read_text())) + "\n")
    print(f.stem, *(f"{e['num_tokens']}: alltoall {e['backends']['alltoall']['ratio_floor_a']:.2f}x (a), "
                    f"{e['backends']['alltoall']['ratio_floor_b']:.2f}x (b)" for e in
                    json.loads(f.read_text())["results"] if e["num_tokens"] >= 1024), sep="\n  ")
PY
