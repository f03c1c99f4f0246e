"""Training throughput on one device: lrx (through its own build and trainer) against peft,
peft + Liger and peft QLoRA, measured in the same run on the same card.

    python tools/bench_throughput.py --out benchmarks/throughput-1gpu.json         # one GPU, ~9 min
    python tools/bench_throughput.py --model-config tiny --device cpu --seq 64     # CPU smoke run
    python tools/bench_throughput.py --table benchmarks/throughput-1gpu.json       # README's GPU table

Every variant runs in a fresh subprocess (clean memory peaks, a per-variant time limit),
``IMPL:METHOD:QUANTIZE:CHECKPOINTING[:KEY=VALUE,...]``:

- ``lrx:lora:none:full``: ``launch/train.py``'s path: the config resolved as the command line
  resolves it (``train.*`` settings as KEY=VALUE: ``compile=true``, ``fused_loss=off``;
  ``backend=single`` or ``fsdp2``, default fsdp2 for bf16 and single for nf4), the backend's
  ``build`` with the runner's ``Adapters`` and ``lrx.speed.prepare_for_training``, and
  ``Trainer.fit`` on random tokens; SRLoRA runs its whole schedule (an event after each of the
  first steps) before the timed steps. The only difference from a run: random weights built
  on the device instead of a checkpoint.
- ``peft:lora:none:full`` / ``peft+liger:...``: ``LlamaForCausalLM`` in bf16 +
  ``get_peft_model``, ``fully_shard`` per decoder block and the root with
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, fused AdamW; ``peft+liger``
  after ``liger_kernel.transformers.apply_liger_kernel_to_llama()``.
- ``peft:lora:nf4:full``: every decoder linear a bitsandbytes ``Linear4bit`` (nf4, double
  quantization, bf16 compute), ``prepare_model_for_kbit_training``, bf16 autocast, one process.

CHECKPOINTING is none, full, selective or every2 (peft: none or full). Shapes: an 8B
Llama-3 (random init), r=16 (alpha 32) on all 7 projections, seq 2048, micro-batch 2;
``--warmup`` steps, then ``--repeats`` timed runs of ``--steps`` steps each. tokens/s is the
mean over the repeats (each reported), MFU as ``tools/bench_sharded.py`` counts it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

GPU_VARIANTS = [
    "peft:lora:none:full", "peft+liger:lora:none:full", "lrx:lora:none:full", "lrx:lora:none:selective",
    "lrx:lora:none:full:compile=true", "lrx:lora:none:full:backend=single", "lrx:srlora:none:full",
    "peft:lora:none:none", "lrx:lora:none:none", "peft:lora:nf4:full", "lrx:lora:nf4:full", "lrx:srlora:nf4:full",
]
CPU_VARIANTS = ["peft:lora:none:full", "lrx:lora:none:full", "lrx:lora:none:none:fused_loss=off"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_variant(text: str) -> dict:
    """``IMPL:METHOD:QUANTIZE:CHECKPOINTING[:KEY=VALUE,...]`` as a dict; exits (2) on a bad one."""
    parts = text.split(":")
    if len(parts) not in (4, 5) or parts[0] not in ("lrx", "peft", "peft+liger") or parts[2] not in ("none", "nf4"):
        refuse(f"bad variant {text!r}: write IMPL:METHOD:QUANTIZE:CHECKPOINTING[:KEY=VALUE,...], IMPL lrx, peft or "
                 "peft+liger, QUANTIZE none or nf4, e.g. lrx:lora:none:full:compile=true")
    extra = dict(kv.split("=", 1) for kv in parts[4].split(",") if "=" in kv) if len(parts) == 5 else {}
    if parts[0] != "lrx" and (parts[1] != "lora" or parts[3] not in ("none", "full") or extra):
        refuse(f"bad variant {text!r}: the peft baselines train lora with checkpointing none or full, no settings")
    return {"impl": parts[0], "method": parts[1], "quantize": parts[2], "checkpointing": parts[3], "settings": extra}


def model_config(path: str):
    from transformers import AutoConfig, LlamaConfig

    if path == "tiny":
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return AutoConfig.from_pretrained(path)


def flops_per_token(cfg, seq: int) -> float:
    """4 x matmul parameters (forward, backward of the activations, the adapters' share is small)
    + attention, as ``tools/bench_sharded.py`` counts it."""
    d, layers, ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    matmul = layers * (2 * d * d + 2 * d * kv + 3 * d * ff) + d * cfg.vocab_size
    return 4 * matmul + 6 * seq * d * layers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(args) -> list[dict]:
    """Each variant in its own subprocess; a failed or timed-out one gets a row saying so."""
    rows = []
    for text in args.variants:
        result = Path(args.workdir) / f"result-{len(rows)}.json"
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        cmd = [sys.executable, __file__, "--one", text, "--result", str(result), *args.child_args]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.time_limit, capture_output=True, text=True)
            failed = None if proc.returncode == 0 and result.is_file() else \
                f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}"
        except subprocess.TimeoutExpired:
            failed = f"over the {args.time_limit} s limit"
        row = json.loads(result.read_text()) if failed is None else {**parse_variant(text), "error": failed}
        row.update(variant=text, wall_s=round(time.perf_counter() - t0, 1))
        rows.append(row)
        print(f"[bench] {text}: " + (f"{row['tok_s']:.0f} tok/s, {row['peak_gib']} GiB" if failed is None else failed),
              flush=True)
        if "profile" in row:
            print(f"[profile] {text}: " + json.dumps(row["profile"]), flush=True)
        if args.out:  # after every variant: a call cut off by its time limit keeps the rows it measured
            Path(args.out).write_text(json.dumps(args.earlier + rows, indent=2) + "\n")
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table (README's GPU table)."""
    lines = ["| impl | method | quantize | checkpointing | settings | tokens/s | repeats | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['method']} | {r['quantize']} | {r['checkpointing']} | "
                         f"{_settings(r)} | failed: {r['error']} | | | |")
            continue
        reps = " / ".join(f"{t:,.0f}" for t in r["repeats_tok_s"])
        lines.append(f"| {r['impl']} | {r['method']} | {r['quantize']} | {r['checkpointing']} | {_settings(r)} | "
                     f"{r['tok_s']:,.0f} | {reps} | {100 * r['mfu']:.1f} % | {r['peak_gib']:.1f} |")
    cards = sorted({f"{r.get('card')}, torch {r.get('torch')}" for r in rows if "card" in r})
    return "\n".join(lines) + (f"\n\n{'; '.join(cards)}." if cards else "")


def _settings(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(r.get("settings", {}).items())) or "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=None, help="default: the GPU list on cuda, a short one on cpu")
    parser.add_argument("--model-config", default=str(REPO / "configs" / "models" / "llama3-8b-shape"),
                        help="HF config folder, or 'tiny' for a CPU smoke run")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0,
                        help="profile this many steps after the timed ones: where device time goes (JSON 'profile')")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (H100/H200: 989)")
    parser.add_argument("--time-limit", type=float, default=150.0, help="seconds per variant")
    parser.add_argument("--out", default=None, help="JSON rows (appended to when it exists)")
    parser.add_argument("--table", default=None, help="print README's markdown table of this JSON and exit")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if args.one:
        from bench_throughput_run import run_variant

        Path(args.result).write_text(json.dumps(run_variant(args, parse_variant(args.one))))
        return 0
    import tempfile

    args.variants = args.variants or (GPU_VARIANTS if args.device == "cuda" else CPU_VARIANTS)
    args.child_args = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                       ("model_config", "device", "seq", "micro_batch", "rank", "warmup", "steps", "repeats", "peak_tflops",
                        "profile")]
    for text in args.variants:  # every variant checked before the first one runs
        parse_variant(text)
    args.earlier = []
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        args.earlier = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else []
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        rows = run_all(args)
    print(table(rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
