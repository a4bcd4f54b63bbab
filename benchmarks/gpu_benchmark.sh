#!/usr/bin/env bash
# The speed benchmark on a CUDA GPU, in one go: JAX with CUDA against PyTorch on the
# same GPU, float32 and mixed precision (JAX bfloat16 trunks vs torch autocast to
# bfloat16), the ResNet-18 train step and every DICE-FER stage at the paper's size.
#
#   bash benchmarks/gpu_benchmark.sh [OUT_DIR]      # default: runs/gpu_benchmark
#
# Installs its own virtual environment (.venv-gpu: jax[cuda12] and the data extra,
# whose torch wheel carries CUDA), checks both frameworks see the GPU, then writes
# OUT_DIR/{fp32,bf16}.json and .md (tables generated from the JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_benchmark}"
mkdir -p "$OUT"
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -e ".[cuda,data]"
fi
PY=.venv-gpu/bin/python
"$PY" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print('jax:', jax.devices())"
"$PY" -c "import torch; assert torch.cuda.is_available(); print('torch:', torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -m experiments.benchmark --json="$OUT/fp32.json" --markdown="$OUT/fp32.md"
"$PY" -m experiments.benchmark --json="$OUT/bf16.json" --markdown="$OUT/bf16.md" \
    --config.model.half_precision=True
echo "wrote $OUT/fp32.{json,md} and $OUT/bf16.{json,md}"
