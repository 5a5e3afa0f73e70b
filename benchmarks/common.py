"""What the benchmarks share (one small module, imported by each of them, importing none of them): device sync, the
peak memory of a run (CUDA allocator or the process's peak RSS, reset before each measurement) and the environment
record written beside every result."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> int:
    """Reset the process's peak RSS (Linux ``clear_refs`` 5) and return the current RSS in bytes.

    Without the reset, a transient peak from importing libraries would hide small measurements."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, TypeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def environment() -> dict:
    import torch

    import embedloss_kernels as ek

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import sentence_transformers

        st_version = sentence_transformers.__version__
    except ImportError:
        st_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, "\
        f"{platform.processor() or platform.machine()})"
    return {"device": device, "torch": torch.__version__, "sentence_transformers": st_version,
            "embedloss_kernels": ek.__version__, "commit": commit, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "backends": ek.available_backends()}
