"""SRLoRA in a TRL SFTTrainer script: `python examples/sft_srlora.py`, or on several GPUs
`accelerate launch --config_file configs/accelerate/fsdp2.yaml examples/sft_srlora.py`."""

import argparse

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import lrx
from lrx.hf import LrxCallback

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
parser.add_argument("--data", default="configs/data/quickstart/train.jsonl")  # {"prompt": ..., "response": ...}
parser.add_argument("--output_dir", default="runs/sft-srlora")
parser.add_argument("--max_steps", type=int, default=200)
parser.add_argument("--batch_size", type=int, default=8)
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.model)
data = load_dataset("json", data_files=args.data, split="train").rename_column("response", "completion")
adapter = lrx.wrap(model, "srlora", r=8, r_target=24, target_modules=["all-linear"])
trainer = SFTTrainer(model=model, processing_class=AutoTokenizer.from_pretrained(args.model), train_dataset=data,
                     args=SFTConfig(args.output_dir, max_steps=args.max_steps, learning_rate=2e-4,
                                     per_device_train_batch_size=args.batch_size,
                                     bf16=torch.cuda.is_available(), report_to=[]),
                     callbacks=[LrxCallback()])
trainer.train()
adapter.save(f"{args.output_dir}/adapter", peft=f"{args.output_dir}/adapter_peft")  # every process: gathers shards
