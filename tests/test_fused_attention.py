"""The fused Triton kernels against the plain torch path: same attention output, scores and evictions.

On a CUDA GPU the compiled kernels run; without one, Triton's interpreter runs them on the CPU (slow, small sizes).
"""
import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernels are defined
pytest.importorskip("triton")

from measure.fused_attention import FusedFullCache, FusedKeyformerCache  # noqa: E402
from measure.kv_policies import EvictingCache, FullCache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cases():
    # (batch, kv heads, query heads per KV head, head dim, budget, split tokens)
    small = [(2, 2, 1, 16, 40, 16), (1, 2, 4, 32, 70, 32)]
    big = [(2, 16, 1, 256, 1000, 256), (4, 8, 4, 128, 3000, 512), (1, 8, 4, 128, 8192, 512)]
    return small + (big if DEVICE == "cuda" else [])


@pytest.mark.parametrize("B, HKV, G, D, budget, split", cases())
def test_keyformer_step_matches_plain(B, HKV, G, D, budget, split):
    torch.manual_seed(0)
    dtype = torch.float32
    plain = EvictingCache("keyformer", B, HKV, budget, max(1, budget // 4), D, dtype, DEVICE, tau_delta=0.05)
    plain.fill_random(budget * 2)
    plain.score.uniform_()
    twin = EvictingCache("keyformer", B, HKV, budget, max(1, budget // 4), D, dtype, DEVICE, tau_delta=0.05)
    for name in ("k", "v", "pos", "score", "free", "step"):
        getattr(twin, name).copy_(getattr(plain, name))
    fused = FusedKeyformerCache(twin, split_tokens=split)
    S = plain.slots
    t = budget * 2
    for _ in range(3):
        q = torch.randn(B, HKV * G, 1, D, device=DEVICE, dtype=dtype)
        k, v = torch.randn(B, HKV, 1, D, device=DEVICE, dtype=dtype), torch.randn(B, HKV, 1, D, device=DEVICE,
                                                                                  dtype=dtype)
        noise = -torch.log(-torch.log(torch.rand(B, HKV, G, S, device=DEVICE).clamp(1e-10, 1 - 1e-7)))
        plain.noise = lambda like, n=noise: n
        fused.noise_tensor = noise.contiguous().view(-1)
        a = plain.decode(q, k, v, t)
        b = fused.decode(q, k, v, t)
        fused.sync()
        assert torch.allclose(a, b, atol=2e-4, rtol=2e-4)
        assert torch.allclose(plain.score, twin.score, atol=1e-4, rtol=1e-4)
        assert torch.equal(plain.free, twin.free)
        assert torch.equal(plain.pos, twin.pos)
        assert torch.equal(plain.k, twin.k) and torch.equal(plain.v, twin.v)
        assert float(plain.step) == float(twin.step)
        t += 1


@pytest.mark.parametrize("B, HKV, G, D, budget, split", cases())
def test_full_cache_matches_sdpa(B, HKV, G, D, budget, split):
    torch.manual_seed(1)
    dtype = torch.float32
    plain = FullCache(B, HKV, budget + 1, D, dtype, DEVICE)
    plain.fill_random(budget)
    twin = FullCache(B, HKV, budget + 1, D, dtype, DEVICE)
    twin.k.copy_(plain.k), twin.v.copy_(plain.v)
    twin.length, twin.steady = plain.length, True
    fused = FusedFullCache(twin, split_tokens=split)
    q = torch.randn(B, HKV * G, 1, D, device=DEVICE, dtype=dtype)
    k, v = torch.randn(B, HKV, 1, D, device=DEVICE, dtype=dtype), torch.randn(B, HKV, 1, D, device=DEVICE,
                                                                              dtype=dtype)
    assert torch.allclose(plain.decode(q, k, v, budget), fused.decode(q, k, v, budget), atol=2e-4, rtol=2e-4)
