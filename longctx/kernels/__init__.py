"""C kernels for x86-64 CPUs with AVX2/FMA/F16C (and AVX-512 where present), built once with the system C
compiler and loaded with ctypes.

- `decode.c`: the decode step's kernels (wrapped by `longctx.infer.native`);
- `flash_attention.c`: attention forward/backward for training (wrapped by `longctx.attention.cpu_flash`);
- `fused.c`: RMSNorm and SwiGLU forward/backward in one pass each (wrapped by `longctx.kernels.fused`);
- `quant.c`: linear layers on ggml's Q8_0/Q4_0/Q4_1 weight blocks (wrapped by `longctx.infer.quant`);
- `decode_step.c`: a whole decode step of a llama-style model in one call (`longctx.infer.fused_decode`).

Each file's header says why it beats torch's kernel for its shapes, with the measurements. Nothing here is
required: on a CPU without AVX2/FMA/F16C, without a C compiler, off Linux x86-64, or with LONGCTX_NATIVE=0,
`available()` is False (the reason in `unavailable_reason()`) and every caller uses torch instead.
One build per instruction set (`ISAS`, best first): the sources pick their code from the compiler's macros
(`#ifdef __AVX512VNNI__`), so an instruction set is one entry here and an `#ifdef` where it pays; the best
build this CPU runs is loaded, and `LONGCTX_NATIVE_ISA=avx2` pins a lesser one (to compare them; the tests
run every build the machine has against the same float64 references, via `library(name)`).
Each shared object is compiled into `$LONGCTX_CACHE/native/` (default ~/.cache/longctx), keyed by the
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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Isa:
    """One build of the kernels: the /proc/cpuinfo flags it needs and the compiler flags that let gcc use them."""

    name: str
    needs: frozenset[str]
    cflags: tuple[str, ...]


_AVX2 = frozenset({"avx2", "fma", "f16c"})
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
_AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni")
ISAS = (  # best first
    # Zen 4, Cooper Lake, Sapphire Rapids and later: bf16 dot products (vdpbf16ps) as well
    Isa("avx512bf16", _AVX512 | {"avx512_bf16"}, (*_AVX512_FLAGS, "-mavx512bf16")),
    # Ice Lake and later: 512-bit registers and VNNI integer dot products
    Isa("avx512", _AVX512, _AVX512_FLAGS),
    Isa("avx2", _AVX2, ()),
)

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_STRIDES = ctypes.POINTER(ctypes.c_int64)  # (batch, head, row) strides of a (B, H, L, hd) tensor
# the exported functions' argument types, in each C file's order; all return nothing but these, which
# return 0 or 1 (a buffer could not be allocated)
RETURNS_STATUS = (
    "lc_flash_forward",
    "lc_flash_backward",
    "lc_flash_forward_bf16",
    "lc_flash_backward_bf16",
    "lc_softmax_xent",
    "lc_softmax_xent_bf16",
)
# only in the builds whose instruction set has them (`has`)
OPTIONAL = ("lc_flash_forward_bf16", "lc_flash_backward_bf16")
SIGNATURES = {
    "lc_linear": [_P, _P, _P, _P, _I64, _I64, _I64, _INT],
    "lc_decode_attention": [*[_P] * 8, *[_I64] * 7, _INT, _P, _P, _F, _INT],
    "lc_rms_norm_fwd": [_P, _P, _P, _P, _I64, _I64, _F, _INT],
    "lc_rms_norm_fwd_bf16": [_P, _P, _P, _P, _I64, _I64, _F, _INT],
    "lc_rms_norm_bwd": [*[_P] * 6, _I64, _I64, _INT],
    "lc_swiglu_fwd": [_P, _P, _P, _I64, _INT],
    "lc_swiglu_bwd": [*[_P] * 5, _I64, _INT],
    "lc_swiglu_fwd_bf16": [_P, _P, _P, _I64, _INT],
    "lc_swiglu_bwd_bf16": [*[_P] * 5, _I64, _INT],
    "lc_softmax_xent": [_P, _P, _P, _I64, _I64, _INT],
    "lc_softmax_xent_bf16": [_P, _P, _P, _I64, _I64, _INT],
    "lc_rope": [*[_P] * 4, *[_I64] * 5, _STRIDES, _STRIDES, _I64, _INT, _INT],
    "lc_rope_bf16": [*[_P] * 4, *[_I64] * 5, _STRIDES, _STRIDES, _I64, _INT, _INT],
    "lc_linear_q": [_P, _P, _INT, _P, _P, _I64, _I64, _I64, _INT],
    "lc_dequant_q": [_P, _INT, _P, _I64, _I64, _INT],
    "lc_linear_16": [_P, _P, _INT, _P, _P, _I64, _I64, _I64, _INT],
    "lc_decode_layers": [_P, _P, _P, _I64, _P, _P, _I64, _P, _P, _P, _INT],
    "lc_flash_forward": [*[_P] * 5, *[_I64] * 6, *[_STRIDES] * 4, _I64, _INT, _F, _INT],
    "lc_flash_backward": [*[_P] * 9, *[_I64] * 6, *[_STRIDES] * 8, _I64, _INT, _F, _INT],
    "lc_flash_forward_bf16": [*[_P] * 5, *[_I64] * 6, *[_STRIDES] * 4, _I64, _INT, _F, _INT],
    "lc_flash_backward_bf16": [*[_P] * 9, *[_I64] * 6, *[_STRIDES] * 8, _I64, _INT, _F, _INT],
}

_libs: dict[str, ctypes.CDLL | str] = {}  # per build: the loaded library, or why it is unavailable


def _build(cc: str, cflags: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [cc, *cflags, *map(str, SOURCES), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: another process sees the old file, or none, or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def chosen_isa() -> Isa:
    """The build to load: the best this CPU runs, or the one $LONGCTX_NATIVE_ISA names."""
    pinned = os.environ.get("LONGCTX_NATIVE_ISA", "auto")
    if pinned == "auto":
        flags = cpu_flags()
        return next((isa for isa in ISAS if isa.needs <= flags), ISAS[-1])  # the last: its reason says why
    for isa in ISAS:
        if isa.name == pinned:
            return isa
    raise OSError(f"LONGCTX_NATIVE_ISA={pinned!r} is not one of {', '.join(i.name for i in ISAS)}, auto")


def _load(isa: Isa) -> ctypes.CDLL:
    if os.environ.get("LONGCTX_NATIVE", "1") == "0":
        raise OSError("turned off by LONGCTX_NATIVE=0")
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise OSError(f"built for Linux x86-64 only (this is {sys.platform} {platform.machine()})")
    missing = isa.needs - cpu_flags()
    if missing:
        raise OSError(f"the CPU lacks {', '.join(sorted(missing))} (for the {isa.name} kernels)")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler found (set CC, or install gcc)")
    from longctx.data.cache import DEFAULT_CACHE

    cflags = [*CFLAGS, *isa.cflags]
    digest = hashlib.sha256(" ".join([cc, *cflags]).encode())
    for src in SOURCES + HEADERS:
        digest.update(src.read_bytes())
    path = DEFAULT_CACHE / "native" / f"longctx_kernels-{isa.name}-{digest.hexdigest()[:16]}.so"
    if not path.exists():
        _build(cc, cflags, path)
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        if name in OPTIONAL and not hasattr(lib, name):
            continue
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, (ctypes.c_int if name in RETURNS_STATUS else None)
    return lib


def _entry(name: str | None) -> ctypes.CDLL | str:
    if name not in _libs:
        try:
            isa = chosen_isa() if name is None else next(i for i in ISAS if i.name == name)
            _libs[name] = _libs[isa.name] = _libs.get(isa.name) or _load(isa)
        except StopIteration:
            raise ValueError(f"no kernel build named {name!r}") from None
        except OSError as e:
            _libs[name] = str(e)
            log.info("longctx native kernels unavailable (%s); using torch's kernels", e)
    return _libs[name]


def library(isa: str | None = None) -> ctypes.CDLL | None:
    """The loaded kernels of the chosen build, or of the build named (the first call builds them), or
    None: see `unavailable_reason()`."""
    entry = _entry(isa)
    return entry if isinstance(entry, ctypes.CDLL) else None


def available(isa: str | None = None) -> bool:
    return library(isa) is not None


def unavailable_reason(isa: str | None = None) -> str | None:
    entry = _entry(isa)
    return None if isinstance(entry, ctypes.CDLL) else entry


def has(function: str) -> bool:
    """Whether the loaded build has this kernel (the ones in OPTIONAL exist only where their instructions do)."""
    lib = library()
    return lib is not None and hasattr(lib, function)


def describe() -> str:
    """For status lines: which build runs here, or why none does."""
    return f"{chosen_isa().name} build" if available() else f"unavailable ({unavailable_reason()})"
