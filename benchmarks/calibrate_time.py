"""Wall time of `kfsim calibrate` on the committed H100 plain-decoder campaign, interpreter start included.

Run: python benchmarks/calibrate_time.py [runs]   (prints median, min and max over the runs)
"""
import sys
import tempfile
from pathlib import Path

from wall_time import time_kfsim

data = Path(__file__).resolve().parents[1] / "data" / "h100-sxm-plain"
with tempfile.TemporaryDirectory() as tmp:
    time_kfsim(["calibrate", str(data / "rows.csv"), "--measured-engine", "torch-graph", "--microbench",
                str(data / "microbench.csv"), "--out", str(Path(tmp) / "engine.yaml")],
               int(sys.argv[1]) if len(sys.argv) > 1 else 5,
               "kfsim calibrate data/h100-sxm-plain/rows.csv (83 rows, 16 parameters)", digits=2)
