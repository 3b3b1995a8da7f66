"""Weight-only quantization: the kernels against the gguf package's dequantization in float64, blocks from a
GGUF file kept byte for byte, a quantized model's decode equal to the same model with the rounded weights
in fp32, and the bad inputs."""

import numpy as np
import pytest
import torch
from torch import nn

from longctx import GPT, GPTConfig
from longctx.errors import ConfigError
from longctx.infer import quant
from longctx.infer.engine import Engine, EngineSpec
from longctx.infer.sampling import SamplingParams
from longctx.kernels import available, unavailable_reason

needs_kernels = pytest.mark.skipif(not available(), reason=f"native kernels: {unavailable_reason()}")
QTYPES = ["Q8_0", "Q4_0", "Q4_1"]


@needs_kernels
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 40])  # the matrix-vector kernel up to 16 rows, GEMM beyond
def test_linear_matches_float64_reference(qtype, rows):
    g = torch.Generator().manual_seed(0)
    N, K = 37, 96  # N not a multiple of the kernel's 8 rows
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)  # rows of different scales
    blocks = quant.quantize_blocks(w, qtype)
    assert blocks.shape == (N, K // 32 * quant.BLOCK_BYTES[qtype]) and blocks.dtype == torch.uint8
    bias = torch.randn(N, generator=g)
    layer = quant.QuantizedLinear(blocks, qtype, K, bias, quant.DequantBuffer())
    x = torch.randn(2, rows, K, generator=g)  # a leading batch dimension too
    ref_w = quant.dequantize(blocks, qtype, K).double()  # the gguf package's dequantization
    # up to 16 rows the kernel rounds x to int16 per block of 32 (scale = block max / 32767) for integer
    # dot products; beyond, x is used as it is against the dequantized weight
    xr = _int16_rounded(x) if 2 * rows <= 16 else x
    want = xr.double() @ ref_w.T + bias.double()
    got = layer(x)
    assert got.shape == (2, rows, N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantized().double(), ref_w, rtol=0, atol=0)
    # and the rounding is what it should be: int8 within half a step of the weights, int4 coarser
    step = (w.abs().amax(1, keepdim=True) / (127 if qtype == "Q8_0" else 7)).expand(-1, K)
    assert ((ref_w.float() - w).abs() <= step * 0.51 + 1e-6).float().mean() > (
        0.99 if qtype == "Q8_0" else 0.9
    )


@needs_kernels
@pytest.mark.parametrize("qtype", QTYPES)
def test_bf16_prefill_arithmetic_within_its_rounding_of_float64(qtype):
    """prefill_dtype bf16: a GEMM's rows (beyond the matrix-vector kernel's 16) take x and the dequantized
    weight rounded to bf16, accumulate in fp32 and round the result to bf16 once: within u |y| (u = 2^-8)
    of float64 on the rounded operands (plus fp32's sum, ~1e-6 of sum |x||W|). Decode rows keep the int
    kernel: the same result as the fp32 layer's."""
    g = torch.Generator().manual_seed(2)
    N, K = 37, 96
    blocks = quant.quantize_blocks(torch.randn(N, K, generator=g), qtype)
    bias = torch.randn(N, generator=g)
    low = quant.QuantizedLinear(blocks, qtype, K, bias, quant.DequantBuffer(), torch.bfloat16)
    exact = quant.QuantizedLinear(blocks, qtype, K, bias, quant.DequantBuffer())
    x = torch.randn(40, K, generator=g)
    got = low(x)
    xb, wb = x.bfloat16().double(), quant.dequantize(blocks, qtype, K).bfloat16().double()
    want = xb @ wb.T + bias.bfloat16().double()
    bound = 2.0**-8 * want.abs() + 1e-6 * (xb.abs() @ wb.abs().T + 1)
    assert got.dtype == torch.float32 and ((got.double() - want).abs() <= bound).all()
    assert not torch.equal(got, exact(x))  # it did round (the fp32 layer's GEMM is fp32)
    assert torch.equal(low(x[:3]), exact(x[:3]))  # decode rows: the integer kernel, unchanged
    assert "prefill torch.bfloat16" in repr(low)


def test_bf16_prefill_routes_attention_through_bf16_copies():
    """quantize_model(prefill_dtype=bf16) sets every attention layer's backend to `cpu_flash_bf16` (and
    fp32 leaves them alone); the backend passes calls its kernels do not take (a decode step) to auto."""
    from longctx.attention.dispatch import attention, bf16_copies_attention

    model = _model()
    quant.quantize_model(model, "int8", prefill_dtype=torch.bfloat16)
    assert {b.attn.backend for b in model.blocks} == {"cpu_flash_bf16"}
    assert {m.prefill_dtype for m in model.blocks.modules() if isinstance(m, quant.QuantizedLinear)} == {
        torch.bfloat16
    }
    plain = _model()
    quant.quantize_model(plain, "int8")
    assert {b.attn.backend for b in plain.blocks} == {"auto"}
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 50, 32), torch.randn(1, 2, 50, 32)
    with torch.no_grad():
        assert torch.equal(bf16_copies_attention(q, k, v, q_offset=49), attention(q, k, v, q_offset=49))
        with pytest.raises(ConfigError, match="fp32 or bf16"):
            quant.quantize_model(_model(), "int8", prefill_dtype=torch.float16)


