#!/usr/bin/env bash
# tools/bench_throughput.py on a bare one-GPU machine (the workplace's device tool), from the
# repository root, with .whl/ carried: datasets, dill, multiprocess (as for the GLUE study),
# liger_kernel-0.8.5-py3-none-any.whl and bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl.
#   bash tools/bench_throughput_gpu.sh [bench_throughput.py options...]
# Results: $OUT/throughput-1gpu.json and $OUT/log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    --find-links .whl datasets dill multiprocess liger-kernel bitsandbytes || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # lrx from this checkout
python3 -c "import torch, transformers, peft, liger_kernel, bitsandbytes; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name(0))" || exit 4
python3 tools/bench_throughput.py --out "$OUT/throughput-1gpu.json" "$@" 2>&1 | tee "$OUT/log"
