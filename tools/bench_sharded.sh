#!/usr/bin/env bash
# Every run of the sharded benchmark matrix in its own launch (2 GPUs), results in one JSON.
#   bash tools/bench_sharded.sh runs/bench_sharded.json [extra bench_sharded.py flags]
# BACKENDS (default "fsdp2 zero3") and SPECS pick part of the matrix, e.g. to fit a time limit:
#   BACKENDS=fsdp2 bash tools/bench_sharded.sh runs/fsdp2.json --warmup 3 --steps 10
# An existing JSON is appended to.
set -euo pipefail
out=${1:-runs/bench_sharded.json}
shift || true
for spec in ${SPECS:-lora:bf16:ckpt srlora:bf16:ckpt lora:bf16:nockpt srlora:bf16:nockpt}; do
  for backend in ${BACKENDS:-fsdp2 zero3}; do
    if [ "$backend" = fsdp2 ]; then
      python -m torch.distributed.run --nproc_per_node 2 tools/bench_sharded.py --backend fsdp2 --runs "$spec" --out "$out" "$@"
    else
      python -m deepspeed.launcher.runner --num_gpus 2 tools/bench_sharded.py --backend zero3 --runs "$spec" --out "$out" "$@"
    fi
  done
done
python - "$out" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
print(f"{'backend':7} {'run':20} {'tok/s/GPU':>9} {'MFU':>6} {'peak GiB':>8} {'init s':>6} {'event s':>7} {'event MiB':>9} {'peft':>6}")
for r in rows:
    ev = f"{r['event_s']:.3f}" if "event_s" in r else "-"
    mb = f"{r['event_allreduce_bytes'] / 2**20:.0f}" if "event_s" in r else "-"
    print(f"{r['backend']:7} {r['run']:20} {r['tokens_per_s_per_gpu']:9.0f} {100 * r['mfu']:5.1f}% {r['peak_gib'] or 0:8.1f} "
          f"{r['init_s']:6.2f} {ev:>7} {mb:>9} {r.get('peft_reference_tokens_per_s_per_gpu', '-'):>6}")
PY
