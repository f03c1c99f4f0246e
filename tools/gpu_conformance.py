"""One-GPU conformance run: every backend x base x method that fits one GPU, as users run it.

    python tools/gpu_conformance.py --out runs/conformance [--jobs 8] [--backends single fsdp2 zero3]
        [--bases bf16 nf4 int8] [--methods lora pissa srlora eigenlorax] [--tokenizer DIR] [--device cuda]

For each cell (backend: one process, FSDP2 under ``torchrun --nproc_per_node 1``, ZeRO-3 under
``deepspeed --num_gpus 1``; base: bf16, nf4, int8; method) it trains a tiny random Llama saved
as a folder (so both exports can read the base) for 12 steps through ``launch/train.py`` with
checkpoints every 2 steps, and checks:

- train: the run exits 0 and its eval loss falls;
- fusion: SRLoRA's largest event fusion error (``method_events.jsonl``);
- resume: the same run killed after step 7 (``tests/train_killed.py``, SIGKILL) and resumed with
  ``--resume auto`` has the uninterrupted run's losses and adapter (largest differences);
- merged: ``lrx export`` of the adapter, opened with ``AutoModelForCausalLM`` on the device, has
  the logits of the trained model (the bf16 base plus the adapter loaded by lrx, as trained,
  then computed in fp32);
- peft: ``adapter_peft`` opened with ``PeftModel`` on the base README says it reproduces: the
  full-precision base for bf16 runs, the base quantized by transformers'
  ``BitsAndBytesConfig`` (nf4) for ``lora`` on nf4; other quantized cells add W0's quantization
  error by design (README) and are reported, not judged.

Cells run ``--jobs`` at a time (tiny models share the GPU); exports are written and their logits
compared (fp32) in this process. Prints a table and writes ``conformance.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "data" / "quickstart"
LAUNCH = {"single": [], "fsdp2": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"],
          "zero3": ["-m", "deepspeed.launcher.runner", "--num_gpus=1"]}
HELD = torch.bfloat16  # the runs' model.dtype
ONE_AT_A_TIME = threading.Lock()
TOL = {"resume": 1e-3, "logits": 1e-3, "fusion": 1e-3}  # bf16 training; logits compared in fp32


def base_folder(out: Path, tokenizer: str) -> Path:
    """A tiny random Llama (lrx's ``tiny-llama`` shape) saved with its tokenizer."""
    from transformers import AutoModelForCausalLM

    from lrx.models import load_tokenizer, tiny_config

    folder = out / "base"
    if (folder / "config.json").is_file():
        return folder
    tok = load_tokenizer(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("tiny-llama", len(tok)))
    model.config.pad_token_id = tok.pad_token_id
    model.to(HELD).save_pretrained(folder, safe_serialization=True)  # stored as most checkpoints are
    tok.save_pretrained(folder)
    return folder


def train_args(base: Path, out: Path, backend: str, kind: str, method: str, device: str, basis: Path | None) -> list[str]:
    args = ["--method", method, f"model.name_or_path={base}", "data.format=instruct",
            f"data.train_path={QUICKSTART / 'train.jsonl'}", f"data.eval_path={QUICKSTART / 'eval.jsonl'}",
            "data.max_train_samples=64", "data.max_eval_samples=8", "data.max_length=64", "train.max_steps=12",
            "train.batch_size=4", "train.log_every=1", "train.save_every=2", "train.lr=1e-3",
            f"train.device={device}", f"train.bf16={str(device == 'cuda').lower()}", "model.dtype=bfloat16",
            f"distributed.backend={backend}", "method.r=4", "logging.progress=false", "logging.tensorboard=false",
            f"logging.output_dir={out}"]
    if kind != "bf16":
        args.append(f"model.quantize={kind}")
    if method == "srlora":
        args.append("method.r_target=8")
    if method == "eigenlorax":
        args.append(f"method.basis={basis}")
    return args


def launch(backend: str, script: str, args: list[str], log: Path) -> int:
    launcher = LAUNCH[backend]
    if backend == "zero3":  # the deepspeed launcher takes a port per job
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            launcher = [*launcher, f"--master_port={s.getsockname()[1]}"]
    cmd = [sys.executable, *launcher, str(REPO / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    with log.open("a") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=600).returncode


def records(run: Path, name: str) -> list[dict]:
    path = run / name
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max([(a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()] or [0.0])


def run_cell(cell: tuple[str, str, str], out: Path, base: Path, device: str, basis: Path | None,
             deadline: float = float("inf")) -> dict:
    """Train, kill and resume one cell, then export it and compare logits (``check_logits``)."""
    from safetensors.torch import load_file

    backend, kind, method = cell
    folder = out / "-".join(cell)
    log = folder / "log.txt"
    folder.mkdir(parents=True, exist_ok=True)
    row = {"backend": backend, "base": kind, "method": method, "folder": str(folder)}
    if time.time() > deadline:
        return {**row, "error": "not run (--deadline-s reached)"}
    t0 = time.time()
    full, cut = folder / "full", folder / "resumed"
    if launch(backend, "launch/train.py", train_args(base, full, backend, kind, method, device, basis), log):
        return {**row, "error": "training failed (see log.txt)", "seconds": time.time() - t0}
    summary = json.loads((full / "summary.json").read_text())
    row["eval_loss"] = [summary["eval_history"][0]["eval_loss"], summary["eval"]["eval_loss"]]
    events = records(full, "method_events.jsonl")
    row["events"] = len(events)
    row["fusion_error"] = max((e.get("fusion_error", 0.0) for e in events), default=None)
    args = train_args(base, cut, backend, kind, method, device, basis)
    killed = launch(backend, "tests/train_killed.py", ["--kill-at-step", "7", *args], log)
    resumed = launch(backend, "launch/train.py", [*args, "--resume", "auto"], log)
    if killed == 0 or resumed != 0:
        return {**row, "error": f"kill/resume: killed exit {killed}, resumed exit {resumed}", "seconds": time.time() - t0}
    a, b = ([r["loss"] for r in records(d, "metrics.jsonl") if r["split"] == "train"] for d in (full, cut))
    row["resume_loss_diff"] = max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")
    row["resume_adapter_diff"] = max_diff(*(load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (full, cut)))
    from lrx.export import export_merged

    try:
        with ONE_AT_A_TIME:  # from_pretrained(dtype=...) sets torch's default dtype for the whole process
            export_merged(full / "adapter", folder / "merged")
            check_logits(row, base, device)
    except Exception as e:  # reported in the table, never hidden
        row["error"] = f"exports: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    row["seconds"] = time.time() - t0
    return row


def probe(tokenizer, device: str) -> dict[str, torch.Tensor]:
    texts = ["What is the capital of France?", "A train travels 45 km in 30 minutes. What is its speed?"]
    return {k: v.to(device) for k, v in tokenizer(texts, return_tensors="pt", padding=True).items()}


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_logits(row: dict, base: Path, device: str) -> dict:
    """Logits (fp32) of the trained model, the merged export and the peft export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lrx.adapter import load_adapter

    full, folder = Path(row["folder"]) / "full", Path(row["folder"])
    tok = AutoTokenizer.from_pretrained(base)
    batch = probe(tok, device)
    trained = AutoModelForCausalLM.from_pretrained(base, dtype=HELD).to(device)
    load_adapter(full / "adapter", trained)  # quantizes W0 plus the init edits on the device, as training did
    want = logits_of(trained.float(), batch)
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged", dtype=torch.float32).to(device)
    row["merged_rel"] = rel(logits_of(merged, batch), want)
    qlora = row["base"] == "nf4" and row["method"] == "lora"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if qlora and device == "cuda" else None
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=HELD, quantization_config=quant,
                                                 **({"device_map": {"": 0}} if quant else {}))
    for param in plain.parameters():  # fp32 compute; bitsandbytes' codes are not floating
        if param.dtype == HELD:
            param.data = param.data.float()
    peft_model = PeftModel.from_pretrained(plain if quant else plain.to(device), full / "adapter_peft")
    row["peft_rel"] = rel(logits_of(peft_model, batch), want)
    row["peft_judged"] = row["base"] == "bf16" or quant is not None
    return row


def verdict(row: dict) -> str:
    if "error" in row:
        return "FAIL: " + row["error"]
    bad = []
    if not row["eval_loss"][1] < row["eval_loss"][0]:
        bad.append("eval loss did not fall")
    if row["method"] == "srlora" and not (row["events"] and row["fusion_error"] <= TOL["fusion"]):
        bad.append("fusion")
    if max(row["resume_loss_diff"], row["resume_adapter_diff"]) > TOL["resume"]:
        bad.append("resume")
    if row.get("merged_rel", 1.0) > TOL["logits"]:
        bad.append("merged")
    if row.get("peft_judged") and row.get("peft_rel", 1.0) > TOL["logits"]:
        bad.append("peft")
    return "ok" if not bad else "FAIL: " + ", ".join(bad)


def fmt(x, spec=".1e") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = ["| backend | base | method | eval loss | events / fusion err | resume dloss / dadapter | merged rel | peft rel | s | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ev = "-" if "eval_loss" not in r else f"{r['eval_loss'][0]:.3f} -> {r['eval_loss'][1]:.3f}"
        fu = f"{r.get('events', '-')} / {fmt(r.get('fusion_error'))}" if r["method"] == "srlora" else "-"
        peft = fmt(r.get("peft_rel")) + ("" if r.get("peft_judged", True) else " (n/a)")
        lines.append(f"| {r['backend']} | {r['base']} | {r['method']} | {ev} | {fu} | {fmt(r.get('resume_loss_diff'))} / "
                     f"{fmt(r.get('resume_adapter_diff'))} | {fmt(r.get('merged_rel'))} | {peft} | {r.get('seconds', 0):.0f} | {verdict(r)} |")
    return "\n".join(lines)


def eigenbasis(out: Path, base: Path, device: str) -> Path:
    """A basis from one LoRA run (r=8) on the same base: K=8 principal directions + 4 random."""
    src, basis = out / "basis-source", out / "basis"
    if not (basis / "eigenbasis.json").is_file():
        args = train_args(base, src, "single", "bf16", "lora", device, None)
        args = [a for a in args if not a.startswith(("method.r=", "train.save_every"))] + ["method.r=8", "train.max_steps=20"]
        if launch("single", "launch/train.py", args, out / "basis-log.txt"):
            raise SystemExit(f"the basis source run failed: {out / 'basis-log.txt'}")
        subprocess.run([sys.executable, "-m", "lrx", "eigenbasis", str(basis), str(src / "adapter_peft"), "--k", "8",
                        "--augment", "4"], cwd=REPO, check=True)
    return basis


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backends", nargs="+", default=["single", "fsdp2", "zero3"])
    p.add_argument("--bases", nargs="+", default=["bf16", "nf4", "int8"])
    p.add_argument("--methods", nargs="+", default=["lora", "pissa", "srlora", "eigenlorax"])
    p.add_argument("--tokenizer", default="minilm-l6", help="tokenizer folder or lrx short name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--deadline-s", type=float, default=float("inf"), help="start no cell after this many seconds")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = base_folder(a.out, a.tokenizer)
    basis = eigenbasis(a.out, base, a.device) if "eigenlorax" in a.methods else None
    cells = [(b, k, m) for b in a.backends for k in a.bases for m in a.methods]
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda c: run_cell(c, a.out, base, a.device, basis, t0 + a.deadline_s), cells))
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
           "seconds": round(time.time() - t0)}
    for name in ("transformers", "peft", "bitsandbytes", "deepspeed"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    (a.out / "conformance.json").write_text(json.dumps({"env": env, "tolerances": TOL, "rows": rows}, indent=1))
    print(json.dumps(env))
    for row in rows:
        if verdict(row) != "ok" and (Path(row["folder"]) / "log.txt").is_file():
            tail = (Path(row["folder"]) / "log.txt").read_text().splitlines()[-12:]
            print(f"--- {row['folder']}: {verdict(row)}\n" + "\n".join(tail))
    print(table(rows))
    return 0 if all(verdict(r) == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
