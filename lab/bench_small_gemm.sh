#!/usr/bin/env bash
# Batch 16 and 64 decode steps with two option sets side by side (BASE, and NEW: by default BASE plus small_gemm),
# after the product and attention kernel tests (TESTS=0 skips them; TEST_K=... a pytest -k expression, TESTS_S its
# time limit) and, with PRODUCTS=1, gemm_small's fused products against cuBLAS (lab.bench_gemm_small; MATCH=REGEX
# its variants, PRODUCT_BATCH=64 its batches); then where a NEW step spends its time (POINTS="--point M,B,C,P,R ...").
# FULL_S, KF_S, PROFILE_S: time limits of the parts, seconds.
# Usage: [BASE=...] [NEW=...] [CONTEXTS=820,2048,4096] bash lab/bench_small_gemm.sh OUTDIR
export OUT=${1:?usage: bench_small_gemm.sh OUTDIR}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
BASE=${BASE:-write_first,fast_log,l2_hints}; NEW=${NEW:-$BASE,small_gemm}; CONTEXTS=${CONTEXTS:-820,2048,4096}
gpu=$(python3 -c "from measure.env import environment; print(environment()['gpu'])") || exit 1; export gpu
[ "${TESTS:-1}" = 0 ] || (timeout ${TESTS_S:-220} python3 -m pytest -q -p no:cacheprovider -x tests/test_gemv.py tests/test_fused_attention.py ${TEST_K:+-k "$TEST_K"} 2>&1 | tail -6) > $OUT/$gpu-tests.txt; [ "${TESTS:-1}" = 0 ] || tail -3 $OUT/$gpu-tests.txt
ceiling=$(python3 -c "from measure.summarize import read_ceiling_gbps as c; print(c('data/$gpu-plain/microbench.csv'))")
[ "${PRODUCTS:-0}" = 0 ] || timeout 200 python3 -m lab.bench_gemm_small --batch ${PRODUCT_BATCH:-16,64} ${MATCH:+--match "$MATCH"} --ceiling-gbps "$ceiling" --out $OUT/$gpu-gemm-small-fused.csv | tee $OUT/$gpu-gemm-small-fused.txt
export BASE NEW; for K in $BASE $NEW; do n=$OUT/$gpu-step-${K//,/_}.csv
timeout ${FULL_S:-150} python3 -m kfsim measure --engine compiled --kernel-options $K --model gpt-j-6b,llama-3-8b --batch 16,64 --context $CONTEXTS --kv-ratio 1 --policy full --steps 30 --out $n > /dev/null 2>>$OUT/measure.log
timeout ${KF_S:-100} python3 -m kfsim measure --engine compiled --kernel-options $K --model gpt-j-6b,llama-3-8b --batch 16,64 --context 4096 --kv-ratio 0.5,0.2 --policy keyformer --steps 30 --out $n > /dev/null 2>>$OUT/measure.log; done
python3 - <<'P'
import pandas as pd, os
o, g = os.environ["OUT"], os.environ["gpu"]
fs = [f"{o}/{g}-step-{os.environ[v].replace(',', '_')}.csv" for v in ("BASE", "NEW")]
if all(map(os.path.exists, fs)):
  d = [pd.read_csv(f) for f in fs]; k = ["model", "batch", "context", "policy", "kv_ratio"]
  m = d[0][k + ["step_ms", "status"]].merge(d[1][k + ["step_ms", "status"]], on=k, suffixes=("_base", "_new"))
  m["ratio"] = (m.step_ms_new / m.step_ms_base).round(3); print(m.to_string())
else: print(fs); os.system(f"tail -5 {o}/measure.log")
P
timeout ${PROFILE_S:-80} python3 -m lab.profile_step --kernel-options $NEW --no-gemms --out $OUT/$gpu-profile-new.csv ${POINTS:---point gpt-j-6b,16,820,full,1 --point llama-3-8b,16,820,full,1} 2>&1 | grep -E "step|  [a-z]" | head -${PROFILE_LINES:-20}
