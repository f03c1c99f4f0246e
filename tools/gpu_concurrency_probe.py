"""How many small training processes one GPU serves: N processes at once, each timing S steps
of MiniLM fwd+bwd+AdamW (query/value and head trainable, batch 32 x 64 tokens, fp32).

    python tools/gpu_concurrency_probe.py MODEL_DIR --procs 14 --steps 200

Prints each process's steps/s after a warm-up and the aggregate. Used to plan the GLUE study's
--jobs on a GPU machine (with and without CUDA MPS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def worker(model_dir: str, steps: int) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).cuda()
    for name, p in model.named_parameters():
        p.requires_grad = "query" in name or "value" in name or "classifier" in name
    text = "A place of sorrow, after Pope John Paul II died, became a place of celebration in downtown Chicago."
    enc = tok([text * 3] * 32, truncation=True, max_length=64, padding=True, return_tensors="pt").to("cuda")
    labels = torch.zeros(32, dtype=torch.long, device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step()
        if i % 20 == 0:
            loss.item()
    torch.cuda.synchronize()
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - t0)}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--procs", type=int, default=14)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.model_dir, args.steps)
        return 0
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, args.model_dir, "--steps", str(args.steps), "--worker"],
                              stdout=subprocess.PIPE, text=True) for _ in range(args.procs)]
    rates = []
    for p in procs:
        out, _ = p.communicate()
        lines = [x for x in out.splitlines() if x.startswith("{")]
        if lines:
            rates.append(json.loads(lines[-1])["steps_per_s"])
    print(json.dumps({"procs": args.procs, "ok": len(rates), "per_proc_steps_per_s": [round(r, 1) for r in rates],
                      "aggregate_steps_per_s": round(sum(rates), 1), "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
