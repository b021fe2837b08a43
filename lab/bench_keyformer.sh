#!/usr/bin/env bash
# Where Keyformer's attention loses to the full cache at the same cached tokens: the kernel tests of the Keyformer
# options, the attention kernels alone for several option sets (variants) at the default block configuration, the
# last variant for several block configurations (tokens per block x warps x pipeline stages), then the kernels of
# whole Keyformer steps and of their ideal reduced-cache steps (profile_step) with the last variant's options.
# Usage (repository root): bash lab/bench_keyformer.sh OUTDIR
# OPTIONS=... the options every variant has (default below); VARIANTS=... the variants ('+'-joined option sets);
# TESTS_K=... the pytest -k expression of the kernel tests; CONFIGS=... the configurations (bench_attention
# --configs), SWEEP=0 skips them; POINTS=... the profiled steps (MODEL,B,C,POLICY,R, space-separated);
# PER_SM=2,4: the variants also at these programs per SM of the split (bench_attention --programs-per-sm);
# MODELS=llama-3-8b: only these shapes (bench_attention --models); SPLIT_RULE=rows: bench_attention --split-rule
# (a variant with batch1_split needs rows); PROFILE=0 skips the profile;
# TESTS_S, VARIANTS_S, SWEEP_S, PROFILE_S: time limits of the parts, seconds.
export OUT=${1:?usage: bench_keyformer.sh OUTDIR}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! python3 -c "import click, yaml, pynvml" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
gpu=$(python3 -c "from measure.env import environment; print(environment()['gpu'])") || exit 1; export gpu
opts=${OPTIONS:-write_first,fast_log,l2_hints}; b=${opts//,/+}
variants=${VARIANTS:-$b,$b+pos32,$b+pos32+lane_partials,$b+pos32+short_finish,$b+pos32+lane_partials+short_finish}
last=${variants##*,}
ceiling=$(python3 -c "from measure.summarize import read_ceiling_gbps as c; print(c('data/$gpu-plain/microbench.csv'))")
timeout "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_fused_attention.py \
  -k "${TESTS_K:-pos32 or lean or gumbel}" 2>&1 | tail -3 > "$OUT/$gpu-keyformer-tests.txt"
tail -1 "$OUT/$gpu-keyformer-tests.txt"
common=(${MODELS:+--models $MODELS} ${SPLIT_RULE:+--split-rule $SPLIT_RULE})
timeout "${VARIANTS_S:-200}" python3 -m lab.bench_attention "${common[@]}" --batch 1,16,64 --tokens 3277,8192 \
  --configs default \
  --variants "$variants" ${PER_SM:+--programs-per-sm $PER_SM} --ceiling-gbps "$ceiling" \
  --out "$OUT/$gpu-attention-variants.csv" \
  > "$OUT/$gpu-attention-variants.txt" 2>&1
[ "${SWEEP:-1}" = 0 ] || timeout "${SWEEP_S:-120}" python3 -m lab.bench_attention "${common[@]}" --batch 1,16,64 \
  --tokens 3277,8192 --configs "${CONFIGS:-0x4x3,64x4x2,128x4x2}" --variants "$last" \
  --ceiling-gbps "$ceiling" --out "$OUT/$gpu-attention-configs.csv" > "$OUT/$gpu-attention-configs.txt" 2>&1
points=${POINTS:-llama-3-8b,16,16384,keyformer,0.5 llama-3-8b,16,8192,full,1 gpt-j-6b,1,16384,keyformer,0.5 gpt-j-6b,1,8192,full,1}
[ "${PROFILE:-1}" = 0 ] || timeout "${PROFILE_S:-100}" python3 -m lab.profile_step --kernel-options "${last//+/,}" --no-gemms \
  --out "$OUT/$gpu-profile-keyformer.csv" $(printf -- "--point %s " $points) > "$OUT/$gpu-profile-keyformer.txt" 2>&1
python3 -m lab.attention_variants "$OUT/$gpu-attention-variants.csv"
[ "${SWEEP:-1}" = 0 ] || python3 -m lab.attention_variants "$OUT/$gpu-attention-configs.csv"
[ "${PROFILE:-1}" = 0 ] || grep -E "step |_split|_finish|_combine" "$OUT/$gpu-profile-keyformer.txt" | head -24
