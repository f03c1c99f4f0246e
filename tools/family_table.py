"""Which model families work with which method and base: the conformance table in README.

    python tools/family_table.py --write benchmarks/families.json   # run every cell (CPU, ~1 min)
    python tools/family_table.py --markdown benchmarks/families.json # README's table from it

Every family is a tiny random model built from transformers' own config class (2 layers,
hidden 32), adapted with ``method.target_modules=[all-linear]`` at r=4 on one process, for
every method and base (fp32, bf16, nf4 through ``lrx.quant``). A cell is ``ok`` when: the
model trains 4 Adam steps on a fixed batch and its loss falls; SRLoRA's events (at steps 2
and 4) leave that batch's logits unchanged (relative 1e-5; bf16: 1e-3, below); merged in place
(``merge_into_linears``) it is a plain transformers model again (no lrx module, the original's
state-dict keys) and gives the trained model's logits (relative 1e-5). A cell that cannot work
is ``refused`` with lrx's one-line error, raised while the model is adapted, before training.
``tests/test_families.py`` runs the cells and checks them against the JSON this writes.

bf16 bases: the merged model is compared in fp32 with the trained model cast to fp32 (exact
from bf16), as ``export_merged --dtype float32`` holds it (a bf16 export rounds the merged
weights once more); an event's change is bounded by 1e-3 there, not 1e-5: a bf16 forward
rounds the sum of the base product and the adapter's, and an event that moves pairs from the
adapter into the exact log changes that sum in its last fp32 bits, which can flip a bf16 ulp.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
import transformers as tf

from lrx.adapter import export_peft
from lrx.build import Adapters
from lrx.config import load_config
from lrx.eigenbasis import build_basis
from lrx.errors import ConfigError, LrxError
from lrx.export import merge_into_linears
from lrx.methods import LocalShards, LocalWeights, available_methods, build_method
from lrx.quant import Quantizer, QuantSettings

DECODER = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
MOE = dict(DECODER, num_experts_per_tok=2)
ENCODER = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, num_labels=2)
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
STEPS, EVENT_STEPS = 4, (2, 4)


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
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (4, 12), generator=g)
    labels = ids if FAMILIES[family][2] == "causal_lm" else torch.randint(0, 2, (4,), generator=g)
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
            Adapters(method).adapt(model)
            with torch.no_grad():
                g = torch.Generator().manual_seed(seed)
                for _, p in method.trainable_parameters(model):
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
            sources.append(export_peft(out.parent / f"src{seed}", model, method))
        build_basis(sources, out, k=6, augment=2)
    return out


def adapt(family: str, method_name: str, base: str, basis_dir: Path):
    """``(model, method)``: the family's tiny model adapted as a one-process run builds it."""
    model = build_model(family, torch.bfloat16 if base == "bf16" else torch.float32)
    cfg = load_config(None, method_overrides(family, method_name, basis_dir), method=method_name).method
    method = build_method(cfg)
    adapters = Adapters(method, 0, None, Quantizer(QuantSettings("nf4")) if base == "nf4" else None)
    adapters.wrap(model)
    adapters.init(model, LocalWeights())
    method.attach(model, LocalShards())
    return model, method


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def train(model, method, data: dict) -> tuple[list[float], list[float]]:
    """``STEPS`` Adam steps calling the method's hooks as the trainer does; returns the losses and
    each event's relative change of the logits of ``data`` (in eval mode)."""
    params = [p for _, p in method.trainable_parameters(model)]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    method.on_train_start(model, optimizer, total_steps=STEPS)
    losses, changes = [], []
    for step in range(1, STEPS + 1):
        model.train()
        loss = model(**data).loss
        loss.backward()
        method.after_backward(model, step - 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            before = model(**data).logits if step in EVENT_STEPS else None
            if method.after_optimizer_step(model, optimizer, step):
                changes.append(rel(model(**data).logits, before) if before is not None else float("inf"))
        losses.append(loss.item())
    return losses, changes


def merged_logits(family: str, model, data: dict) -> torch.Tensor:
    """The logits of ``model`` merged in place (``merge_into_linears``): a plain transformers model
    of the family again, with the original's modules and state-dict keys (checked)."""
    merge_into_linears(model)
    lrx_modules = [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("lrx.")]
    if lrx_modules or set(model.state_dict()) != set(_BUILT[family].state_dict()):
        raise AssertionError(f"{family}: the merged model is not plain ({lrx_modules[:3]}, keys differ)")
    with torch.no_grad():
        return model(**data).logits


def cell(family: str, method_name: str, base: str, basis_dir: Path) -> dict:
    """One cell: ``{"status": "ok", ...measurements}`` or ``{"status": "refused", "why": line}``."""
    try:
        model, method = adapt(family, method_name, base, basis_dir)
    except (ConfigError, LrxError) as e:
        return {"status": "refused", "why": str(e)}
    data = batch(family)
    losses, changes = train(model, method, data)
    if base == "bf16":  # the trained function computed in fp32 (bf16 -> fp32 is exact), as a float32 export holds it
        model.float()
    with torch.no_grad():
        trained = model(**data).logits
    result = {"status": "ok", "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
              "events": len(changes), "event_change": max(changes, default=0.0),
              "merged_vs_trained": rel(merged_logits(family, model, data), trained),
              "adapted": len(method.layers), "experts": sum(getattr(lay, "fused", False) for lay in method.layers.values())}
    return result


def families() -> list[str]:
    return [f for f in FAMILIES if hasattr(tf, FAMILIES[f][0])]


def run_family(family: str, basis_dir: Path) -> dict[str, dict]:
    return {f"{m}/{b}": cell(family, m, b, basis_dir) for m in available_methods() for b in BASES}


def markdown(table: dict[str, dict[str, dict]]) -> str:
    """README's table: one row per family, one column per method, the bases in each cell."""
    methods = sorted({key.split("/")[0] for cells in table.values() for key in cells})
    lines = ["| family | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    notes: dict[str, int] = {}
    for family, cells in table.items():
        row = []
        for m in methods:
            ok = [b for b in BASES if cells.get(f"{m}/{b}", {}).get("status") == "ok"]
            why = {cells[f"{m}/{b}"]["why"] for b in BASES if cells.get(f"{m}/{b}", {}).get("status") == "refused"}
            refs = "".join(f"[^{notes.setdefault(w, len(notes) + 1)}]" for w in sorted(why))
            row.append((" ".join(ok) if ok else "refused") + (" " + refs if refs else ""))
        lines.append(f"| {family} | " + " | ".join(row) + " |")
    lines += [""] + [f"[^{n}]: {w}" for w, n in notes.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="run every cell and write the JSON here")
    ap.add_argument("--markdown", type=Path, help="print README's table from this JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is the fastest, and the test runs them so too
    if args.write:
        with tempfile.TemporaryDirectory() as tmp:
            table = {f: run_family(f, Path(tmp)) for f in families()}
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps({"transformers": tf.__version__, "torch": torch.__version__,
                                          "families": table}, indent=1) + "\n")
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())["families"]))


if __name__ == "__main__":
    main()
