"""Points per second of `kfsim.sweep.sweep` (in-process, no file writing): 5 GPUs x 2 models x 100 batches x 100
contexts = 100,000 points. Run: python benchmarks/sweep_throughput.py [repeats]"""
import statistics
import sys
import time

from kfsim.sweep import sweep

repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
args = dict(gpus=["a100", "h100", "h200", "l40s", "b200"], models=["llama-3-8b", "gpt-j-6b"],
            batches=range(1, 101), seqs=range(256, 25601, 256), kv_ratios=[1.0])
sweep(**args)  # warm caches (profiles, imports)
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    n = len(sweep(**args))
    times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(f"{n:,} points: median {med:.3f} s over {repeats} runs ({n / med:,.0f} points/s, one core)")
