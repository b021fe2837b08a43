"""Wall time of `kfsim predict --gpu a100 --seq 4096 --kv-ratio 0.5`, interpreter start and imports included.

Run: python benchmarks/predict_latency.py [runs]   (prints median, min and max over the runs)
"""
import shutil
import statistics
import subprocess
import sys
import time

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
cmd = [shutil.which("kfsim") or "kfsim", "predict", "--gpu", "a100", "--seq", "4096", "--kv-ratio", "0.5"]
subprocess.run(cmd, check=True, capture_output=True)  # warm the file cache once
times = []
for _ in range(runs):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    times.append(time.perf_counter() - t0)
print(f"{' '.join(cmd[1:])}: median {statistics.median(times):.3f} s, min {min(times):.3f} s, "
      f"max {max(times):.3f} s over {runs} runs")
