#!/usr/bin/env bash
# The transformers campaign on one CUDA GPU, as committed under data/<gpu>-hf-<mode>/:
#   a smoke test, then the decode grid through transformers' own model classes and caches.
# Usage (from the repository root): [MODE=eager|compiled] [MODELS=...] [BATCHES=...] [CONTEXTS=...] \
#   [POLICY=full,keyformer] [ROUNDS=n] [GRID_S=seconds] bash measure/hf_campaign.sh OUTDIR
# Runs from a checkout without installing (PYTHONPATH=.); rows are appended, so a rerun resumes.
set -uo pipefail
out=${1:?usage: hf_campaign.sh OUTDIR}
mode=${MODE:-eager}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
kf="python3 -m kfsim"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv | tee "$out/nvidia-smi.csv"
$kf measure --backend hf --hf-mode "$mode" --model cerebras-gpt-111m --batch 2 --context 512 --kv-ratio 1 \
  --policy full --steps 5 --warmup 2 --out /tmp/hf-smoke.csv || exit 1
timeout "${GRID_S:-480}" $kf measure --backend hf --hf-mode "$mode" --model "${MODELS:-llama-3-8b,gpt-j-6b,mistral-7b,mpt-7b}" \
  --batch "${BATCHES:-1,16,64}" --context "${CONTEXTS:-1024,4096,16384}" --kv-ratio "${RATIOS:-1,0.5,0.2}" \
  --policy "${POLICY:-full,keyformer}" --steps "${STEPS:-20}" --warmup 5 --rounds "${ROUNDS:-1}" --out "$out/rows.csv" 2>&1 | tee -a "$out/campaign.log"
python3 -m measure.manifest "$out" "MODE=$mode bash measure/hf_campaign.sh OUT" \
  "decode steps through Hugging Face transformers ($mode), full cache and measure.hf.KeyformerCache"
echo "rows: $(($(wc -l < "$out/rows.csv") - 1))"
