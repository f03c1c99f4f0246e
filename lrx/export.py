"""Merged export: ``W0 + edits + scale * B A`` written as a plain transformers checkpoint.

    python tools/export_merged.py runs/my-run/adapter OUT [--dtype bfloat16]

Loads the base model the adapter names (or ``--base``), restores the adapter exactly
(``lrx.adapter.load_adapter``), folds every adapted layer into its base weight in fp32,
replaces each ``AdaptedLinear`` by a plain ``nn.Linear`` and saves with
``save_pretrained`` (sharded safetensors + ``model.safetensors.index.json``, config,
tokenizer). The result opens with ``AutoModelFor*.from_pretrained`` and no lrx or peft.

This version materialises the whole model in the exporting process; streaming one shard at
a time for billion-parameter models is issue 7's work.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from lrx.adapter import load_adapter, read_adapter_config
from lrx.errors import LrxError
from lrx.methods import adapted_layers
from lrx.models import load_model, load_tokenizer

log = logging.getLogger(__name__)


@torch.no_grad()
def merge_into_linears(model: nn.Module) -> int:
    """Fold every adapted layer (edits and adapter) into its base in fp32 and unwrap it.

    Returns:
        The number of layers merged.
    """
    layers = list(adapted_layers(model))
    for name, layer in layers:
        base = layer.base
        weight = base.weight.detach().float()
        if not layer.fold_edits:
            weight = weight + layer.edits_weight()
        weight = weight + layer.adapter_weight()
        base.weight.copy_(weight.to(base.weight.dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    return len(layers)


def export_merged(adapter_dir: str | Path, out: str | Path, *, base: str | None = None,
                  dtype: str = "float32", max_shard_size: str = "2GB") -> Path:
    """Write the merged model of an lrx adapter as a transformers checkpoint.

    Args:
        adapter_dir: an lrx adapter folder (``runs/NAME/adapter``).
        out: output folder; refused if it already holds a model.
        base: base model name or folder; default: the one recorded in the adapter.
        dtype: dtype of the written weights (``float32`` or ``bfloat16``); merging is fp32.
        max_shard_size: safetensors shard size (transformers' format).

    Raises:
        LrxError: missing/corrupt adapter, unknown base, existing output.
    """
    out = Path(out)
    if (out / "config.json").exists():
        raise LrxError(f"{out} already holds a model; choose another output folder")
    config = read_adapter_config(adapter_dir)
    name = base or config.get("base_model")
    if not name:
        raise LrxError(f"{adapter_dir}: no base model recorded; pass --base")
    gguf = None if base else config.get("gguf_file")
    tokenizer = load_tokenizer(config.get("tokenizer") or name, None if config.get("tokenizer") else gguf)
    task = config.get("task", "causal_lm")
    model = load_model(name, task=task, num_labels=max(config.get("num_labels") or 2, 1), gguf_file=gguf,
                       vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    load_adapter(adapter_dir, model)
    n = merge_into_linears(model)
    model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    log.info("merged %d layers of %s into %s", n, name, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/export_merged.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="lrx adapter folder (runs/NAME/adapter)")
    parser.add_argument("out", help="output folder for the merged transformers checkpoint")
    parser.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-shard-size", default="2GB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        path = export_merged(args.adapter, args.out, base=args.base, dtype=args.dtype,
                             max_shard_size=args.max_shard_size)
    except LrxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (open with transformers' from_pretrained)")
    return 0
