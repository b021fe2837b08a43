#!/usr/bin/env bash
# The fused-decoder benchmark on one GPU: kernel checks, the attention kernels alone (ATTENTION=0 skips them), the
# batch-1 matrix-vector kernels against cuBLAS, then the grid with the compiled engine (full cache also at every
# Keyformer budget, for the ideal reduced-cache step), then the table.
# Usage (repository root): bash lab/bench_fused.sh OUTDIR [MODELS]
# TESTS=0 skips the kernel checks, ATTENTION=0 the attention kernels alone, GEMV=0 the products; BATCH=16 runs the
# grid at that batch only (default 1,16,64).
set -uo pipefail
out=${1:?usage: bench_fused.sh OUTDIR [MODELS]}
models=${2:-gpt-j-6b,llama-3-8b}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! python3 -c "import click, yaml, pynvml" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
gpu=$(python3 -c "from measure.env import environment; print(environment()['gpu'])") || exit 1
[ "${TESTS:-1}" = 0 ] || python3 -m pytest -q -p no:cacheprovider tests/test_fused_attention.py tests/test_gemv.py 2>&1 | tail -5 \
  | tee "$out/$gpu-fused-tests.txt"
kf="python3 -m kfsim"
[ -f "data/$gpu-plain/microbench.csv" ] || timeout 120 $kf microbench --out "$out/$gpu-microbench.csv"
micro=data/$gpu-plain/microbench.csv; [ -f "$micro" ] || micro=$out/$gpu-microbench.csv
ceiling=$(python3 -c "from measure.summarize import read_ceiling_gbps as c; print(c('$micro'))")
# the attention kernels alone, full cache and Keyformer at the same cached tokens (the default configuration)
[ "${ATTENTION:-1}" = 0 ] || timeout 240 python3 -m lab.bench_attention --configs default --ceiling-gbps "$ceiling" \
  --out "$out/$gpu-attention.csv" | tee "$out/$gpu-attention.txt"
# the layer's batch-1 products: cuBLAS against the fused kernels, per configuration and gemv's own choice
[ "${GEMV:-1}" = 0 ] || timeout 200 python3 -m lab.bench_gemv --block-n 1,2,8 --warps 4 --block-k 256,1024 --ceiling-gbps "$ceiling" \
  --out "$out/$gpu-gemv.csv" | tee "$out/$gpu-gemv.txt"
name=$gpu-compiled${BATCH:+-batch${BATCH//,/_}}
timeout "${FULL_S:-300}" $kf measure --engine compiled --model "$models" --batch "${BATCH:-1,16,64}" \
  --context 205,512,820,1024,2048,3277,4096,8192,16384 --kv-ratio 1 --policy full --steps 50 --out "$out/$name.csv"
timeout "${KF_S:-200}" $kf measure --engine compiled --model "$models" --batch "${BATCH:-1,16,64}" \
  --context 1024,4096,16384 --kv-ratio 0.5,0.2 --policy keyformer --steps 50 --out "$out/$name.csv"
python3 -m lab.fused_table "$out/$name.csv" "$micro" | tee "$out/${name/compiled/fused-table}.md" | tail -4
