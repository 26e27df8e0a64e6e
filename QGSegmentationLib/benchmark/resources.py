"""What a benchmark records about the machine and a run's resource use.

Peak memory: on CPU the resident set size high-water mark of this process (Linux: `VmHWM`, reset
before each run through `/proc/self/clear_refs` so that it covers that run only; elsewhere
`resource.getrusage(...).ru_maxrss`, which is the process's lifetime peak - the record says which
with `scope`). On CUDA additionally `torch.cuda.max_memory_allocated`, reset per run.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, Optional

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device=None) -> bool:
    """Start a new peak-memory window; returns whether the CPU peak could be reset (Linux)."""
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    try:
        _CLEAR_REFS.write_text("5")  # 5 = reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> Optional[float]:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0   # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ru_maxrss_mb() -> Optional[float]:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0  # bytes vs kB


def peak_memory(device=None, was_reset: bool = False) -> Dict[str, Any]:
    """{"cpu_rss_mb", "scope" ("run" | "process"), "cuda_allocated_mb" (CUDA only)}."""
    hwm = _vm_hwm_mb() if was_reset else None
    out: Dict[str, Any] = {"cpu_rss_mb": round(hwm if hwm is not None else (_ru_maxrss_mb() or float("nan")), 1),
                           "scope": "run" if hwm is not None else "process"}
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        out["cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _memory_total_gb() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def machine_description(device=None) -> Dict[str, Any]:
    """Platform, CPUs, memory, library versions and the compute device, for the report."""
    from ..engine.manifest import package_versions

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info: Dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "usable_cpus": usable, "memory_gb": _memory_total_gb(),
        "versions": package_versions(),
    }
    if device is not None:
        import torch

        from ..engine.device import device_description

        info["device"] = str(device)
        info["device_description"] = device_description(device)
        info["torch_threads"] = torch.get_num_threads()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
