"""Wall time of `kfsim calibrate` on the committed H100 plain-decoder campaign, interpreter start included.

Run: python benchmarks/calibrate_time.py [runs]   (prints median, min and max over the runs)
"""
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
data = Path(__file__).resolve().parents[1] / "data" / "h100-sxm-plain"
with tempfile.TemporaryDirectory() as tmp:
    cmd = [shutil.which("kfsim") or "kfsim", "calibrate", str(data / "rows.csv"), "--measured-engine", "torch-graph",
           "--microbench", str(data / "microbench.csv"), "--out", str(Path(tmp) / "engine.yaml")]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
print(f"kfsim calibrate data/h100-sxm-plain/rows.csv (83 rows, 16 parameters): median {statistics.median(times):.2f} s, "
      f"min {min(times):.2f} s, max {max(times):.2f} s over {runs} runs")
