"""Dependency checks for the Slicer side, without importing torch into the Slicer process.

Versions come from `importlib.metadata`; what torch sees (device, CUDA) is probed in a child
Python so a broken or huge torch never loads into Slicer. Slicer ships numpy, vtk, SimpleITK,
scipy and requests itself: they are never pip-installed or upgraded from the panel.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .runner import no_console_window

TORCH_REQUIREMENT = ">=2.4.1"
# (distribution name, minimum version) of what the worker needs besides torch: the floors of
# pyproject.toml (Testing/test_slicer_jobs.py keeps them equal).
REQUIREMENTS: Tuple[Tuple[str, str], ...] = (
    ("monai", "1.5"),
    ("pyyaml", "6.0"),
    ("tqdm", "4.60"),
    ("matplotlib", "3.7"),
    ("numpy", "1.24"),
    ("scipy", "1.10"),
    ("SimpleITK", "2.3"),
    ("einops", "0.6"),
)
SLICER_PROVIDED = frozenset({"numpy", "vtk", "simpleitk", "scipy", "requests"})

_PROBE = r"""
import json, sys
info = {"python": sys.version.split()[0]}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda_build"] = torch.version.cuda
    info["cuda_available"] = bool(torch.cuda.is_available())
    if info["cuda_available"]:
        info["device_name"] = torch.cuda.get_device_name(0)
        info["device_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as exc:
    info["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(info))
"""


def parse_version(text: str) -> Tuple[int, ...]:
    """Leading numeric release of a version string ("2.5.1+cu121" -> (2, 5, 1))."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text or "")
    if not match:
        return ()
    return tuple(int(p) for p in match.group(1).split("."))


def version_at_least(installed: str, minimum: str) -> bool:
    have, need = parse_version(installed), parse_version(minimum)
    if not have:
        return False
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


@dataclass(frozen=True)
class RequirementStatus:
    name: str
    minimum: str
    installed: Optional[str]

    @property
    def ok(self) -> bool:
        return self.installed is not None and version_at_least(self.installed, self.minimum)

    @property
    def slicer_provided(self) -> bool:
        return self.name.lower() in SLICER_PROVIDED

    def describe(self) -> str:
        have = self.installed or "not installed"
        return f"{self.name} {have} (needs >= {self.minimum}){'' if self.ok else '  <- missing'}"


def installed_version(name: str,
                      lookup: Callable[[str], str] = metadata.version) -> Optional[str]:
    try:
        return lookup(name)
    except metadata.PackageNotFoundError:
        return None


def check_requirements(requirements: Sequence[Tuple[str, str]] = REQUIREMENTS,
                       lookup: Callable[[str], str] = metadata.version) -> List[RequirementStatus]:
    return [RequirementStatus(name, minimum, installed_version(name, lookup))
            for name, minimum in requirements]


def torch_status(lookup: Callable[[str], str] = metadata.version) -> RequirementStatus:
    return RequirementStatus("torch", TORCH_REQUIREMENT.lstrip(">="), installed_version("torch", lookup))


def pip_requirements_to_install(statuses: Sequence[RequirementStatus]) -> List[str]:
    """pip specifiers for the missing packages the panel may install (never Slicer's own)."""
    return [f"{s.name}>={s.minimum}" for s in statuses if not s.ok and not s.slicer_provided]


def slicer_provided_problems(statuses: Sequence[RequirementStatus]) -> List[str]:
    """Packages Slicer itself should provide but that are missing or too old: these need a
    newer Slicer, not pip."""
    return [s.describe() for s in statuses if not s.ok and s.slicer_provided]


@dataclass(frozen=True)
class InstallPlan:
    """What the panel's dependency check installs: torch through the PyTorch extension, the rest
    with pip; `broken` lists packages Slicer itself must provide (those need a newer Slicer)."""

    torch: bool
    pip: Tuple[str, ...] = ()
    broken: Tuple[str, ...] = ()

    @property
    def nothing_to_install(self) -> bool:
        return not self.torch and not self.pip

    def listing(self) -> List[str]:
        """One line per install, for the confirmation."""
        return ([f"PyTorch {TORCH_REQUIREMENT}"] if self.torch else []) + list(self.pip)


def install_plan(statuses: Sequence[RequirementStatus], torch: RequirementStatus,
                 force: bool = False) -> InstallPlan:
    """torch when it is missing or older than TORCH_REQUIREMENT, judged from its installed
    metadata (importing torch into Slicer to ask would load a possibly huge or broken library into
    the GUI process, and "importable" says nothing of a too-old version); the missing or too-old
    pip packages, or with `force` (Reinstall dependencies) all of them. Slicer's own packages never."""
    pip = ([f"{s.name}>={s.minimum}" for s in statuses if not s.slicer_provided] if force
           else pip_requirements_to_install(statuses))
    return InstallPlan(torch=not torch.ok, pip=tuple(pip), broken=tuple(slicer_provided_problems(statuses)))


@dataclass
class DeviceInfo:
    python: str = ""
    torch: Optional[str] = None
    cuda_build: Optional[str] = None
    cuda_available: bool = False
    device_name: Optional[str] = None
    device_memory_gb: Optional[float] = None
    error: Optional[str] = None

    @property
    def summary(self) -> str:
        if self.error:
            return f"torch unavailable ({self.error})"
        if self.torch is None:
            return "torch not probed"
        if self.cuda_available:
            return (f"GPU: {self.device_name} ({self.device_memory_gb} GB), torch {self.torch}, "
                    f"CUDA {self.cuda_build}")
        build = f"CUDA build {self.cuda_build}" if self.cuda_build else "CPU-only build"
        return f"CPU (no CUDA device visible), torch {self.torch}, {build}"


def probe_torch(python_executable: str = sys.executable, timeout_s: float = 120.0) -> DeviceInfo:
    """Import torch in a child Python and report version, CUDA build and device.
    Blocking (seconds): call it from a button or at first use, never from a timer tick."""
    try:
        proc = subprocess.run([python_executable, "-c", _PROBE], capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL, **no_console_window())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return DeviceInfo(error=f"probe failed: {exc}")
    lines = [l for l in proc.stdout.splitlines() if l.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return DeviceInfo(error=f"probe exited {proc.returncode}: {tail[0]}")
    data = json.loads(lines[-1])
    known = {k: v for k, v in data.items() if k in DeviceInfo.__dataclass_fields__}
    return DeviceInfo(**known)


def diagnostics_text(statuses: Sequence[RequirementStatus], device: Optional[DeviceInfo],
                     extra: Optional[Dict[str, str]] = None) -> str:
    """Plain text for the "Copy diagnostics" button (paste into a bug report)."""
    lines = ["QGSegmentation diagnostics",
             f"platform: {platform.platform()}",
             f"python: {sys.version.split()[0]} ({sys.executable})"]
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {value}")
    lines.append("packages:")
    lines += [f"  {s.describe()}" for s in statuses]
    if device is not None:
        lines.append(f"device: {device.summary}")
        lines.append("torch probe: " + json.dumps(asdict(device)))
    return "\n".join(lines) + "\n"
