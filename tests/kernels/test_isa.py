"""Every build of the native kernels this CPU runs (`longctx.kernels.ISAS`: AVX-512 with BF16 and VNNI,
with VNNI, AVX2)
against the same float64 references; a build the CPU lacks is skipped with the reason. The matrix-vector
kernels that have their own AVX-512 code are called directly in each build; the other kernel tests are run
once more in a child process pinned to each lesser build (LONGCTX_NATIVE_ISA)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longctx import kernels
from longctx.infer import quant

NAMES = [isa.name for isa in kernels.ISAS]


def _lib(name: str):
    lib = kernels.library(name)
    if lib is None:
        pytest.skip(f"the {name} kernels cannot run here: {kernels.unavailable_reason(name)}")
    return lib


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# K: 16- or 32-wide steps, an 8-wide tail, 8-wide only, a scalar tail, and all three
@pytest.mark.parametrize("M,N,K", [(1, 37, 96), (3, 9, 1000), (2, 16, 8), (2, 5, 27), (4, 7, 75)])
def test_16_bit_linear_matches_float64(name, dtype, M, N, K):
    g = torch.Generator().manual_seed(N + K)
    x, w, b = (
        torch.randn(M, K, generator=g),
        torch.randn(N, K, generator=g).to(dtype),
        torch.randn(N, generator=g),
    )
    y = torch.empty(M, N)
    _lib(name).lc_linear_16(
        x.data_ptr(), w.data_ptr(), int(dtype == torch.bfloat16), b.data_ptr(), y.data_ptr(), M, N, K, 2
    )
    want = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5 * K**0.5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("M", [1, 5])
def test_quantized_linear_matches_float64(name, qtype, M):
    g = torch.Generator().manual_seed(M)
    N, K = 37, 160  # N not a multiple of the kernel's 8 rows
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)
    blocks = quant.quantize_blocks(w, qtype)
    packed, kind = quant.pack_x8(blocks, qtype), quant.KINDS[qtype]
    x, y = torch.randn(M, K, generator=g), torch.empty(M, N)
    _lib(name).lc_linear_q(x.data_ptr(), packed.data_ptr(), kind, None, y.data_ptr(), M, N, K, 2)
    out = torch.empty(N, K)  # and the packed layout dequantizes to the very same weights
    _lib(name).lc_dequant_q(packed.data_ptr(), kind, out.data_ptr(), N, K, 2)
    assert torch.equal(out, quant.dequantize(blocks, qtype, K))
    # x rounded to int16 per block of 32 (scale = block max / 32767), as the kernel does in every build
    xb = x.reshape(M, -1, 32)
    s = xb.abs().amax(-1, keepdim=True) / 32767.0
    xr = (torch.round(xb / s) * s).reshape(M, K)
    want = xr.double() @ quant.dequantize(blocks, qtype, K).double().T
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_the_best_build_is_chosen_and_a_pin_is_honoured(monkeypatch):
    flags = kernels.cpu_flags()
    best = next((isa for isa in kernels.ISAS if isa.needs <= flags), kernels.ISAS[-1])
    monkeypatch.delenv("LONGCTX_NATIVE_ISA", raising=False)
    assert kernels.chosen_isa() == best
    monkeypatch.setenv("LONGCTX_NATIVE_ISA", "avx2")
    assert kernels.chosen_isa().name == "avx2"
    monkeypatch.setenv("LONGCTX_NATIVE_ISA", "sse9")
    with pytest.raises(
        OSError, match="LONGCTX_NATIVE_ISA='sse9' is not one of avx512bf16, avx512, avx2, auto"
    ):
        kernels.chosen_isa()


def test_a_build_the_cpu_lacks_says_which_flags():
    code = (
        "from longctx import kernels; kernels.cpu_flags = lambda: {'avx2', 'fma', 'f16c'}\n"
        "import longctx.kernels as k; print(k.available('avx512'), '|', k.unavailable_reason('avx512'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False | the CPU lacks avx512_vnni, avx512bw, avx512dq, avx512f, avx512vl")


KERNEL_TESTS = ["tests/kernels/test_fused.py", "tests/infer/test_native.py", "tests/infer/test_quant.py",
                "tests/infer/test_fused_decode.py", "tests/attention/test_cpu_flash.py"]  # fmt: skip


@pytest.mark.parametrize("name", NAMES[1:])
def test_the_kernel_tests_pass_on_each_lesser_build(name):
    """This process runs the best build; the kernels' own tests once more on each lesser one."""
    if kernels.chosen_isa().name == name or os.environ.get("LONGCTX_NATIVE_ISA"):
        pytest.skip(f"this process already runs the {name} kernels")
    _lib(name)
    root = Path(__file__).parents[2]
    env = {**os.environ, "LONGCTX_NATIVE_ISA": name}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
