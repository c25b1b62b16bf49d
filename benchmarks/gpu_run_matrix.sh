#!/usr/bin/env bash
# `moe-a2a run --device cuda` for both token-moving backends on every GPU of this machine:
# the default shape and a DeepSeek-V3-like shape (hidden 7168, 256 experts, top-8, bf16).
# Usage: [TPS="2 4"] benchmarks/gpu_run_matrix.sh OUT_DIR   (one JSON summary per run + a table)
set -uo pipefail
out=${1:-out}; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
big=(--hidden-size 7168 --num-experts 256 --top-k 8 --intermediate-size 256 --dtype bfloat16
     --num-tokens 256 --steps 10)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 > "$out/card.txt"
for tp in ${TPS:-2 4}; do
  [ "$tp" -le "$ngpu" ] || continue
  for backend in alltoall none; do
    ep=(); [ "$backend" = none ] && ep=(--ep-size "$tp")
    for shape in default big; do
      extra=(--steps 10); [ "$shape" = big ] && extra=("${big[@]}")
      name="tp${tp}_${backend}_${shape}"
      python3 -m moe_a2a run --device cuda --moe-a2a-backend "$backend" --tp-size "$tp" "${ep[@]}" \
        "${extra[@]}" --json --quiet > "$out/$name.json" 2> "$out/$name.err"
      echo "$name rc=$?"
    done
  done
done
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for f in sorted(out.glob("tp*.json")):
    try:
        s = json.loads(f.read_text())
    except Exception:
        rows.append(f"{f.stem}: no summary ({(out / (f.stem + '.err')).read_text()[-300:]})")
        continue
    rows.append(f"{f.stem}: passed={s['passed']} err={s['max_abs_err']:.3g} tol={s['tolerance']:.3g} "
                f"tokens/s={s['tokens_per_s']:.0f} tokens={s['tokens']}")
(out / "table.txt").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
