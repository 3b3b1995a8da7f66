"""Which device a command runs on, and how much memory it used: one resolver for every command.

`resolve_device("auto")` is CUDA when torch sees a GPU, else the CPU; an explicit `cuda[:N]` without a GPU is
a one-line error naming the fix. Under torchrun a bare `cuda` means this process's GPU (LOCAL_RANK).
"""

from __future__ import annotations

import functools
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


# -- does this machine run bf16 natively? -------------------------------------------------------------
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # Sapphire Rapids and later (AMX), Zen 4 / Cooper Lake
MIN_BF16_SPEEDUP = 1.3  # the timed check: bf16 matmul must beat fp32 by this much to be chosen


@functools.cache  # a CPU's flags do not change while the process runs: read once (attention asks per call)
def cpu_flags() -> frozenset[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether bf16 runs natively here, why): CUDA by torch's own check; a CPU by its flags, confirmed
    by a one-off timed matmul (bf16 vs fp32, cached per CPU model in $LONGCTX_CACHE/bf16_check.json:
    a VM may report a flag whose instructions are emulated or slow)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    flags = cpu_flags() & set(BF16_CPU_FLAGS)
    if not flags:
        return False, f"{cpu_name()} has no native bf16 ({' / '.join(BF16_CPU_FLAGS)} absent)"
    speedup = _bf16_speedup()
    ok = speedup >= MIN_BF16_SPEEDUP
    return ok, f"{cpu_name()} has {', '.join(sorted(flags))}; bf16 matmul {speedup:.1f}x fp32 measured"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """`native_bf16` for this machine's CPU, asked once per process (`cpu_emulates` reads it on every
    prefill chunk)."""
    return native_bf16(torch.device("cpu"))[0]


def cpu_emulates(dtype: torch.dtype) -> bool:
    """Whether this CPU would run `dtype` arithmetic emulated: bf16/fp16 without native bf16. The inference
    paths that then take fp32 kernels instead ask this (longctx.infer.decode_ops, attention.cpu_flash)."""
    return dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16()


def _bf16_speedup() -> float:
    import json
    import time

    from longctx.data.cache import DEFAULT_CACHE

    key = f"{cpu_name()}|{torch.__version__}|{torch.get_num_threads()}"
    path = DEFAULT_CACHE / "bf16_check.json"
    try:
        cached = json.loads(path.read_text())
        if key in cached:
            return float(cached[key])
    except (OSError, ValueError):
        cached = {}

    def rate(dtype: torch.dtype) -> float:
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b  # warm up (oneDNN picks its kernel on the first call)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.2:
            a @ b
            n += 1
        return n / (time.perf_counter() - t0)

    speedup = float(f"{rate(torch.bfloat16) / rate(torch.float32):.3g}")  # as cached
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**cached, key: speedup}))
        os.replace(tmp, path)
    except OSError:
        pass
    return speedup


def auto_dtype(device: torch.device) -> tuple[str, str]:
    """--dtype auto / --precision auto: ("bf16" or "fp32", why). $LONGCTX_AUTO_PRECISION=fp32|bf16 pins the
    answer (the same numbers on every machine: the test suite sets fp32)."""
    pinned = os.environ.get("LONGCTX_AUTO_PRECISION")
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise ConfigError(f"LONGCTX_AUTO_PRECISION must be fp32 or bf16, got {pinned!r}")
        return pinned, f"pinned by LONGCTX_AUTO_PRECISION={pinned}"
    ok, why = native_bf16(device)
    return ("bf16" if ok else "fp32"), why


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """A training precision as asked (fp32, bf16, auto) -> (fp32 or bf16, why: '' unless auto)."""
    if precision != "auto":
        return precision, ""
    chosen, why = auto_dtype(device)
    return chosen, f"auto: {why}"
