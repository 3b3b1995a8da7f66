"""Which device a command runs on, and how much memory it used: one resolver for every command.

`resolve_device("auto")` is CUDA when torch sees a GPU, else the CPU; an explicit `cuda[:N]` without a GPU is
a one-line error naming the fix. Under torchrun a bare `cuda` means this process's GPU (LOCAL_RANK).
"""

from __future__ import annotations

import os

import torch

from longctx.errors import ConfigError


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    text = str(spec)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {text} asked for, but torch sees no CUDA device; use --device cpu")
        if device.index is None and "LOCAL_RANK" in os.environ:  # one GPU per torchrun process
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    elif device.type not in ("cpu", "meta"):
        raise ConfigError(f"device {text!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def peak_memory_bytes(device: torch.device) -> int:
    """The peak so far: CUDA's allocated tensor memory, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Reads VmHWM (the peak of the current address space): unlike
    getrusage's ru_maxrss, Linux does not carry it over from the parent across fork + exec, so a measuring
    subprocess started from a big process (pytest, a trainer) reports its own peak only."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB (macOS: bytes)
