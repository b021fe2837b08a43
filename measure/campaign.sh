#!/usr/bin/env bash
# The project's measurement campaign on one CUDA GPU, as committed under data/<gpu>-plain/:
#   microbenchmarks; the decode grid in CUDA-graph mode with prefill points; an eager-mode subset.
# Usage (from the repository root): bash measure/campaign.sh OUTDIR
# Runs from a checkout without installing (PYTHONPATH=.); wheels in .whl/ supply click/pyyaml/pynvml if missing.
set -uo pipefail
out=${1:?usage: campaign.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! python3 -c "import click, yaml, pynvml" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv | tee "$out/nvidia-smi.csv"
gpu=$(python3 -c "from measure.env import environment; print(environment()['gpu'])") || exit 1
kf="python3 -m kfsim"
# smoke: a tiny model through every code path (fails fast before the long grid)
$kf measure --model cerebras-gpt-111m --batch 2 --context 512 --kv-ratio 1,0.5 --policy full,keyformer \
  --prefill 256 --steps 10 --out /tmp/smoke.csv || exit 1
[ "${MICRO:-1}" = 1 ] && timeout 120 $kf microbench --out "$out/microbench.csv"
timeout "${DECODE_S:-420}" $kf measure --model gpt-j-6b,llama-3-8b --batch 1,4,16,64 --context 1024,4096,16384 \
  --kv-ratio 1,0.5,0.2 --policy full,keyformer --prefill 512,2048,8192 --steps 50 --out "$out/rows.csv"
timeout "${EAGER_S:-90}" $kf measure --eager --model gpt-j-6b,llama-3-8b --batch 1,16 --context 1024,4096 \
  --kv-ratio 1,0.5 --policy full,keyformer --steps 30 --out "$out/rows.csv"
python3 -m measure.manifest "$out" "bash measure/campaign.sh OUT" \
  "the plain decoder in CUDA graphs with prefill points, and an eager subset"
echo "rows: $(($(wc -l < "$out/rows.csv") - 1))"
