#!/usr/bin/env bash
# Training on one GPU, ours vs transformers.LlamaForCausalLM: the `medium` preset (~350M parameters,
# d=1024, 24 layers, 16 heads, SwiGLU 2816, vocab 32000), bf16 autocast, AdamW, batch 1, at 8K, 32K and the
# planner's longest length for the GPU's memory. Prints tokens/s, MFU against a bf16 matmul measured in the
# same run, and peak memory (torch.cuda.max_memory_allocated), each (side, length) in its own process.
# HF is expected to run out of memory at the longer lengths: the table says OOM.
# Budget: <= 8 minutes on an H100 (the GPU tests, then 2 steps per side and length; the planner's length is
# capped at 256K).
#
#   bash bench/gpu.sh             # on a machine with a CUDA GPU
#   bash bench/gpu.sh --dry-run   # on CPU, tiny preset and short lengths: proves the script runs
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--dry-run" ]]; then
    exec python bench/train_vs_hf.py --preset tiny --device cpu --precision fp32 --lengths 128 256 \
        --planner-max 400MiB --max-len 512 --steps 1 --threads 1 --checkpointing all
fi

python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: run with --dry-run on CPU"
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, torch {torch.__version__}")
PY
# first the CUDA correctness tests (a minute): the model, checkpointing, bf16 and generation agree with CPU
timeout 120 python -m pytest -q -m gpu tests/gpu -p no:cacheprovider || echo "GPU TESTS FAILED (the benchmark still runs)"
# the planner's budget: 90% of the card, leaving room for the CUDA context and allocator fragmentation
BUDGET_GIB=$(python -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory * 0.9 / 2**30))")
timeout 420 python bench/train_vs_hf.py --preset medium --device cuda --precision bf16 --threads 4 \
    --lengths 8192 32768 --planner-max "${BUDGET_GIB}GiB" --max-len 262144 --steps 2 --checkpointing none all
