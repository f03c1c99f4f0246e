"""Peak host memory of building an nf4 base from a folder stored in nf4 against a bf16 folder.

    python tools/mem_prequantized.py [--hidden 1024 --layers 8 --vocab 32000]

Saves a random Llama (0.2B by default) in bf16 and, through transformers + bitsandbytes (``BitsAndBytesConfig``
nf4, double quantization), as a pre-quantized folder, in a temporary folder. Then, each in its
own process: the pre-quantized folder read as stored (``load_model`` + ``StoredQuantizer``) and
the bf16 folder loaded and quantized (``load_model`` + ``Quantizer``), both followed by one
forward (safetensors tensors are memory-mapped: the forward makes every page resident). Prints
each process's peak RSS (ru_maxrss) after loading and after the forward, and after its imports.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
import resource, sys, time
import torch
from lrx.models import load_model, stored_quantization
from lrx.prequant import StoredQuantizer
from lrx.quant import Quantizer, QuantSettings

rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
kind, folder = sys.argv[1], sys.argv[2]
before, t = rss(), time.perf_counter()
model = load_model(folder, task="causal_lm", dtype="bfloat16")
quantizer = (StoredQuantizer(stored_quantization(folder), folder) if kind == "prequantized"
             else Quantizer(QuantSettings("nf4", True)))
quantizer.plan(model, [])
n = quantizer.apply(model)
loaded, seconds = rss(), time.perf_counter() - t
with torch.no_grad():
    model(input_ids=torch.ones(1, 8, dtype=torch.long))
print(f"{kind:12s} {n} linears nf4 in {seconds:.1f} s; peak RSS after imports {before:.0f} MiB, "
      f"after loading {loaded:.0f} MiB, after one forward {rss():.0f} MiB")
"""


def make(root: Path, hidden: int, layers: int, vocab: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(root / "bf16")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(root / "bf16", quantization_config=nf4, device_map="cpu",
                                         dtype=torch.bfloat16).save_pretrained(root / "nf4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--make", help=argparse.SUPPRESS)  # the child that saves the folders
    args = parser.parse_args()
    if args.make:
        make(Path(args.make), args.hidden, args.layers, args.vocab)
        return
    # Each step in its own process: Linux keeps a process's peak RSS across exec, so this one stays small.
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, __file__, "--make", tmp, "--hidden", str(args.hidden), "--layers",
                        str(args.layers), "--vocab", str(args.vocab)], check=True, stderr=subprocess.DEVNULL)
        for kind, folder in (("prequantized", root / "nf4"), ("bf16", root / "bf16")):
            subprocess.run([sys.executable, "-c", MEASURE, kind, str(folder)], check=True)


if __name__ == "__main__":
    main()
