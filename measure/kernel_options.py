"""What the compiled engine's kernels do, by the names each choice had when it was measured against the kernel
before it (docs/fused-decoder.md says what each does and what it won). Every compiled row records them in its
`kernel_options` column, so that rows of earlier kernels (a shorter list, or empty: the first kernel) stay told
apart. Torch-free, so that the CLI can name them without loading anything."""
from __future__ import annotations

#: name -> what the compiled engine does (every one is on: the code paths that lost were deleted)
KERNEL_FEATURES = {
    "write_first": "the new token written into its slot before the attention loop reads the cache",
    "l2_hints": "K and V marked to leave L2 first, Keyformer's z to stay; one z buffer for all layers",
    "l2_persist": "24 MiB of L2 set aside for persisting lines (where z stays)",
    "fast_log": "Keyformer's Gumbel noise takes both logs on the special-function unit",
    "pos32": "Keyformer's token positions int32",
    "lane_partials": "Keyformer's Gumbel max and sum per token lane, reduced after the loop",
    "short_finish": "Keyformer's finish kernel as one program per 256 slots",
    "batch1_split": "about 2 attention programs per SM where the rows are fewer than the SMs (batch 1), else 4",
    "small_gemm": "batch 2-16 on fused products (measure/gemm_small.py), not cuBLAS",
    "fused_rotary": "q, k, v handed to the attention kernel as slices of the QKV product, rotated there",
    "alibi": "ALiBi's bias added by the attention kernel (slope x distance), no float mask",
}


def recorded() -> str:
    """The kernel_options cell of a compiled row: the features, sorted, joined by '+'."""
    return "+".join(sorted(KERNEL_FEATURES))
