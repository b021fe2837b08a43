"""Wall time of `kfsim simulate` over 100,000 Poisson requests (H100, Llama-3-8B, 2k + 256 tokens, Keyformer 0.5),
interpreter start and imports included.

Run: python benchmarks/simulate_throughput.py [runs]   (prints median, min and max over the runs)
"""
import shutil
import statistics
import subprocess
import sys
import time

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
cmd = [shutil.which("kfsim") or "kfsim", "simulate", "--gpu", "h100", "--model", "llama-3-8b", "--rate", "8",
       "--requests", "100000", "--prompt-len", "2048", "--gen-len", "256", "--kv-ratio", "0.5", "--json"]
times = []
for _ in range(runs):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    times.append(time.perf_counter() - t0)
print(f"kfsim simulate, 100,000 requests: median {statistics.median(times):.1f} s, min {min(times):.1f} s, "
      f"max {max(times):.1f} s over {runs} runs")
