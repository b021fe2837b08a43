"""The fused attention kernel's opt-in options by name, as `kfsim measure --kernel-options`, bench_fused.sh and
kernel_stats take them (torch-free, so that the CLI can check the names before anything loads)."""
from __future__ import annotations

#: name -> FusedDecoder keywords (measure.fused_attention says what each does)
KERNEL_OPTIONS = {
    "write_first": {"write_first": True},   # the new token written into its slot before the loop reads the cache
    "l2_hints": {"l2_hints": True},         # K and V evict-first, Keyformer's z evict-last, one z buffer
    "fold_combine": {"fold_combine": True},  # full cache: the last split merges (no combine launch)
    "wave": {"split_rule": "wave"},          # one wave of resident programs per SM instead of ~4 programs per SM
    "fast_log": {"fast_log": True},          # Keyformer's Gumbel noise: both logs on the special-function unit
}


def decoder_keywords(names) -> dict:
    """FusedDecoder keywords for option `names` (an unknown name raises ValueError naming the allowed ones)."""
    out = {}
    for name in names:
        if name not in KERNEL_OPTIONS:
            raise ValueError(f"kernel option {name!r}: expected {', '.join(KERNEL_OPTIONS)}")
        out.update(KERNEL_OPTIONS[name])
    return out
