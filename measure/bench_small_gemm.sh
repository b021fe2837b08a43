#!/usr/bin/env bash
# Batch 16 and 64 decode steps with and without the small_gemm option (same attention options), side by side,
# after the product and attention kernel tests (TESTS=0 skips them); then where a small_gemm step spends its time.
# Usage: bash measure/bench_small_gemm.sh OUTDIR
export OUT=${1:?usage: bench_small_gemm.sh OUTDIR}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1; O=write_first,fast_log,l2_hints
gpu=$(python3 -c "from measure.env import environment; print(environment()['gpu'])") || exit 1; export gpu
[ "${TESTS:-1}" = 0 ] || (timeout 220 python3 -m pytest -q -p no:cacheprovider -x tests/test_gemv.py tests/test_fused_attention.py 2>&1 | tail -6) > $OUT/$gpu-tests.txt; tail -3 $OUT/$gpu-tests.txt
for K in $O $O,small_gemm; do n=$OUT/$gpu-step-${K//,/_}.csv
timeout 150 python3 -m kfsim measure --engine compiled --kernel-options $K --model gpt-j-6b,llama-3-8b --batch 16,64 --context 820,2048,4096 --kv-ratio 1 --policy full --steps 30 --out $n > /dev/null 2>>$OUT/measure.log
timeout 100 python3 -m kfsim measure --engine compiled --kernel-options $K --model gpt-j-6b,llama-3-8b --batch 16,64 --context 4096 --kv-ratio 0.5,0.2 --policy keyformer --steps 30 --out $n > /dev/null 2>>$OUT/measure.log; done
python3 - <<'P'
import pandas as pd, glob, os
fs=sorted(glob.glob(os.environ["OUT"]+"/"+os.environ["gpu"]+"-step-*.csv")); d=[pd.read_csv(f) for f in fs]
k=["model","batch","context","policy","kv_ratio"]
if len(d)==2:
  m=d[0][k+["step_ms","status"]].merge(d[1][k+["step_ms","status"]],on=k,suffixes=("_base","_small"))
  m["ratio"]=(m.step_ms_small/m.step_ms_base).round(3); print(m.to_string())
else: print(fs); os.system("tail -5 "+os.environ["OUT"]+"/measure.log")
P
timeout 80 python3 -m measure.profile_step --kernel-options $O,small_gemm --no-gemms --out $OUT/$gpu-profile-small-gemm.csv --point gpt-j-6b,16,820,full,1 --point llama-3-8b,16,820,full,1 2>&1 | grep -E "step|  [a-z]" | head -20
