"""Wall time of `kfsim simulate` over 100,000 Poisson requests (H100, Llama-3-8B, 2k + 256 tokens, Keyformer 0.5),
interpreter start and imports included.

Run: python benchmarks/simulate_throughput.py [runs]   (prints median, min and max over the runs)
"""
import sys

from wall_time import time_kfsim

time_kfsim(["simulate", "--gpu", "h100", "--model", "llama-3-8b", "--rate", "8", "--requests", "100000",
            "--prompt-len", "2048", "--gen-len", "256", "--kv-ratio", "0.5", "--json"],
           int(sys.argv[1]) if len(sys.argv) > 1 else 3, "kfsim simulate, 100,000 requests", digits=1)
