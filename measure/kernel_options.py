"""The compiled engine's opt-in options by name, as `kfsim measure --kernel-options`, bench_fused.sh and
kernel_stats take them (torch-free, so that the CLI can check the names before anything loads)."""
from __future__ import annotations

#: options of the fused attention kernel: name -> FusedDecoder keywords (measure.fused_attention says what each does)
KERNEL_OPTIONS = {
    "write_first": {"write_first": True},   # the new token written into its slot before the loop reads the cache
    "l2_hints": {"l2_hints": True},         # K and V evict-first, Keyformer's z evict-last, one z buffer
    "fold_combine": {"fold_combine": True},  # full cache: the last split merges (no combine launch)
    "wave": {"split_rule": "wave"},          # one wave of resident programs per SM instead of ~4 programs per SM
    "fast_log": {"fast_log": True},          # Keyformer's Gumbel noise: both logs on the special-function unit
    "pos32": {"pos32": True},                # Keyformer's token positions int32: half the bytes the loop reads
    "lane_partials": {"lane_partials": True},  # Keyformer's Gumbel max and sum per token lane: no reduction in the loop
    "short_finish": {"finish_chunk": 256},   # Keyformer's finish kernel: one program per 256 slots (no loop)
    "batch1_split": {"split_rule": "rows"},  # fewer rows than SMs (batch 1): ~2 programs per SM, not ~4
}
#: FusedDecoder keywords that change Keyformer's kernels only (the full cache runs the same code with or without)
KEYFORMER_ONLY = ("pos32", "lane_partials", "finish_chunk")
#: option names of KERNEL_OPTIONS that change Keyformer's kernels only
KEYFORMER_ONLY_NAMES = tuple(n for n, kw in KERNEL_OPTIONS.items() if set(kw) <= set(KEYFORMER_ONLY))
#: options of the decoder around it: name -> CompiledDecoder keywords (measure.compiled)
DECODER_OPTIONS = {
    "small_gemm": {"small_gemm": True},      # batch 2-16: the fused products of measure.gemm_small, not cuBLAS
    "fused_rotary": {"fused_rotary": True},  # steps on cuBLAS: q, k, v rotated by the attention kernel, not copied
    "l2_persist": {"l2_persist_mib": 24},     # 24 MiB of L2 set aside for persisting lines (l2_hints' evict-last z)
}
ALL_OPTIONS = {**KERNEL_OPTIONS, **DECODER_OPTIONS}


def decoder_keywords(names) -> dict:
    """FusedDecoder keywords for attention-kernel option `names` (an unknown name raises ValueError naming the
    allowed ones)."""
    out = {}
    for name in names:
        if name not in KERNEL_OPTIONS:
            raise ValueError(f"kernel option {name!r}: expected {', '.join(KERNEL_OPTIONS)}")
        out.update(KERNEL_OPTIONS[name])
    return out


def split_options(names) -> tuple[dict, dict]:
    """(FusedDecoder keywords, CompiledDecoder keywords) for option `names` of either kind (an unknown name raises
    ValueError naming the allowed ones)."""
    if bad := [n for n in names if n not in ALL_OPTIONS]:
        raise ValueError(f"kernel option {bad[0]!r}: expected {', '.join(ALL_OPTIONS)}")
    attention = decoder_keywords([n for n in names if n in KERNEL_OPTIONS])
    decoder = {}
    for n in names:
        decoder.update(DECODER_OPTIONS.get(n, {}))
    return attention, decoder