def _int16_rounded(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    s = blocks.abs().amax(-1, keepdim=True) / 32767.0
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return (torch.round(blocks * inv) * s).reshape(x.shape)


def test_activation_rounding_is_below_the_weights_own():
    """The int16 rounding of x moves a product by far less than int8 weights' rounding does."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 256, generator=g), torch.randn(1, 256, generator=g)
    exact = (x.double() @ w.double().T).squeeze()
    deq = quant.dequantize(quant.quantize_blocks(w, "Q8_0"), "Q8_0", 256).double()
    weight_err = (x.double() @ deq.T).squeeze() - exact
    act_err = (_int16_rounded(x).double() @ w.double().T).squeeze() - exact
    assert act_err.abs().max() < weight_err.abs().max() / 50


def test_quantizer_is_ggml_reference_and_blocks_are_the_file_layout(tmp_path):
    """Blocks written into a GGUF file by the gguf package read back unchanged, and match its quantizer."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import quantize

    w = torch.randn(64, 64)
    for qtype in QTYPES:
        want = quantize(w.numpy(), GGMLQuantizationType[qtype])
        assert np.array_equal(quant.quantize_blocks(w, qtype).numpy(), want)
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor(
        "w", quantize(w.numpy(), GGMLQuantizationType.Q4_1), raw_dtype=GGMLQuantizationType.Q4_1
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (t,) = GGUFReader(str(path)).tensors
    assert np.array_equal(np.asarray(t.data).reshape(64, -1), quant.quantize_blocks(w, "Q4_1").numpy())


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, max_seq_len=128, init_std=0.3)
    return GPT(GPTConfig.from_preset("tiny", **{**cfg, **kw})).eval()


def _rounded_copy(model: GPT, qtype: str) -> GPT:
    """The same model in fp32 with every block linear replaced by its dequantized blocks, head in Q8_0."""
    ref = _model()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, m in ref.named_modules():
            if type(m) is nn.Linear and name.startswith("blocks."):
                m.weight.copy_(quant.dequantize(quant.quantize_blocks(m.weight, qtype), qtype, m.in_features))
        w = ref.head_weight
        w.copy_(quant.dequantize(quant.quantize_blocks(w, "Q8_0"), "Q8_0", w.shape[1]))
    return ref


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_model_decodes_as_its_rounded_weights(fmt):
    model, prompt = _model(), list(range(3, 40))
    ref = _rounded_copy(model, quant.FORMATS[fmt][0])
    info = quant.quantize_model(model, fmt)
    assert info.quantized == 2 * 7 and info.kept == 0
    assert all(type(m) is not nn.Linear for m in model.blocks.modules())
    params = SamplingParams(max_tokens=12)
    # chunks of 8 rows: the matrix-vector kernel; 1 row per decode step. The same cache on both sides
    for kv in ("fp32", "bf16"):
        spec = EngineSpec(prefill_chunk=8, kv_dtype=kv)
        got = Engine(model, None, spec, stop_at_eos=False).generate(prompt, params).token_ids
        want = Engine(ref, None, spec, stop_at_eos=False).generate(prompt, params).token_ids
        assert got == want
    with torch.no_grad():  # a full forward (prefill-sized: dequantize + GEMM) gives the same logits
        torch.testing.assert_close(
            model(torch.tensor([prompt])), ref(torch.tensor([prompt])), rtol=1e-4, atol=1e-4
        )


def test_auto_cache_is_bf16_for_quantized_weights_only():
    """A quantized model's decode is memory-bound on its cache at long contexts: `auto` stores bf16 there
    (half of fp32), and the model's own dtype otherwise; an explicit choice is kept."""
    model = _model()
    assert Engine(model, None).cache_for(1, 16).storage == torch.float32
    quant.quantize_model(model, "int4")
    assert Engine(model, None).cache_for(1, 16).storage == torch.bfloat16
    assert Engine(model, None, EngineSpec(kv_dtype="fp32")).cache_for(1, 16).storage == torch.float32


def test_blocks_from_a_file_are_kept_only_when_they_are_the_weights():
    model = _model()
    name = "blocks.0.mlp.up_proj.weight"
    w = model.get_parameter(name)
    blocks = quant.quantize_blocks(w, "Q4_1")
    with torch.no_grad():  # the model's weight is what the file's blocks hold (as after `longctx pull`)
        w.copy_(quant.dequantize(blocks, "Q4_1", w.shape[1]))
    other = "blocks.1.mlp.up_proj.weight"  # blocks that no longer match (say, fine-tuned since)
    stale = quant.quantize_blocks(model.get_parameter(other) + 1.0, "Q4_1").numpy()
    info = quant.quantize_model(model, "int4", {name: ("Q4_1", blocks.numpy()), other: ("Q4_1", stale)})
    assert info.kept == 1 and info.quantized == 13
    layer = model.blocks[0].mlp.up_proj
    # byte for byte, in the layout the kernels read (rows interleaved by eight for 4-bit types)
    assert layer.qtype == "Q4_1" and torch.equal(
        layer.blocks, quant.pack_x8(blocks, "Q4_1") if available() else blocks
    )
    assert model.blocks[1].mlp.up_proj.qtype == "Q4_0"


def test_bad_input():
    with pytest.raises(ConfigError, match="multiple of 32"):
        quant.quantize_model(_model(d_model=40, n_head=4, n_kv_head=2), "int8")
    with pytest.raises(ConfigError, match="unknown --quantize"):
        quant.check_format("int3")
    with pytest.raises(ConfigError, match="fp32"):
        quant.quantize_model(_model().to(torch.bfloat16), "int8")
    with pytest.raises(
        ConfigError, match="prefills in fp32 or bf16 arithmetic; use --dtype fp32, bf16 or auto"
    ):
        EngineSpec(quantize="int8", dtype="fp16")
    assert EngineSpec(quantize="int8", dtype="bf16").quantize == "int8"  # bf16: the prefill's arithmetic
