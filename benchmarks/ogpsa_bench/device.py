"""What the benchmark asks of the machine: synchronisation, peak and current memory, names and versions."""

from __future__ import annotations

import platform
import resource


def sync(device: str) -> None:
    """Wait for queued CUDA work, so a host clock read after it covers the work (no-op on CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def malloc_trim() -> None:
    """Give freed heap back to the OS (glibc), so a run's RSS baseline is not the last run's leftovers."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak(device: str) -> str:
    """Reset the peak-memory counter; returns the method used."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return "torch.cuda.max_memory_allocated (reset per run)"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return "peak RSS: VmHWM from /proc/self/status, reset per run via /proc/self/clear_refs"
    except OSError:
        return "peak RSS: resource.getrusage ru_maxrss (process-lifetime maximum, not reset per run)"


def peak_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    value = _proc_status("VmHWM:")
    if value is not None:
        return value
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.memory_allocated())
    return _proc_status("VmRSS:") or 0


def _proc_status(key: str) -> int | None:
    """A kB line of /proc/self/status in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """The device and the versions a result depends on."""
    import llamafactory
    import torch
    import transformers

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llamafactory": getattr(llamafactory, "__version__", "?"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }
