#!/usr/bin/env bash
# MPT-7B (ALiBi) on one GPU: the ALiBi kernel tests, the plain decoder's full-cache grid with prompts, GPT-J-6B at
# the same cache bytes (18,725 tokens) in both engines, MPT-7B in the compiled engine, the attention variants alone.
# Usage (repository root): OUT=DIR bash lab/alibi_campaign.sh      (about 5 minutes on an H200)
set -uo pipefail
out=${OUT:?set OUT to the output folder}; t0=$(date +%s)
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
kf="python3 -m kfsim"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv > "$out/nvidia-smi.csv"
el "kernel tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_measure_cpu.py tests/test_fused_attention.py \
  -k "alibi or mpt" 2>&1 | tail -4 | tee "$out/gpu-tests.txt"
el "batch 1 x 16k, both models"
{ $kf measure --model mpt-7b --batch 1 --context 16384 --steps 50 --out "$out/rows.csv"
  $kf measure --model gpt-j-6b --batch 1 --context 18725 --steps 50 --out "$out/refs.csv"; } > "$out/campaign.log" 2>&1
el "mpt grid"
$kf measure --model mpt-7b --batch 1,4,16,64 --context 1024,4096,16384 --steps 50 --prefill 512,2048,8192 \
  --out "$out/rows.csv" >> "$out/campaign.log" 2>&1
el "attention variants"
python3 -m lab.bench_alibi --out "$out/alibi-variants.csv" > "$out/alibi.log" 2>&1
el "compiled engine"
$kf measure --engine compiled --model mpt-7b --batch 1 --context 16384 --steps 50 --out "$out/compiled.csv" \
  >> "$out/campaign.log" 2>&1
$kf measure --engine compiled --model gpt-j-6b --batch 1 --context 18725 --steps 50 --out "$out/compiled.csv" \
  >> "$out/campaign.log" 2>&1
el done
python3 - "$out" <<'PY'
import sys, pandas as pd
o = sys.argv[1]
for f in ("rows.csv", "refs.csv", "compiled.csv"):
    try:
        d = pd.read_csv(f"{o}/{f}")
    except FileNotFoundError:
        continue
    print(f); print(d[["model", "engine", "batch", "context", "phase", "step_ms", "power_w", "status"]].to_string(index=False))
d = pd.read_csv(f"{o}/alibi-variants.csv")
print(d.pivot_table(index="variant", columns=["batch", "context"], values="us").round(1).to_string())
PY
grep -c Traceback "$out"/*.log
