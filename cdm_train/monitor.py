"""GPU monitoring for the training log: utilisation, memory and power per log interval (NVML).

Uses nvidia-ml-py (``pip install cdm-kernels[monitor]``, module ``pynvml``). No library, no
NVML driver, or a CPU run: the monitor is silently off and ``read()`` returns ``{}``.

No background thread: NVML keeps a buffer of utilisation samples (about 6 per second), and
``nvmlDeviceGetSamples(..., last_seen_timestamp)`` returns those since the previous read,
so the mean and the minimum over the interval show idle gaps that one instantaneous reading
would miss. Power is the energy counter's difference over the interval (average watts), with
the instantaneous draw as fallback on GPUs without the counter.

Fields added to each log record:
    gpu_util_pct      mean GPU utilisation over the interval (percent of time a kernel ran)
    gpu_util_min_pct  its minimum sample (idle gaps show up here)
    gpu_mem_used_gib  device memory in use (all processes), at the read
    gpu_power_w       average board power over the interval
    torch_peak_gib    this process's peak allocated memory so far (peak stats are never reset here)
"""

from __future__ import annotations

import time
from typing import Any

import torch


class GpuMonitor:
    def __init__(self, device: torch.device | str | None):
        self.enabled = False
        self._nvml = None
        self._handle = None
        self._device = None
        self._last_ts = 0
        self._last_energy = None
        self._last_t = None
        try:
            device = torch.device(device) if device is not None else None
            if device is None or device.type != "cuda" or not torch.cuda.is_available():
                return
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._device = device
            self._handle = self._find_handle(device)
            self.enabled = self._handle is not None
            if self.enabled:
                self.read()  # start the first interval now
        except Exception:  # noqa: BLE001 - monitoring must never break training
            self.enabled = False

    def _find_handle(self, device: torch.device):
        nv = self._nvml
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:  # NVML numbers every GPU; CUDA_VISIBLE_DEVICES renumbers: match by UUID when torch knows it
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                u = nv.nvmlDeviceGetUUID(h)
                u = u.decode() if isinstance(u, bytes) else u
                if u.replace("GPU-", "") == uuid.replace("GPU-", ""):
                    return h
        except Exception:  # noqa: BLE001
            pass
        try:
            return nv.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # noqa: BLE001
            return None

    def read(self) -> dict[str, Any]:
        """The figures since the previous read ({} when off). Never raises."""
        if not self.enabled:
            return {}
        nv, h = self._nvml, self._handle
        out: dict[str, Any] = {}
        try:
            try:
                _, samples = nv.nvmlDeviceGetSamples(h, nv.NVML_GPU_UTILIZATION_SAMPLES, self._last_ts)
                values = [s.sampleValue.uiVal for s in samples if s.timeStamp > self._last_ts]
                if samples:
                    self._last_ts = max(s.timeStamp for s in samples)
            except Exception:  # noqa: BLE001 - no sample buffer yet (first call) or unsupported
                values = []
            if values:
                out["gpu_util_pct"] = sum(values) / len(values)
                out["gpu_util_min_pct"] = min(values)
            else:
                out["gpu_util_pct"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            out["gpu_mem_used_gib"] = nv.nvmlDeviceGetMemoryInfo(h).used / 2**30
            now = time.perf_counter()
            try:
                energy = nv.nvmlDeviceGetTotalEnergyConsumption(h)  # mJ
            except Exception:  # noqa: BLE001
                energy = None
            if energy is not None and self._last_energy is not None and now > self._last_t:
                out["gpu_power_w"] = (energy - self._last_energy) / 1e3 / (now - self._last_t)
            else:
                out["gpu_power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1e3
            self._last_energy, self._last_t = energy, now
            out["torch_peak_gib"] = torch.cuda.max_memory_allocated(self._device) / 2**30
        except Exception:  # noqa: BLE001
            return out
        return out

    def close(self) -> None:
        if self.enabled:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
        self.enabled = False
