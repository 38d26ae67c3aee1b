"""The process's own memory: RAM by psutil, GPU memory by NVML where there is one."""

from __future__ import annotations

import psutil

from ensemble_ops.serving.gpu import GpuMonitor

__all__ = ["ProcessResources"]

_MIB = 2**20


class ProcessResources:
    """Memory figures of this process, in MiB, for ``/health/llm/all``."""

    def __init__(self, gpu: GpuMonitor) -> None:
        self.gpu = gpu
        self._process = psutil.Process()

    @property
    def gpu_available(self) -> bool:
        return self.gpu.available

    def memory_mb(self) -> float:
        return round(self._process.memory_info().rss / _MIB, 2)

    def gpu_memory_mb(self) -> float | None:
        reading = self.gpu.process_memory()
        return round(reading.used_bytes / _MIB, 2) if reading is not None else None
