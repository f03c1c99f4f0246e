"""accelerate's FSDP2 plugin on one GPU: a transformers Trainer with ``lrx.hf.LrxCallback`` on
the model accelerate really sharded (``fully_shard`` makes DTensor parameters on one process
too), under bf16 mixed precision as the plugin applies it, against the same run in one plain
process (bf16 autocast).

    python tests/hf_gpu.py OUT          # needs a CUDA GPU, torch, transformers, accelerate; ~30 s

runs the one-process reference here, then
``accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1
--mixed_precision bf16 tests/hf_gpu.py OUT --launched``, writes ``OUT/verdict.json`` and exits 1
if a check failed. It needs no trl, datasets, deepspeed or bitsandbytes: a tiny random Llama
(built from its config, seeded) trains 6 steps on seeded random tokens; SRLoRA makes 2 events.
``--device cpu`` runs the same on CPU (accelerate then does not shard: the plumbing only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # lrx from this checkout when launched as a script

import torch  # noqa: E402
from torch.utils.data import Dataset, SequentialSampler  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import lrx  # noqa: E402
from lrx.errors import ConfigError  # noqa: E402
from lrx.hf import LrxCallback  # noqa: E402

STEPS, BATCH, SEQ, VOCAB = 6, 4, 32, 128
METHOD = {"r": 4, "r_target": 8, "gamma": 0.5, "interval": 2, "target_modules": ["q_proj", "v_proj"]}
PROBE = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))


class Tokens(Dataset):
    """``STEPS * BATCH`` rows of seeded random tokens (labels = inputs)."""

    def __init__(self):
        self.ids = torch.randint(0, VOCAB, (STEPS * BATCH, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long)}


class Recording(Trainer):
    """Rows in order (any transformers version), each step's exact loss."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        self.losses.append(loss.item())
        return loss


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


def train(out: Path, device: str) -> dict:
    """The run: wrapped, trained with the callback; every event's relative change of the logits on
    ``PROBE`` (the prepared model's forward); saved; ``merge()`` tried."""
    model = tiny_llama()
    adapter = lrx.wrap(model, "srlora", seed=0, **METHOD)
    args = TrainingArguments(str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-3,
                             lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
                             save_strategy="no", logging_steps=1, report_to=[], use_cpu=device == "cpu",
                             bf16=device != "cpu", seed=0, disable_tqdm=True)
    callback = LrxCallback()
    trainer = Recording(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.losses, invariance = [], []
    recompose = adapter.method.recompose

    def logits():
        return trainer.model_wrapped(input_ids=PROBE.to(trainer.args.device)).logits.detach().double()

    def watched(optimizer, step):
        before = logits()
        records = recompose(optimizer, step)
        after = logits()
        invariance.append(((after - before).norm() / before.norm()).item())
        return records

    adapter.method.recompose = watched
    trainer.train()
    adapter.save(out / "adapter")
    try:
        adapter.merge()
        merge = "merged"
    except ConfigError as e:
        merge = str(e)
    dtensors = sum(hasattr(p, "device_mesh") for p in adapter.model.parameters())
    return {"losses": trainer.losses, "events": callback.events, "invariance": invariance, "merge": merge,
            "kind": callback.placement.kind, "world_size": callback.placement.world_size, "dtensors": dtensors,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "mixed_precision": str(trainer.accelerator.mixed_precision)}


def verdict(one: dict, sharded: dict, device: str) -> dict:
    """What must hold, each check by name, and the numbers behind them."""
    pairs = [(e["step"], e["layer"]) for e in sharded["events"]]
    same_pairs = sum(a["fused_pairs"] == b["fused_pairs"] for a, b in zip(one["events"], sharded["events"]))
    loss_diff = max(abs(a - b) for a, b in zip(one["losses"], sharded["losses"]))
    checks = {
        "fsdp2": device == "cpu" or (sharded["kind"], sharded["dtensors"] > 0) == ("fsdp2", True),
        "bf16_mixed_precision": device == "cpu" or sharded["mixed_precision"] == "bf16",
        "events_as_one_process": pairs == [(e["step"], e["layer"]) for e in one["events"]] and len(pairs) == 8,
        "fusion_error": 0 < max(e["fusion_error"] for e in sharded["events"]) <= 1e-6,  # fp32 shards, folded
        "output_kept_at_events": len(sharded["invariance"]) == 2 and max(sharded["invariance"]) <= 5e-2,
        "losses_as_one_process": len(sharded["losses"]) == STEPS and loss_diff <= 1e-2 * max(one["losses"]),
        "merge_refused": device == "cpu" or sharded["merge"].startswith("merge() needs the whole model"),
    }
    return {"ok": all(checks.values()), "checks": checks, "max_loss_diff": loss_diff,
            "events_with_the_same_fused_pairs": f"{same_pairs} of {len(pairs)}",
            "invariance": {"one_process": one["invariance"], "fsdp2": sharded["invariance"]},
            "max_fusion_error": max(e["fusion_error"] for e in sharded["events"]),
            "one_process": {k: v for k, v in one.items() if k != "events"},
            "fsdp2": {k: v for k, v in sharded.items() if k != "events"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--launched", action="store_true", help="(the run under accelerate launch)")
    args = parser.parse_args()
    if args.launched:
        report = train(args.out / "fsdp2", args.device)
        if int(os.environ.get("RANK", "0")) == 0:
            (args.out / "fsdp2.json").write_text(json.dumps(report))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    one = train(args.out / "one", args.device)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "1", "--mixed_precision",
               "bf16" if args.device != "cpu" else "no", *(["--cpu"] if args.device == "cpu" else []),
               str(Path(__file__).resolve()), str(args.out), "--launched", "--device", args.device]
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        print(json.dumps({"ok": False, "launch_returncode": proc.returncode}))
        return 1
    result = verdict(one, json.loads((args.out / "fsdp2.json").read_text()), args.device)
    (args.out / "verdict.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
