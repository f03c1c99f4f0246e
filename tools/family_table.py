"""Which model families work with which method, backend and base: the conformance table in README.

    python tools/family_table.py --write benchmarks/families.json --readme README.md  # every cell, README's table
    python tools/family_table.py --write benchmarks/families.json --backends fsdp2,zero3  # only these columns again
    python tools/family_table.py --markdown benchmarks/families.json  # print README's table from the JSON

Every family is a tiny random model built from transformers' own config class (2 layers,
hidden 32), adapted with ``method.target_modules=[all-linear]`` at r=4, for every method and
base (fp32, bf16, nf4 through ``lrx.quant``), on one process and on 2 processes (gloo on the
CPU) under FSDP2 and ZeRO-3. A backend builds and trains the cell as a run does
(``backend.build`` with ``lrx.build.Adapters``, ``setup``, ``backward``, ``step``; each process
its half of the batch). The data are the quick-start set's first 4 training examples, prompt
and response read as characters (ids: code points, 127 above the tiny vocabulary), 24 per row;
a classifier's label is whether the prompt is a question. A cell is ``ok`` when: the model
trains 4 Adam steps and its loss falls; SRLoRA's events (at steps 2 and 4) leave that batch's
logits unchanged (relative 1e-5; bf16: ``BF16_EVENT``, below); merged, it is a plain transformers model
again (no lrx module, the original's state-dict keys) with the trained model's logits
(relative 1e-5). One process merges the trained model in place (``merge_into_linears``); a
sharded cell saves its adapter as a run's final save does (every process, gathered) and the
first process merges it onto a freshly built base (``lrx.load(...)``, then
``merge_into_linears``), checking first that the reloaded model gives the sharded model's
logits. A cell that cannot work is ``refused`` with lrx's one-line error, raised while the
model is built and adapted, before training; an unexpected exception is ``error`` with its
first line. ``tests/test_families.py`` runs the cells and checks them against the JSON this writes.

The sharded cells of a backend are made in one launch of 2 processes (torchrun; a launch costs
each process ~7 s of imports; a cell took ~1 s under FSDP2, ~3.5 s under ZeRO-3 on 2 busy CPU
cores), which loops over every cell with one backend object, writing one JSON row per cell
(``--sharded NAME --rows FILE``).

bf16 bases: the merged model is compared in fp32 with the trained model cast to fp32 (exact
from bf16), as ``export_merged --dtype float32`` holds it (a bf16 export rounds the merged
weights once more); sharded, the reloaded model is cast (it gives the sharded bf16 logits:
``reloaded_vs_trained``). An event's change is bounded by ``BF16_EVENT`` there (2^-8, one bf16
ulp of the logits, relative), not 1e-5: a bf16 forward rounds the sum of the base product and
the adapter's, and an event that moves pairs from the adapter into the exact log changes that
sum in its last fp32 bits, which can flip a bf16 ulp of an activation; the flips of two layers
reach 1.5e-3 of the logits on Gemma 2 (one process). A sharded cell's first loss is the
one-process cell's: equal in fp32 and nf4, within 2^-7 relative in bf16 (each process's loss
over its rows is rounded to bf16 before the mean).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf

import lrx
from lrx.adapter import export_peft
from lrx.build import Adapters
from lrx.checkpoint import save_final_adapter
from lrx.config import QUICKSTART, load_config
from lrx.distributed import ModelSpec, SingleDevice, Timeouts, build_backend
from lrx.eigenbasis import build_basis
from lrx.errors import ConfigError, LrxError
from lrx.export import merge_into_linears
from lrx.methods import available_methods, build_method
from lrx.quant import Quantizer, QuantSettings

DECODER = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
MOE = dict(DECODER, num_experts_per_tok=2)
# No dropout: every backend then trains the same function (a rank draws other masks than one process).
ENCODER = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# family -> (config class name, its settings, task); a class this transformers lacks is skipped.
FAMILIES = {
    "Llama": ("LlamaConfig", DECODER, "causal_lm"),
    "Mistral": ("MistralConfig", DECODER, "causal_lm"),
    "Qwen2": ("Qwen2Config", DECODER, "causal_lm"),
    "Qwen3": ("Qwen3Config", DECODER, "causal_lm"),
    "Qwen3-MoE": ("Qwen3MoeConfig", dict(MOE, moe_intermediate_size=16, num_experts=4), "causal_lm"),
    "Mixtral": ("MixtralConfig", dict(MOE, intermediate_size=16, num_local_experts=4), "causal_lm"),
    "GPT-OSS": ("GptOssConfig", dict(MOE, intermediate_size=16, num_local_experts=4,
                                     layer_types=["full_attention"] * 2), "causal_lm"),
    "Gemma 2": ("Gemma2Config", DECODER, "causal_lm"),
    "Gemma 3 (text)": ("Gemma3TextConfig", DECODER, "causal_lm"),
    "Phi-3": ("Phi3Config", dict(DECODER, pad_token_id=0), "causal_lm"),
    "GPT-2": ("GPT2Config", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64), "causal_lm"),
    "BERT": ("BertConfig", ENCODER, "classification"),
    "RoBERTa": ("RobertaConfig", dict(ENCODER, pad_token_id=1), "classification"),
    "DeBERTa-v2": ("DebertaV2Config", ENCODER, "classification"),
}
BASES = ("fp32", "bf16", "nf4")
BACKENDS = {"single": "one process", "fsdp2": "FSDP2", "zero3": "ZeRO-3"}  # README's columns, in this order
SHARDED = ("fsdp2", "zero3")
PROCESSES = 2  # of each sharded backend
STEPS, EVENT_STEPS = 4, (2, 4)
BF16_EVENT = 2**-8  # the most an SRLoRA event may change a bf16 base's logits (relative): see above
ROWS, SEQ = 4, 24  # the batch: quick-start examples x characters


_BUILT: dict[str, torch.nn.Module] = {}


def build_model(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A copy of the family's tiny model (built once per process: random init is the slow part)."""
    if family not in _BUILT:
        name, settings, task = FAMILIES[family]
        auto = tf.AutoModelForCausalLM if task == "causal_lm" else tf.AutoModelForSequenceClassification
        torch.manual_seed(0)
        _BUILT[family] = auto.from_config(getattr(tf, name)(**settings)).eval()
    return copy.deepcopy(_BUILT[family]).to(dtype)


