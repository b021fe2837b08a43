"""Wall time of one kfsim command over repeated runs, interpreter start and imports included (the benchmarks'
shared timer)."""
import shutil
import statistics
import subprocess
import time


def time_kfsim(args: list[str], runs: int, label: str, digits: int = 3, warm: bool = False) -> None:
    """Run `kfsim ARGS` `runs` times (after one untimed run if `warm`) and print median, min and max seconds."""
    cmd = [shutil.which("kfsim") or "kfsim", *args]
    if warm:  # the file cache, once
        subprocess.run(cmd, check=True, capture_output=True)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    print(f"{label}: median {statistics.median(times):.{digits}f} s, min {min(times):.{digits}f} s, "
          f"max {max(times):.{digits}f} s over {runs} runs")
