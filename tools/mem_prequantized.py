"""Peak host memory of building an nf4 base from a folder stored in nf4 against a bf16 folder.

    python tools/mem_prequantized.py [--hidden 1024 --layers 8 --vocab 32000] [--backend fsdp2|zero3]

Saves a random Llama (0.2B by default) in bf16 and, through transformers + bitsandbytes (``BitsAndBytesConfig``
nf4, double quantization), as a pre-quantized folder, in a temporary folder. Then, each in its
own process: the pre-quantized folder read as stored (``load_model`` + ``StoredQuantizer``) and
the bf16 folder loaded and quantized (``load_model`` + ``Quantizer``), both followed by one
forward (safetensors tensors are memory-mapped: the forward makes every page resident). Prints
each process's peak RSS (ru_maxrss) after loading and after the forward, and after its imports.

``--backend fsdp2`` / ``zero3``: each folder built by that backend's ``build`` as a run builds it
(``lrx.runner.model_spec``, ``lrx.build.Adapters`` with lora r=4 on every linear, CPU, gloo) in
``--processes`` processes under torchrun: the stored folder streamed block by block, the bf16
folder streamed and quantized (FSDP2: block by block; ZeRO-3: transformers' ``zero.Init`` load,
quantized one gathered layer at a time). Every process prints its peak RSS after the build.
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

SHARDED = """
import os, resource, sys, time
import torch
from lrx.build import Adapters
from lrx.config import load_config
from lrx.distributed import build_backend
from lrx.methods import build_method
from lrx.models import take_stored_quantization
from lrx.prequant import StoredQuantizer
from lrx.quant import Quantizer
from lrx.runner import model_spec, quant_settings

rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
kind, folder, name, vocab = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = load_config(None, [f"model.name_or_path={folder}", "model.dtype=bfloat16", "method.r=4",
                            "method.target_modules=[all-linear]", f"distributed.backend={name}",
                            *(["model.quantize=nf4"] if kind == "bf16" else [])], method="lora")
take_stored_quantization(config.model)
backend = build_backend(name, "cpu")
before, t = rss(), time.perf_counter()
settings = quant_settings(config)
quantizer = (StoredQuantizer(settings, folder, backend.device) if config.model.quantize_stored
             else Quantizer(settings, backend.device))


class Vocabulary:  # what model_spec reads of a tokenizer (the folders have none)
    pad_token_id = 0

    def __len__(self):
        return vocab


model = backend.build(model_spec(config, "causal_lm", 1, Vocabulary()), Adapters(build_method(config.method), 0, None,
                                                                               quantizer, load=backend.load_whole))
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
now = {k: int(status[k].split()[0]) / 2**10 for k in ("RssAnon", "RssFile")}  # file: pages of the mapped safetensors
print(f"{kind:12s} {name} rank {backend.rank}: built in {time.perf_counter() - t:.1f} s; peak RSS after imports "
      f"{before:.0f} MiB, after the build {rss():.0f} MiB (resident now: {now['RssAnon']:.0f} MiB anonymous, "
      f"{now['RssFile']:.0f} MiB of files)", flush=True)
backend.close()
"""


def sharded(root: Path, backend: str, processes: int, vocab: int) -> None:
    """Each folder built by ``backend`` in ``processes`` processes (torchrun, gloo): each prints its peak RSS."""
    import os

    script = root / "measure_sharded.py"
    script.write_text(SHARDED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for kind, folder in (("prequantized", root / "nf4"), ("bf16", root / "bf16")):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                        str(script), kind, str(folder), backend, str(vocab)], check=True, env=env,
                       stderr=subprocess.DEVNULL)


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
    parser.add_argument("--backend", choices=("single", "fsdp2", "zero3"), default="single",
                        help="build each folder with this backend (fsdp2, zero3: under torchrun, gloo)")
    parser.add_argument("--processes", type=int, default=2, help="processes of --backend fsdp2 / zero3")
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
        if args.backend != "single":
            sharded(root, args.backend, args.processes, args.vocab)
            return
        for kind, folder in (("prequantized", root / "nf4"), ("bf16", root / "bf16")):
            subprocess.run([sys.executable, "-c", MEASURE, kind, str(folder)], check=True)


if __name__ == "__main__":
    main()