def batch(family: str) -> dict[str, torch.Tensor]:
    """The quick-start set's first ``ROWS`` training examples as the tiny models read them: prompt
    and response as characters (ids: code points, 127 for those above the 128-id vocabulary), the
    first ``SEQ`` of each; a classifier's label: the prompt is a question."""
    lines = (Path(QUICKSTART) / "train.jsonl").read_text(encoding="utf-8").splitlines()[:ROWS]
    examples = [json.loads(line) for line in lines]
    ids = torch.tensor([[min(ord(c), 127) for c in f"{e['prompt']} {e['response']}"[:SEQ]] for e in examples])
    causal = FAMILIES[family][2] == "causal_lm"
    labels = ids if causal else torch.tensor([int(e["prompt"].rstrip().endswith("?")) for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def method_overrides(family: str, method: str, basis_dir: Path) -> list[str]:
    common = ["method.r=4", "method.target_modules=[all-linear]"]
    if method == "srlora":
        return [*common, "method.r_target=8", "method.gamma=0.5", f"method.interval={EVENT_STEPS[0]}"]
    if method == "eigenlorax":
        return ["method.r=4", f"method.basis={eigenbasis(family, basis_dir)}"]
    return common


def eigenbasis(family: str, root: Path) -> Path:
    """A basis for ``family`` from three random LoRA adapters on all linear layers (built once)."""
    out = root / family.replace(" ", "_") / "basis"
    if not out.is_dir():
        sources = []
        for seed in range(3):
            model = build_model(family)
            method = build_method(load_config(None, ["method.r=4", "method.target_modules=[all-linear]"]).method)
            Adapters(method, seed).adapt(model)  # seeded: the same basis whichever cells ran before
            with torch.no_grad():
                g = torch.Generator().manual_seed(seed)
                for _, p in method.trainable_parameters(model):
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
            sources.append(export_peft(out.parent / f"src{seed}", model, method))
        build_basis(sources, out, k=6, augment=2)
    return out


@dataclass
class Built:
    """One cell's model as a run holds it: placed by the backend, with its optimizer."""

    backend: object
    model: torch.nn.Module
    method: object
    run: torch.nn.Module  # what the forward is called on (ZeRO-3: the engine)
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list[torch.Tensor]


def adapt(backend, family: str, method_name: str, base: str, basis_dir: Path) -> Built:
    """The family's tiny model adapted, placed and attached as a run on ``backend`` builds it."""
    dtype = torch.bfloat16 if base == "bf16" else torch.float32
    built = build_model(family, dtype)
    cfg = load_config(None, method_overrides(family, method_name, basis_dir), method=method_name).method
    method = build_method(cfg)
    quantizer = Quantizer(QuantSettings.for_processes("nf4", world_size=backend.world_size)) if base == "nf4" else None
    model = backend.build(ModelSpec(lambda meta: built, dtype=dtype), Adapters(method, 0, None, quantizer))
    params = [p for _, p in method.trainable_parameters(model)]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run = backend.setup(model, optimizer, scheduler, micro_batch=ROWS // backend.world_size, grad_accum=1,
                        max_grad_norm=0.0)
    method.attach(model, backend.shards())
    return Built(backend, model, method, run, optimizer, scheduler, params)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def logits(built: Built, data: dict) -> torch.Tensor:
    """The whole batch's logits in eval mode (every process computes them: a collective when sharded;
    there with gradients on, after which FSDP2 reshards the root, as a no-grad forward does not)."""
    built.model.eval()
    with torch.set_grad_enabled(built.backend.world_size > 1):
        return built.run(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.detach()


def train(built: Built, data: dict) -> tuple[list[float], list[float]]:
    """``STEPS`` Adam steps calling the method's hooks as the trainer does, each process on its
    rows of ``data``; returns the losses (averaged over processes) and each event's relative
    change of the logits of ``data``."""
    backend, model, method = built.backend, built.model, built.method
    rank, world = backend.rank, backend.world_size
    mine = {k: v[rank * ROWS // world:(rank + 1) * ROWS // world] for k, v in data.items()}
    method.on_train_start(model, built.optimizer, total_steps=STEPS)
    losses, changes = [], []
    for step in range(1, STEPS + 1):
        model.train()
        loss = built.run(**mine).loss
        backend.backward(loss)
        method.after_backward(model, step - 1)
        backend.step(built.optimizer, built.scheduler, built.params, 0.0)
        before = logits(built, data) if step in EVENT_STEPS else None
        if method.after_optimizer_step(model, built.optimizer, step):
            changes.append(rel(logits(built, data), before) if before is not None else float("inf"))
        losses.append(backend.all_reduce_sum(loss.detach().float().clone()).item() / world)
    return losses, changes


def merged_logits(family: str, model, data: dict) -> torch.Tensor:
    """The logits of ``model`` merged in place (``merge_into_linears``): a plain transformers model
    of the family again, with the original's modules and state-dict keys (checked)."""
    merge_into_linears(model)
    lrx_modules = [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("lrx.")]
    if lrx_modules or set(model.state_dict()) != set(_BUILT[family].state_dict()):
        raise AssertionError(f"{family}: the merged model is not plain ({lrx_modules[:3]}, keys differ)")
    with torch.no_grad():
        return model.eval()(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


def exported(built: Built, family: str, base: str, data: dict, folder: Path) -> dict:
    """A sharded cell's export: the adapter saved as a run's final save does (every process), then on
    the first process merged onto a freshly built base; the measurements (first process) or {}."""
    trained = logits(built, data)
    task = FAMILIES[family][2]
    meta = {"base_model": None, "task": task, "num_labels": 0 if task == "causal_lm" else 2,
            "model_dtype": "bfloat16" if base == "bf16" else "float32",
            "quantize": QuantSettings.for_processes("nf4", world_size=built.backend.world_size).to_dict() if base == "nf4" else None}
    path = folder / "adapter"
    save_final_adapter(path, built.model, built.method, meta, built.backend.gather, built.backend.is_main)
    if not built.backend.is_main:
        return {}
    reloaded = lrx.load(path, build_model(family, torch.bfloat16 if base == "bf16" else torch.float32)).model.eval()
    with torch.no_grad():
        again = reloaded(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        out = {"reloaded_vs_trained": rel(again, trained)}
        if base == "bf16":  # the trained function computed in fp32 (bf16 -> fp32 is exact), as a float32 export holds it
            trained = reloaded.float()(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return {**out, "merged_vs_trained": rel(merged_logits(family, reloaded, data), trained)}


def cell(family: str, method_name: str, base: str, basis_dir: Path, backend=None) -> dict:
    """One cell on ``backend`` (one process when None): ``{"status": "ok", ...measurements}``,
    ``{"status": "refused", "why": line}`` or ``{"status": "error", "why": line}``."""
    backend = backend or SingleDevice("cpu")
    torch.manual_seed(0)  # a cell does not depend on the cells before it
    try:
        built = adapt(backend, family, method_name, base, basis_dir)
    except (ConfigError, LrxError) as e:
        return {"status": "refused", "why": str(e)}
    except Exception as e:  # recorded, not raised: the table says which cell broke (the traceback goes to stderr)
        return failed(e)
    try:
        return measured(built, family, base)
    except Exception as e:
        return failed(e)


def failed(error: Exception) -> dict:
    """An unexpected exception as a cell: its type and first line (the traceback on stderr)."""
    traceback.print_exc()
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return {"status": "error", "why": f"{type(error).__name__}: {first}" if first else type(error).__name__}


def measured(built: Built, family: str, base: str) -> dict:
    """A built cell trained, and its export checked: ``{"status": "ok", ...measurements}``."""
    data = batch(family)
    losses, changes = train(built, data)
    result = {"status": "ok", "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
              "events": len(changes), "event_change": max(changes, default=0.0),
              "adapted": len(built.method.layers),
              "experts": sum(getattr(lay, "fused", False) for lay in built.method.layers.values()),
              "quantized_experts": sum(getattr(lay, "fused", False) and lay.quantized for lay in built.method.layers.values())}
    if built.backend.world_size > 1:
        with tempfile.TemporaryDirectory() as tmp:
            return {**result, **exported(built, family, base, data, Path(tmp))}
    if base == "bf16":  # the trained function computed in fp32 (bf16 -> fp32 is exact), as a float32 export holds it
        built.model.float()
    with torch.no_grad():
        trained = logits(built, data)
    return {**result, "merged_vs_trained": rel(merged_logits(family, built.model, data), trained)}


def families() -> list[str]:
    return [f for f in FAMILIES if hasattr(tf, FAMILIES[f][0])]


def all_cells() -> list[tuple[str, str, str]]:
    """Every (family, method, base) of the table, in its order."""
    return [(f, m, b) for f in families() for m in available_methods() for b in BASES]


def run_family(family: str, basis_dir: Path) -> dict[str, dict]:
    """Every cell of ``family`` on one process, by ``method/base``."""
    return {f"{m}/{b}": cell(family, m, b, basis_dir) for m in available_methods() for b in BASES}


def run_sharded(name: str, cells: list[tuple[str, str, str]], basis_dir: Path, rows: Path | None = None) -> dict:
    """The ``cells`` under the backend ``name`` in the processes of this launch, one after another
    with one backend object; returns (on the first process) ``{family: {method/base: cell}}``
    and appends each cell to ``rows`` as a JSON line as soon as it is done."""
    backend = build_backend(name, "cpu", timeouts=Timeouts(collective_s=300, io_s=300))  # a stuck cell ends the launch
    table: dict[str, dict] = {}
    try:
        for family, method, base in cells:
            if method == "eigenlorax":
                with backend.main_first(), contextlib.suppress(LrxError, ConfigError):
                    eigenbasis(family, basis_dir)  # the first process builds it, the others read it; a refusal: the cell's
            start = time.perf_counter()
            result = {**cell(family, method, base, basis_dir, backend), "seconds": round(time.perf_counter() - start, 2)}
            table.setdefault(family, {})[f"{method}/{base}"] = result
            if rows is not None and backend.is_main:
                with rows.open("a") as f:
                    f.write(json.dumps({"family": family, "cell": f"{method}/{base}", **result}) + "\n")
    finally:
        backend.close()
    return table


def launch_sharded(name: str, basis_dir: Path, timeout_s: float = 3600) -> dict:
    """Every cell under ``name`` in one launch of ``PROCESSES`` processes (torchrun, gloo on the CPU)."""
    rows = basis_dir / f"{name}.jsonl"
    rows.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
           str(Path(__file__).resolve()), "--sharded", name, "--rows", str(rows), "--bases", str(basis_dir)]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=timeout_s)
    table: dict[str, dict] = {}
    for line in rows.read_text().splitlines() if rows.is_file() else []:
        row = json.loads(line)
        table.setdefault(row.pop("family"), {})[row.pop("cell")] = row
    if run.returncode or sum(len(c) for c in table.values()) != len(all_cells()):
        raise RuntimeError(f"the {name} launch stopped (exit status {run.returncode}) after "
                         f"{sum(len(c) for c in table.values())} of {len(all_cells())} cells:\n{run.stderr[-4000:]}")
    return table


def note(cells: dict[str, dict], method: str, notes: dict[str, int]) -> str:
    """One table cell: the bases of ``method`` that work, else ``refused``, with the reasons as footnotes."""
    ok = [b for b in BASES if cells.get(f"{method}/{b}", {}).get("status") == "ok"]
    bad = [cells[f"{method}/{b}"] for b in BASES if cells.get(f"{method}/{b}", {}).get("status") in ("refused", "error")]
    why = sorted({c["why"] if c["status"] == "refused" else f"error: {c['why']}" for c in bad})
    refs = "".join(f"[^{notes.setdefault(w, len(notes) + 1)}]" for w in why)
    shown = " ".join(ok) if ok else "refused" if bad and all(c["status"] == "refused" for c in bad) else \
        "error" if bad else "not run"
    return shown + (" " + refs if refs else "")


def markdown(data: dict) -> str:
    """README's table from the JSON ``--write`` writes: one row per family and method, one column
    per backend, the bases that work in each cell (refusals as footnotes)."""
    tables = {"single": data["families"], **data.get("sharded", {})}
    backends = [b for b in BACKENDS if b in tables]
    methods = sorted({key.split("/")[0] for cells in data["families"].values() for key in cells})
    lines = ["| family | method | " + " | ".join(BACKENDS[b] for b in backends) + " |",
             "|---|---|" + "---|" * len(backends)]
    notes: dict[str, int] = {}
    for family in data["families"]:
        for m in methods:
            row = [note(tables[b].get(family, {}), m, notes) for b in backends]
            lines.append(f"| {family} | {m} | " + " | ".join(row) + " |")
    lines += [""] + [f"[^{n}]: {w}" for w, n in notes.items()]
    return "\n".join(lines)


BEGIN, END = "<!-- family-table: written by tools/family_table.py -->", "<!-- /family-table -->"


def with_table(readme: str, table: str) -> str:
    """``readme`` with the text between its family-table markers replaced by ``table``."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError(f"README must hold the lines {BEGIN} and {END} once each, around the family table")
    head, rest = readme.split(BEGIN)
    return f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}"


def write(path: Path, backends: list[str]) -> None:
    """Run the cells of ``backends`` and write the JSON at ``path``, keeping the other backends' cells."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    data = {"transformers": tf.__version__, "torch": torch.__version__, "processes": PROCESSES,
            "families": old.get("families", {}), "sharded": old.get("sharded", {}), "wall_s": old.get("wall_s", {})}
    with tempfile.TemporaryDirectory() as tmp:
        for name in backends:
            start = time.perf_counter()
            if name == "single":
                data["families"] = {f: run_family(f, Path(tmp)) for f in families()}
            else:
                data["sharded"][name] = launch_sharded(name, Path(tmp))
            data["wall_s"][name] = round(time.perf_counter() - start, 1)
            print(f"{name}: {data['wall_s'][name]} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="run the cells and write the JSON here")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="with --write: which columns to run (single,fsdp2,zero3)")
    ap.add_argument("--markdown", type=Path, help="print README's table from this JSON")
    ap.add_argument("--readme", type=Path, help="rewrite this README's family table from the JSON (--write's, else --markdown's)")
    ap.add_argument("--sharded", help="(in a launch) run every cell under this backend, one row per cell to --rows")
    ap.add_argument("--cells", help="with --sharded: only these cells, FAMILY/METHOD/BASE separated by commas")
    ap.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--bases", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    torch.set_num_threads(1)  # tiny models: one thread is the fastest, and the test runs them so too
    if args.sharded:
        cells = [tuple(c.split("/")) for c in args.cells.split(",")] if args.cells else all_cells()
        run_sharded(args.sharded, cells, args.bases, args.rows)
        sys.stdout.flush()
        os._exit(0)  # gloo's threads can abort a CPU process in interpreter finalization
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"--backends: {', '.join(sorted(unknown))} unknown; use some of {', '.join(BACKENDS)}")
    if args.write:
        write(args.write, [b for b in BACKENDS if b in args.backends.split(",")])
    source = args.write or args.markdown
    if source and args.readme:
        args.readme.write_text(with_table(args.readme.read_text(), markdown(json.loads(source.read_text()))))
    elif args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))


if __name__ == "__main__":
    main()
