"""Weight-only quantization for inference: `--quantize int8|int4` on generate, serve and eval.

Every linear layer of the blocks becomes a `QuantizedLinear` holding its weight in one of ggml's block
formats (32 weights per block with an fp16 scale: Q8_0 for int8; Q4_0, or Q4_1 with an offset, for int4),
the bytes of a GGUF file. So a checkpoint whose GGUF already holds such blocks keeps them as they are (no
second rounding: the pulled SmolLM2 is Q4_1 in its file), and a model in fp32 is quantized once at load
with the `gguf` package's port of ggml's quantizer. The LM head (and the token embedding it is tied to)
takes Q8_0, as llama.cpp's files do; the embedding lookup reads the same rounded values, so every path
through the model sees one set of weights.

Activations stay fp32 between layers. Decode steps multiply them against the blocks
(`longctx/kernels/quant.c`: ~4x fewer bytes than fp32 for int8, ~7x for int4, the speed-up of a
memory-bound step), rounding each row of x to int16 per block of 32 for integer dot products (an error
~500x below the int8 weights' own). The blocks' bytes are reordered once at load with rows interleaved by
eight (`pack_x8`: the order the kernel's vectors want them in; +10-40% on a 2-core AMD EPYC Zen 3).
Prefill chunks dequantize one matrix at a time into a buffer the layers share and run the GEMM in the
model's prefill arithmetic (`quantize_model(prefill_dtype=)`, the engine's `--dtype` under `--quantize`):
fp32 on x as it is, or bf16 where the CPU runs it natively — x and the dequantized weight rounded to bf16,
fp32 accumulation, the result widened back, and attention on bf16 copies of q, k, v (the attention backend
`cpu_flash_bf16`); the residual stream, norms and decode steps stay fp32. SmolLM2 int8 at 4096 tokens on
AMD EPYC Zen 5: prefill 8.3 -> 3.5-4.1 s (docs/infer.md; its perplexity cost there too). Without the native
kernels the blocks are dequantized once (same numbers, no speed-up) and the reason is logged.
What each format costs in perplexity: docs/infer.md (`python bench/quant_ppl.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from longctx.errors import ConfigError
from longctx.infer import native
from longctx.kernels import available, describe, library, unavailable_reason
from longctx.model import GPT, Attention

log = logging.getLogger(__name__)

BLOCK = 32
KINDS = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2}  # the kernels' codes (for blocks in pack_x8's layout)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
# --quantize -> (the type it quantizes to, the types it keeps from a GGUF file as they are)
FORMATS = {"int8": ("Q8_0", ("Q8_0",)), "int4": ("Q4_0", ("Q4_0", "Q4_1"))}
HEAD_TYPE = "Q8_0"


def check_format(name: str | None) -> None:
    if name is not None and name not in FORMATS:
        raise ConfigError(f"unknown --quantize {name!r}; choose {', '.join(FORMATS)} (or leave it off)")


class DequantBuffer:
    """Scratch matrices shared by a model's quantized layers, one per dtype: a prefill chunk dequantizes each
    weight into them in turn (a fresh tensor per call would page-fault its way through memory every time)."""

    def __init__(self):
        self.data: dict[torch.dtype, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if dtype not in self.data or self.data[dtype].numel() < numel:
            self.data[dtype] = torch.empty(numel, dtype=dtype)
        return self.data[dtype][:numel]


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W (out, in) in ggml blocks, given as (out, in / 32 * bytes per block) uint8; kept as
    `blocks` in pack_x8's layout where the kernels run (else dequantized once, as `fallback`)."""

    def __init__(
        self, blocks: torch.Tensor, qtype: str, in_features: int, bias, buffer: DequantBuffer,
        prefill_dtype: torch.dtype = torch.float32,
    ):  # fmt: skip
        super().__init__()
        self.qtype, self.kind, self.prefill_dtype = qtype, KINDS[qtype], prefill_dtype
        self.in_features, self.out_features = in_features, blocks.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.buffer = buffer
        self.fallback: torch.Tensor | None = None  # the dequantized weight, when there are no kernels
        if not available():
            self.fallback = dequantize(blocks, qtype, in_features)
        else:  # the layout the kernels read; `blocks` holds it from here on
            blocks = pack_x8(blocks, qtype)
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)

    def dequantized(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight in fp32 (out, in), written into `out` when given."""
        if self.fallback is not None:
            return self.fallback
        N, K = self.out_features, self.in_features
        out = torch.empty(N, K) if out is None else out.view(N, K)
        library().lc_dequant_q(
            self.blocks.data_ptr(), self.kind, out.data_ptr(), N, K, torch.get_num_threads()
        )
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if x.dtype != torch.float32:
            raise ConfigError("quantized weights run with fp32 activations; use --dtype fp32 with --quantize")
        K = self.in_features
        rows = x.numel() // K
        if self.fallback is None and rows <= native.MAX_ROWS:
            x = x.contiguous()
            y = torch.empty(*x.shape[:-1], self.out_features)
            library().lc_linear_q(
                x.data_ptr(), self.blocks.data_ptr(), self.kind,
                None if self.bias is None else self.bias.data_ptr(), y.data_ptr(),
                rows, self.out_features, K, torch.get_num_threads(),
            )  # fmt: skip
            return y
        weight = (
            self.fallback
            if self.fallback is not None
            else self.dequantized(self.buffer.get(self.out_features * K))
        )
        if self.prefill_dtype != torch.float32:  # rounded once into the shared buffer, not a fresh copy
            low = self.prefill_dtype
            weight = self.buffer.get(weight.numel(), low).view(weight.shape).copy_(weight)
            bias = None if self.bias is None else self.bias.to(low)
            return F.linear(x.to(low), weight, bias).float()
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        low = "" if self.prefill_dtype == torch.float32 else f", prefill {self.prefill_dtype}"
        return f"{self.in_features}, {self.out_features}, {self.qtype}{low}"


def quantize_blocks(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """(out, in) fp32 -> (out, in / 32 * bytes) uint8 blocks, by ggml's rules (the gguf package's port)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    array = weight.detach().to("cpu", torch.float32).numpy()
    return torch.from_numpy(quantize(array, GGMLQuantizationType[qtype]))


