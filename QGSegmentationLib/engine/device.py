"""Device selection and the out-of-memory translation shared by every training/inference entry."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from ..errors import CudaUnavailableError, OutOfMemoryError

FAULT_ENV = "QGSEG_INJECT_FAULT"  # "oom" -> raise an out-of-memory error at the first step (tests)


def resolve_device(name: str = "auto"):
    """`auto` -> cuda if available else cpu; `cuda` without a GPU raises CudaUnavailableError."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CudaUnavailableError(
                "--device cuda was requested but torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})",
                hint="use --device cpu, or install a CUDA build of torch that matches your driver",
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    from ..errors import ConfigError

    raise ConfigError(f"unknown device '{name}'; choose auto, cuda or cpu")


def autocast_dtype(device, preference: str = "auto"):
    """The dtype of mixed precision on `device`: None on a CPU (the fp32 path); on CUDA bfloat16
    where the GPU supports it (fp32's range: no loss scaling, no fp16 overflow to NaN in deep
    3D networks such as V-Net) and float16 otherwise; `preference` "bf16" / "fp16" forces one."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    if preference == "fp16":
        return torch.float16
    if preference == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device, dtype):
    """Mixed precision of `dtype` on `device`, or nothing when dtype is None (the fp32 path)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(getattr(device, "type", str(device)), dtype=dtype)


def float32_under_float16_autocast():
    """A context that leaves float16 autocast for float32 (and changes nothing otherwise).

    For forwards whose activations can exceed float16's range although the trained network's do
    not: an EMA teacher in eval mode early in training, when its BatchNorm running statistics
    still lag the activations (a V-Net teacher overflowed at step 3, BENCHMARKS.md §5). bfloat16
    has float32's range and is left alone."""
    import torch

    enabled = torch.is_autocast_enabled()  # the CUDA autocast state
    get_dtype = getattr(torch, "get_autocast_dtype", None)
    dtype = get_dtype("cuda") if get_dtype else torch.get_autocast_gpu_dtype()
    if enabled and dtype == torch.float16:
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


def device_description(device) -> str:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU ({torch.get_num_threads()} threads)"


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(exc, OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "defaultcpuallocator" in text)


@contextlib.contextmanager
def translate_oom(where: str) -> Iterator[None]:
    """Turn torch's OOM errors into OutOfMemoryError with advice (exit code 4, kind oom)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised either way
        if isinstance(exc, OutOfMemoryError):
            raise
        if is_oom(exc):
            raise OutOfMemoryError(
                f"out of memory during {where}: {str(exc).splitlines()[0][:200]}",
                hint="use a smaller patch size or batch size, a narrower network, or --device cpu",
            ) from exc
        raise


def maybe_inject_fault(iteration: int) -> None:
    """Test hook: QGSEG_INJECT_FAULT=oom makes the first training step fail like a real OOM."""
    if os.environ.get(FAULT_ENV, "").lower() == "oom" and iteration == 0:
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by QGSEG_INJECT_FAULT)")
