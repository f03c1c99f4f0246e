#!/usr/bin/env bash
# One call of the GLUE study on a bare GPU machine (the workplace's device tool), from the
# repository root, with carried .whl/ (datasets, dill, multiprocess) and .carry/ (minilm.pack
# from tools/minilm_pack.py, glue.tar.xz, and glue-study-runs.jsonl from earlier calls).
#   bash tools/glue_study_gpu.sh DEADLINE_S [glue_study.py run arguments...]
# Results: $OUT/glue-study-runs.jsonl (every finished run so far), $OUT/bases.json, $OUT/log.
set -uo pipefail
deadline=$1; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    --find-links .whl datasets dill multiprocess || exit 3  # .whl holds multiprocess for several Pythons
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1  # lrx from this checkout (not installed here)
python3 tools/minilm_pack.py unpack .carry/minilm.pack /tmp/minilm || exit 4
mkdir -p /tmp/glue && tar xJf .carry/glue.tar.xz -C /tmp/glue || exit 5
python3 - <<'EOF' || exit 6
import torch, transformers, datasets, peft
import lrx.cli, lrx.runner, lrx.methods.srlora, lrx.methods.eigenlorax  # noqa: F401
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0),
      "transformers", transformers.__version__, "datasets", datasets.__version__, "peft", peft.__version__)
EOF
nproc; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
# CUDA MPS lets the many small processes' kernels share the GPU at once. MPS=probe times
# 14 processes without and with it (tools/gpu_concurrency_probe.py) and keeps the faster;
# MPS=on / off decides directly.
mps_start() { nvidia-cuda-mps-control -d && timeout 60 python3 -c "import torch; torch.zeros(1).cuda()"; }
mps_stop() { echo quit | nvidia-cuda-mps-control 2>/dev/null; sleep 1; }
case "${MPS:-off}" in
  probe)
    a=$(python3 tools/gpu_concurrency_probe.py /tmp/minilm --procs 14 --steps 300 | tail -1); echo "no MPS: $a"
    if mps_start; then
      b=$(python3 tools/gpu_concurrency_probe.py /tmp/minilm --procs 14 --steps 300 | tail -1); echo "MPS: $b"
      ra=$(echo "$a" | python3 -c "import json,sys; print(json.load(sys.stdin)['aggregate_steps_per_s'])")
      rb=$(echo "$b" | python3 -c "import json,sys; print(json.load(sys.stdin)['aggregate_steps_per_s'])" 2>/dev/null || echo 0)
      if python3 -c "import sys; sys.exit(0 if float('$rb') > 1.15 * float('$ra') else 1)"; then echo "keeping MPS"; else echo "MPS off"; mps_stop; fi
    else echo "MPS did not start"; mps_stop; fi ;;
  on) mps_start || { echo "MPS did not start"; mps_stop; } ;;
esac
touch .carry/glue-study-runs.jsonl
used=$(( $(date +%s) - t0 ))
python3 tools/glue_study.py run --glue-dir /tmp/glue/glue --work runs/glue-study \
    --results .carry/glue-study-runs.jsonl --mirror "$OUT/glue-study-runs.jsonl" \
    --deadline $(( deadline - used )) model.name_or_path=/tmp/minilm train.device=cuda train.bf16=false "$@"
rc=$?
cp .carry/glue-study-runs.jsonl "$OUT/glue-study-runs.jsonl"
[ -f runs/glue-study/bases.json ] && cp runs/glue-study/bases.json "$OUT/bases.json"
(cd runs/glue-study && tar czf "$OUT/logs.tgz" logs) 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv,noheader
mps_stop
echo "glue_study rc=$rc, call wall $(( $(date +%s) - t0 )) s"
exit $rc
