"""Wall time of `kfsim predict --gpu a100 --seq 4096 --kv-ratio 0.5`, interpreter start and imports included.

Run: python benchmarks/predict_latency.py [runs]   (prints median, min and max over the runs)
"""
import sys

from wall_time import time_kfsim

args = ["predict", "--gpu", "a100", "--seq", "4096", "--kv-ratio", "0.5"]
time_kfsim(args, int(sys.argv[1]) if len(sys.argv) > 1 else 20, " ".join(args), warm=True)
