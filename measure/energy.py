"""Board power from NVML's energy counter, read between two of the counter's own updates.

The counter (`nvmlDeviceGetTotalEnergyConsumption`) advances in steps tens of milliseconds apart, so a window that
starts and ends at arbitrary times is off by up to one step at each end: over half a second that once read 850 W on
a 700 W board. Here the window starts at an update and ends at an update, with the GPU kept busy across both, and
lasts seconds; the error left is the time between finishing a chunk of work and seeing the update (one chunk).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

#: seconds of work a power reading averages over (about 50 counter updates)
WINDOW_S = 2.0
#: seconds of work between two reads of the counter (the resolution of each end of the window)
CHUNK_S = 0.01
#: seconds without a counter update after which NVML is taken not to report energy
GIVE_UP_S = 3.0


@dataclass(frozen=True)
class Power:
    watts: float
    window_s: float  # seconds between the two counter updates the reading spans


def _next_update(counter: Callable[[], float | None], work: Callable[[], None], clock) -> tuple[float, float] | None:
    """Run `work` until the counter changes; (its new value in mJ, the time it was seen), or None if it never does."""
    first = counter()
    if first is None:
        return None
    t0 = clock()
    while clock() - t0 < GIVE_UP_S:
        work()
        value = counter()
        if value is not None and value != first:
            return value, clock()
    return None


def board_power(counter: Callable[[], float | None], work: Callable[[], None], window_s: float = WINDOW_S,
                clock=time.perf_counter) -> Power | None:
    """Mean power (W) while `work` (one chunk of GPU work that returns once finished) runs back to back for at
    least `window_s`, between two updates of the energy counter `counter` (mJ); None where NVML gives no energy."""
    start = _next_update(counter, work, clock)
    if start is None:
        return None
    e0, t0 = start
    while clock() - t0 < window_s:
        work()
    end = _next_update(counter, work, clock)
    if end is None:
        return None
    e1, t1 = end
    return Power((e1 - e0) / 1e3 / (t1 - t0), t1 - t0)


def idle_power(counter: Callable[[], float | None], window_s: float = WINDOW_S, clock=time.perf_counter,
               sleep=time.sleep) -> Power | None:
    """Mean power (W) of the board doing nothing, between two counter updates `window_s` or more apart."""
    return board_power(counter, lambda: sleep(0.001), window_s, clock)
