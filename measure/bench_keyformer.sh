#!/usr/bin/env bash
# Where Keyformer's attention loses to the full cache at the same cached tokens: the attention kernels alone for
# several block configurations (tokens per block x warps x pipeline stages) under the compiled engine's attention
# options (and those options with pos32 at the default configuration, after pos32's kernel checks), then the kernels
# of whole Keyformer steps and of their ideal reduced-cache steps (profile_step).
# Usage (repository root): bash measure/bench_keyformer.sh OUTDIR
# CONFIGS=... the configurations (bench_attention --configs); OPTIONS=... the options (default below).
export OUT=${1:?usage: bench_keyformer.sh OUTDIR}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! python3 -c "import click, yaml, pynvml" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
gpu=$(python3 -c "from measure.env import environment; print(environment()['gpu'])") || exit 1; export gpu
opts=${OPTIONS:-write_first,fast_log,l2_hints}
ceiling=$(python3 -c "from measure.summarize import read_ceiling_gbps as c; print(c('measure/data/$gpu-microbench.csv'))")
timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_fused_attention.py -k pos32 2>&1 | tail -3 \
  > "$OUT/$gpu-pos32-tests.txt"; tail -1 "$OUT/$gpu-pos32-tests.txt"
timeout 100 python3 -m measure.bench_attention --batch 1,16,64 --tokens 3277,8192 --configs default \
  --variants "${opts//,/+},${opts//,/+}+pos32" --ceiling-gbps "$ceiling" --out "$OUT/$gpu-attention-pos32.csv" \
  > "$OUT/$gpu-attention-pos32.txt" 2>&1; grep keyformer "$OUT/$gpu-attention-pos32.txt" | cut -c1-40,90-
timeout "${SWEEP_S:-270}" python3 -m measure.bench_attention --batch 1,16,64 --tokens 3277,8192 \
  --configs "${CONFIGS:-0x4x3,32x4x2,64x4x2,64x8x3,128x4x2,128x4x3,128x8x2}" --variants "${opts//,/+}" \
  --ceiling-gbps "$ceiling" --out "$OUT/$gpu-attention-configs.csv" > "$OUT/$gpu-attention-configs.txt" 2>&1
# per shape: the default configuration's Keyformer/full time, and each policy's fastest configuration
python3 - <<'P'
import os, pandas as pd
d = pd.read_csv(f"{os.environ['OUT']}/{os.environ['gpu']}-attention-configs.csv")
d["config"] = d.block_n.astype(str) + "x" + d.num_warps.astype(str) + "x" + d.num_stages.astype(str)
rows = []
for (m, b, t), g in d.groupby(["model", "batch", "tokens"]):
    r = {"model": m, "batch": b, "tokens": t}
    for pol in ("full", "keyformer"):
        p = g[g.policy == pol]
        best = p.loc[p.us_per_layer.idxmin()]
        r[f"{pol}_default_us"] = p[p.block_n == 0].us_per_layer.min()
        r[f"{pol}_best"] = f"{best.config} {best.us_per_layer:.1f}"
        r[f"{pol}_best_us"] = best.us_per_layer
    r["kf/full default"] = round(r["keyformer_default_us"] / r["full_default_us"], 3)
    r["kf/full best"] = round(r["keyformer_best_us"] / r["full_best_us"], 3)
    rows.append(r)
t = pd.DataFrame(rows).drop(columns=["full_best_us", "keyformer_best_us"])
print(t.to_string(index=False))
P
timeout "${PROFILE_S:-150}" python3 -m measure.profile_step --kernel-options "$opts" --no-gemms \
  --out "$OUT/$gpu-profile-keyformer.csv" --point llama-3-8b,16,16384,keyformer,0.5 --point llama-3-8b,16,8192,full,1 \
  --point llama-3-8b,64,16384,keyformer,0.5 --point llama-3-8b,64,8192,full,1 --point gpt-j-6b,1,16384,keyformer,0.5 \
  > "$OUT/$gpu-profile-keyformer.txt" 2>&1
grep -E "step |_split|_finish|_combine" "$OUT/$gpu-profile-keyformer.txt" | head -30