def pack_x8(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """ggml blocks (N, in / 32 * bytes) -> the same bytes with rows interleaved by eight, the layout quant.c's
    decode reads (described there): (ceil(N / 8), in / 32 * 8 * bytes), zero rows padding N."""
    head = BLOCK_BYTES[qtype] - (32 if qtype == "Q8_0" else 16)  # the fp16 d (and m) before the weights
    N, groups = blocks.shape[0], -(-blocks.shape[0] // 8)
    b = blocks.numpy().reshape(N, -1, BLOCK_BYTES[qtype])
    b = np.concatenate([b, np.zeros((groups * 8 - N, *b.shape[1:]), np.uint8)])
    b = b.reshape(groups, 8, -1, BLOCK_BYTES[qtype]).transpose(0, 2, 1, 3)  # (group, block, row, bytes)
    G, nb = b.shape[:2]
    # the eight rows' d, then (Q4_1) their m: (group, block, 8 * head)
    scales = b[..., :head].reshape(G, nb, 8, head // 2, 2).transpose(0, 1, 3, 2, 4).reshape(G, nb, -1)
    if qtype == "Q8_0":
        pairs = b[..., head:].reshape(G, nb, 8, 16, 2)  # [row, pair, e]: weight 2 pair + e
    else:  # byte i: weight i in the low nibble, i + 16 in the high one; pair p + 8 goes above pair p
        nibbles = b[..., head:]
        pairs = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(G, nb, 8, 16, 2)
        pairs = pairs[:, :, :, :8] | pairs[:, :, :, 8:] << 4
    weights = pairs.transpose(0, 1, 3, 2, 4).reshape(G, nb, -1)  # byte 16 pair + 2 row + e
    return torch.from_numpy(np.ascontiguousarray(np.concatenate([scales, weights], axis=-1).reshape(G, -1)))


def dequantize(blocks: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    """The reference dequantization (the gguf package's): (out, in) fp32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as ggml_dequantize

    out = ggml_dequantize(blocks.numpy(), GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(-1, in_features)


@dataclass
class Quantized:
    """What `quantize_model` did: the head for logits, and which layers kept a file's blocks."""

    head: QuantizedLinear
    kept: int  # layers whose blocks came from the GGUF file as they were
    quantized: int  # layers quantized here
    weight_bytes: int  # the blocks' size in bytes

    def summary(self, fmt: str) -> str:
        how = (
            f"{self.kept} kept from the GGUF file, {self.quantized} quantized at load"
            if self.kept
            else (f"{self.quantized} layers quantized at load")
        )
        return f"weights {fmt} ({how}; head {HEAD_TYPE}): {self.weight_bytes / 2**20:.0f} MiB"


def quantize_model(
    model: GPT, fmt: str, file_blocks: dict[str, tuple[str, np.ndarray]] | None = None,
    prefill_dtype: torch.dtype = torch.float32,
) -> Quantized:  # fmt: skip
    """Replace the linear layers of `model`'s blocks by QuantizedLinear in format `fmt` (in place; the model
    must be fp32 on CPU). file_blocks: {parameter name: (ggml type, blocks)} read from a GGUF file: used as
    they are where the type is one `fmt` keeps and they dequantize to exactly the model's weight.
    prefill_dtype bf16: prefill GEMMs and attention on bf16 arithmetic (see the module's docstring)."""
    check_format(fmt)
    if prefill_dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"quantized weights prefill in fp32 or bf16 arithmetic, not {prefill_dtype}")
    if next(model.parameters()).dtype != torch.float32 or model.head_weight.device.type != "cpu":
        raise ConfigError("--quantize runs fp32 activations on CPU; drop --dtype/--device cuda for it")
    target, keeps = FORMATS[fmt]
    file_blocks = file_blocks or {}
    buffer, kept, quantized, nbytes = DequantBuffer(), 0, 0, 0
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("blocks.")]
    for name, module in linears:
        N, K = module.weight.shape
        if K % BLOCK:
            raise ConfigError(
                f"--quantize {fmt}: {name} has {K} inputs, not a multiple of {BLOCK} (ggml's block); "
                "this model can run in fp32 or bf16"
            )
        blocks, qtype = _kept(file_blocks.get(f"{name}.weight"), keeps, module.weight)
        if blocks is None:
            blocks, qtype = quantize_blocks(module.weight, target), target
            quantized += 1
        else:
            kept += 1
        q = QuantizedLinear(blocks, qtype, K, module.bias, buffer, prefill_dtype)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, q)
        nbytes += blocks.numel()
    head_w = model.head_weight
    if head_w.shape[1] % BLOCK:
        raise ConfigError(f"--quantize: the LM head has {head_w.shape[1]} inputs, not a multiple of {BLOCK}")
    name = "lm_head.weight" if model.lm_head is not None else "tok_emb.weight"
    blocks, _ = _kept(file_blocks.get(name), (HEAD_TYPE,), head_w)
    blocks = quantize_blocks(head_w, HEAD_TYPE) if blocks is None else blocks
    head = QuantizedLinear(blocks, HEAD_TYPE, head_w.shape[1], None, buffer)
    with torch.no_grad():  # the lookup (and any full-logits path) reads the same rounded values
        head_w.copy_(dequantize(blocks, HEAD_TYPE, head_w.shape[1]))
    model.quantized_head = head  # set from outside, as decode_ops routes linears: model.py never reads it
    if prefill_dtype == torch.bfloat16:
        for module in model.modules():
            if isinstance(module, Attention) and module.backend == "auto":
                module.backend = "cpu_flash_bf16"  # bf16 copies of q, k, v where the kernels take them
    return Quantized(head, kept, quantized, nbytes + blocks.numel())


def _kept(item, keeps: tuple[str, ...], weight: torch.Tensor):
    """(blocks, type) of a file's tensor usable as it is, else (None, None)."""
    if item is None or item[0] not in keeps:
        return None, None
    qtype, array = item
    blocks = torch.from_numpy(np.array(array)).reshape(weight.shape[0], -1)  # a copy: the file is mapped
    if not torch.equal(dequantize(blocks, qtype, weight.shape[1]), weight.detach().float()):
        return None, None  # the weights changed since (fine-tuned, or another file): quantize afresh
    return blocks, qtype


def status() -> str:
    return (
        f"native kernels, {describe()}"
        if available()
        else f"no native kernels ({unavailable_reason()}): dequantized"
    )
