"""Where models run: device choice, memory caps and peaks, freeing memory, recognising out-of-memory errors.

One home for what every stage asks of the accelerator, so training, merging, answering, pre-flight and the
benchmarks choose and measure devices the same way.
"""

from __future__ import annotations

import gc
import os
import resource
from pathlib import Path
from typing import Any

GIB = 1024**3


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_slots(env: dict[str, str] | None = None, proc: Path = Path("/proc/driver/nvidia/gpus")) -> int:
    """How many runs may train at once on this machine: $QABOT_GPU_SLOTS when set, else one per NVIDIA GPU
    this process may use (CUDA_VISIBLE_DEVICES, else the driver's /proc/driver/nvidia/gpus), and one on a
    machine without a GPU. Cheap: no torch, no CUDA context."""
    env = os.environ if env is None else env
    raw = env.get("QABOT_GPU_SLOTS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"QABOT_GPU_SLOTS={raw!r}: expected a whole number of at least 1")
        return int(raw)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # CUDA stops at the first invalid entry, as here
        n = 0
        for item in visible.split(","):
            if not item.strip() or item.strip().startswith("-"):
                break
            n += 1
        return max(1, n)
    try:
        return max(1, sum(1 for _ in proc.iterdir()))
    except OSError:
        return 1


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a CUDA GPU is visible, else 'cpu'; 'cuda' without a GPU is an error."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise RuntimeError("device is 'cuda' but no CUDA GPU is visible (set device: cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def device_map(device: str) -> dict[str, Any]:
    """`device_map` for `from_pretrained`: the whole model on one device."""
    if device == "cuda":
        import torch

        return {"": torch.cuda.current_device()}
    return {"": device}


def torch_device(device: str):
    import torch

    return torch.device(f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device)


def total_memory_gib(device: str) -> float | None:
    """The GPU's memory (GiB); None on the CPU."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory / GIB


def cap_memory(device: str, budget_gib: float | None) -> None:
    """Limit this process to `budget_gib` of the GPU (an 8 GiB card on a larger one); no-op on the CPU."""
    if device != "cuda" or not budget_gib:
        return
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total))


def reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device: str) -> int:
    """GPU: peak allocated by torch since the last reset; CPU: the process's resident high-water mark."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_memory_kind(device: str) -> str:
    return "cuda_allocated" if device == "cuda" else "process_rss"


def free_memory(device: str) -> None:
    """Collect garbage and, on a GPU, return cached blocks and restart the peak count."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error, also when a kernel reports it as a plain RuntimeError."""
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def bf16_supported(device: str) -> bool:
    if device == "cpu":
        return True
    import torch

    return bool(torch.cuda.is_bf16_supported())
