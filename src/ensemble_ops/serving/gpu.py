"""GPU memory through NVML (nvidia-ml-py), optional.

Without the package or an NVIDIA driver every figure is None and ``available`` is False: the
service runs the same on CPU. Install the ``gpu`` extra to get the figures.

In a container without the host's PID namespace NVML lists host PIDs, so this process's
own PID is not among them. Then the per-process figure falls back to the memory used on the
devices as a whole (``source == "device"``): an upper bound that is exact when, as usual, one
server owns the GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["GpuMonitor", "GpuReading"]


@dataclass(frozen=True)
class GpuReading:
    used_bytes: int
    source: Literal["process", "device"]


class GpuMonitor:
    """Reads GPU memory use; ``available`` says whether NVML and a device are there."""

    def __init__(self, nvml: Any = None) -> None:
        """``nvml`` is the pynvml module (imported when not given; tests pass their own)."""
        self._handles: list[Any] = []
        if nvml is None:
            try:
                import pynvml
            except ImportError:
                return
            nvml = pynvml
        self._nvml: Any = nvml
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU here
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def process_memory(self, pid: int | None = None) -> GpuReading | None:
        """GPU memory used by this process (or the devices, when its PID is not visible)."""
        if not self._handles:
            return None
        pid = os.getpid() if pid is None else pid
        nvml = self._nvml
        try:
            own = 0
            seen = False
            device_used = 0
            for handle in self._handles:
                for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if process.pid == pid:
                        seen = True
                        own += process.usedGpuMemory or 0
                device_used += nvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:
            return None
        if seen:
            return GpuReading(own, "process")
        return GpuReading(device_used, "device")

    def free_memory(self) -> int | None:
        """Free memory on the device with the most of it (None without NVML)."""
        if not self._handles:
            return None
        try:
            return max(int(self._nvml.nvmlDeviceGetMemoryInfo(h).free) for h in self._handles)
        except Exception:
            return None

    def close(self) -> None:
        if self._handles:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._handles = []
