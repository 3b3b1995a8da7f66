"""C kernels for x86-64 CPUs with AVX2/FMA/F16C, built once with the system C compiler and loaded with ctypes.

- `decode.c`: the decode step's kernels (wrapped by `longctx.infer.native`);
- `flash_attention.c`: attention forward/backward for training (wrapped by `longctx.attention.cpu_flash`);
- `fused.c`: RMSNorm and SwiGLU forward/backward in one pass each (wrapped by `longctx.kernels.fused`);
- `quant.c`: linear layers on ggml's Q8_0/Q4_0/Q4_1 weight blocks (wrapped by `longctx.infer.quant`);
- `decode_step.c`: a whole decode step of a llama-style model in one call (`longctx.infer.fused_decode`).

Each file's header says why it beats torch's kernel for its shapes, with the measurements. Nothing here is
required: on a CPU without AVX2/FMA/F16C, without a C compiler, off Linux x86-64, or with LONGCTX_NATIVE=0,
`available()` is False (the reason in `unavailable_reason()`) and every caller uses torch instead.
The shared object is compiled into `$LONGCTX_CACHE/native/` (default ~/.cache/longctx), keyed by the
sources' hash and the flags, written atomically, so a change of a source rebuilds it and concurrent
processes never load a half-written file. Building takes a second or two.

No -ffast-math: gcc 12 links crtfastmath.o into shared objects, which would turn on flush-to-zero for the
whole process; exp is a polynomial (simd.h). Threads are OpenMP, i.e. torch's own libgomp pool.
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

from longctx.device import cpu_flags

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [
    HERE / "decode.c",
    HERE / "flash_attention.c",
    HERE / "fused.c",
    HERE / "quant.c",
    HERE / "decode_step.c",
]
HEADERS = [HERE / "simd.h"]
CFLAGS = ["-O3", "-std=gnu11", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared"]

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_STRIDES = ctypes.POINTER(ctypes.c_int64)  # (batch, head, row) strides of a (B, H, L, hd) tensor
# the exported functions' argument types, in each C file's order; all return nothing but these, which
# return 0 or 1 (a buffer could not be allocated)
RETURNS_STATUS = ("lc_flash_forward", "lc_flash_backward")
SIGNATURES = {
    "lc_linear": [_P, _P, _P, _P, _I64, _I64, _I64, _INT],
    "lc_decode_attention": [*[_P] * 5, *[_I64] * 7, _INT, _P, _P, _F, _INT],
    "lc_rms_norm_fwd": [_P, _P, _P, _P, _I64, _I64, _F, _INT],
    "lc_rms_norm_bwd": [*[_P] * 6, _I64, _I64, _INT],
    "lc_swiglu_fwd": [_P, _P, _P, _I64, _INT],
    "lc_swiglu_bwd": [*[_P] * 5, _I64, _INT],
    "lc_linear_q": [_P, _P, _INT, _P, _P, _I64, _I64, _I64, _INT],
    "lc_dequant_q": [_P, _INT, _P, _I64, _I64, _INT],
    "lc_linear_16": [_P, _P, _INT, _P, _P, _I64, _I64, _I64, _INT],
    "lc_decode_layers": [_P, _P, _P, _I64, _P, _P, _I64, _P, _P, _INT],
    "lc_flash_forward": [*[_P] * 5, *[_I64] * 6, *[_STRIDES] * 4, _I64, _INT, _F, _INT],
    "lc_flash_backward": [*[_P] * 9, *[_I64] * 6, *[_STRIDES] * 8, _I64, _INT, _F, _INT],
}

_lib: ctypes.CDLL | None = None
_reason: str | None = None  # why the kernels are unavailable, once tried


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [cc, *CFLAGS, *map(str, SOURCES), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
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
    missing = {"avx2", "fma", "f16c"} - cpu_flags()
    if missing:
        raise OSError(f"the CPU lacks {', '.join(sorted(missing))}")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler found (set CC, or install gcc)")
    from longctx.data.cache import DEFAULT_CACHE

    digest = hashlib.sha256(" ".join([cc, *CFLAGS]).encode())
    for src in SOURCES + HEADERS:
        digest.update(src.read_bytes())
    path = DEFAULT_CACHE / "native" / f"longctx_kernels-{digest.hexdigest()[:16]}.so"
    if not path.exists():
        _build(cc, path)
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, (ctypes.c_int if name in RETURNS_STATUS else None)
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels (the first call builds them), or None: see `unavailable_reason()`."""
    global _lib, _reason
    if _lib is None and _reason is None:
        try:
            _lib = _load()
        except OSError as e:
            _reason = str(e)
            log.info("longctx native kernels unavailable (%s); using torch's kernels", e)
    return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    library()
    return _reason
