"""GPU state from NVML (pynvml, package nvidia-ml-py): energy counter, power, clocks, temperature, throttling.

Every call degrades to None when NVML is missing or a query is unsupported, so a measurement never fails on it.
"""
from __future__ import annotations

from contextlib import suppress

try:
    import pynvml
except ImportError:  # pragma: no cover - measure extra not installed
    pynvml = None


class Nvml:
    def __init__(self, index: int = 0):
        self.handle = None
        if pynvml is None:
            return
        with suppress(Exception):
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def _q(self, fn, *args):
        if self.handle is None:
            return None
        with suppress(Exception):
            return fn(self.handle, *args)
        return None

    def energy_mj(self):
        """Total energy since the driver loaded, millijoules (Volta and newer)."""
        return self._q(pynvml.nvmlDeviceGetTotalEnergyConsumption) if pynvml else None

    def power_limit_w(self):
        """The board power limit the driver enforces, W."""
        mw = self._q(pynvml.nvmlDeviceGetEnforcedPowerLimit) if pynvml else None
        return mw / 1000 if mw is not None else None

    def state(self) -> dict:
        """A snapshot: power, clocks, temperature, memory used, throttle reasons."""
        if self.handle is None:
            return {}
        p = pynvml
        power = self._q(p.nvmlDeviceGetPowerUsage)
        mem = self._q(p.nvmlDeviceGetMemoryInfo)
        return {
            "power_w": power / 1000 if power is not None else None,
            "sm_mhz": self._q(p.nvmlDeviceGetClockInfo, p.NVML_CLOCK_SM),
            "mem_mhz": self._q(p.nvmlDeviceGetClockInfo, p.NVML_CLOCK_MEM),
            "temp_c": self._q(p.nvmlDeviceGetTemperature, p.NVML_TEMPERATURE_GPU),
            "mem_used_gb": mem.used / 1e9 if mem is not None else None,
            "throttle": self._q(p.nvmlDeviceGetCurrentClocksEventReasons)
            if hasattr(p, "nvmlDeviceGetCurrentClocksEventReasons")
            else self._q(p.nvmlDeviceGetCurrentClocksThrottleReasons),
        }

    def driver(self):
        v = self._q(lambda h: pynvml.nvmlSystemGetDriverVersion()) if pynvml else None
        return v.decode() if isinstance(v, bytes) else v
