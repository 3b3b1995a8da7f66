"""The decode-step kernels of `decode_kernels.c`: built once with the system C compiler, loaded with ctypes.

Why native code: a decode step streams every weight and the whole KV cache once per token, and torch's CPU
kernels for these shapes (one row against a matrix; one query against a long cache) read memory at about
half the machine's bandwidth (the numbers are in the C file's header). Two plain loops at bandwidth make
decoding up to ~1.5x faster, and let a 16-bit cache be read without an fp32 copy.

Nothing here is required: on a CPU without AVX2/FMA/F16C, without a C compiler, off Linux x86-64, or with
LONGCTX_NATIVE=0, `available()` is False (with the reason in `unavailable_reason()`) and callers use torch.
The shared object is compiled into `$LONGCTX_CACHE/native/` (default ~/.cache/longctx), keyed by the
source's hash and the flags, written atomically, so a change of the source rebuilds it and concurrent
processes never load a half-written file. Building takes about a second.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_kernels.c")
CFLAGS = ["-O3", "-std=gnu11", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared"]
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the C file's KV_F32, KV_F16, KV_BF16
MAX_ROWS = 16  # rows of x per lc_linear call; larger products (prefill chunks) are GEMMs: MKL's job

_lib: ctypes.CDLL | None = None
_reason: str | None = None  # why the kernels are unavailable, once tried


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: another process sees the old file, or none, or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    if os.environ.get("LONGCTX_NATIVE", "1") == "0":
        raise OSError("turned off by LONGCTX_NATIVE=0")
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise OSError(f"built for Linux x86-64 only (this is {sys.platform} {platform.machine()})")
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        raise OSError(f"the CPU lacks {', '.join(sorted(missing))}")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler found (set CC, or install gcc)")
    from longctx.data.cache import DEFAULT_CACHE

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *CFLAGS]).encode()).hexdigest()[:16]
    path = DEFAULT_CACHE / "native" / f"decode_kernels-{key}.so"
    if not path.exists():
        _build(cc, path)
    lib = ctypes.CDLL(str(path))
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    lib.lc_linear.argtypes = [P, P, P, P, I64, I64, I64, ctypes.c_int]
    lib.lc_linear.restype = None
    lib.lc_decode_attention.argtypes = [
        *[P] * 5,
        *[I64] * 7,
        ctypes.c_int,
        P,
        P,
        ctypes.c_float,
        ctypes.c_int,
    ]
    lib.lc_decode_attention.restype = None
    lib.lc_rms_norm.argtypes = [P, P, P, I64, I64, ctypes.c_float]
    lib.lc_rms_norm.restype = None
    return lib


def available() -> bool:
    """True when the kernels are built and loaded (the first call builds them)."""
    global _lib, _reason
    if _lib is None and _reason is None:
        try:
            _lib = _load()
        except OSError as e:
            _reason = str(e)
            log.info("longctx native decode kernels unavailable (%s); using torch's kernels", e)
    return _lib is not None


def unavailable_reason() -> str | None:
    available()
    return _reason


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear` takes this call: a few fp32 rows on CPU, no autograd, plain contiguous tensors."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and weight.is_contiguous()
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias -> (..., N). The caller checks `linear_ok` first."""
    x = x.contiguous()
    N, K = weight.shape
    M = x.numel() // K
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    _lib.lc_linear(
        x.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), M, N, K, torch.get_num_threads()
    )
    return y


def rms_norm_ok(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether `rms_norm` takes this call: a few fp32 rows on CPU, no autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and (weight is None or (weight.dtype == torch.float32 and weight.shape == x.shape[-1:]))
        and not (
            torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
        )
        and available()
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x (..., D) / rms * weight -> (..., D). The caller checks `rms_norm_ok` first."""
    x = x.contiguous()
    y = torch.empty_like(x)
    w = None if weight is None else weight.contiguous()
    _lib.lc_rms_norm(x.data_ptr(), _ptr(w), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return y


def attention_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention` takes this call: one fp32 query per head on CPU; keys and values fp32,
    fp16 or bf16 in the cache's layout (rows of hd contiguous values, same strides for k and v)."""
    B, H, Tq, hd = q.shape
    return (
        Tq == 1
        and q.device.type == k.device.type == "cpu"
        and q.dtype == torch.float32
        and k.dtype == v.dtype
        and k.dtype in KINDS
        and hd % 8 == 0
        and k.shape == v.shape
        and k.shape[0] == B
        and k.shape[-1] == hd
        and H % k.shape[1] == 0
        and k.stride() == v.stride()
        and k.stride(-1) == 1
        and k.stride(-2) == hd
        and not (torch.is_grad_enabled() and q.requires_grad)
        and available()
    )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    starts: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, H, 1, hd) over k/v (B, K, S, hd) -> (B, H, 1, hd). The query sits after the last key (a decode
    step: every key is visible). starts (B,): the first visible key of each row (leading padding);
    alibi_slopes (H,): ALiBi bias -slope * distance. The caller checks `attention_ok` first."""
    B, H, _, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = q.contiguous()
    out = torch.empty_like(q)
    work = torch.empty(B * H * S, dtype=torch.float32)
    if starts is not None:
        starts = starts.to(torch.int64).contiguous()
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(torch.float32).contiguous()
    _lib.lc_decode_attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        work.data_ptr(),
        B,
        Hkv,
        H // Hkv,
        S,
        hd,
        k.stride(0),
        k.stride(1),
        KINDS[k.dtype],
        _ptr(starts),
        _ptr(alibi_slopes),
        hd**-0.5 if scale is None else scale,
        torch.get_num_threads(),
    )
    return out
