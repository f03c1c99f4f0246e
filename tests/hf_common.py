"""What the Trainer tests (``tests/test_hf.py``) and their launched script
(``tests/hf_accelerate.py``) share: one run's settings for lrx's command line and the same run
as a transformers Trainer with ``lrx.hf.LrxCallback``."""

from __future__ import annotations

import contextlib

import torch
from transformers import Trainer, TrainingArguments

import lrx
from lrx.config import load_config
from lrx.data import build_datasets
from lrx.hf import LrxCallback
from lrx.models import load_tokenizer
from lrx.runner import model_spec
from lrx.trainer import ShardedBatches
from tests.conftest import QUICKSTART

STEPS, BATCH = 6, 4
METHOD = {"r": 4, "r_target": 8, "gamma": 0.5, "interval": 2, "target_modules": ["q_proj", "v_proj"]}
SETTINGS = [
    "model.name_or_path=tiny-llama", "data.format=instruct", f"data.train_path={QUICKSTART / 'train.jsonl'}",
    "data.max_train_samples=32", "data.max_length=64", f"train.max_steps={STEPS}", f"train.batch_size={BATCH}",
    "train.log_every=1", "train.lr=1e-3", "train.max_grad_norm=0", "logging.progress=false",
    "logging.tensorboard=false", "data.max_eval_samples=4", "train.eval_at_start=false",
    "method.r=4", "method.r_target=8", "method.gamma=0.5", "method.interval=2",
]


class Recording(Trainer):
    """A Trainer that keeps each step's exact loss (its log rounds to 4 digits)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses.append(loss.item())
        self.rows.extend(ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]))
        return loss


def base_model(tokenizer=None):
    """The model lrx's command line builds for ``SETTINGS`` (same seed, same construction)."""
    config = load_config(None, SETTINGS, method="srlora")
    tokenizer = tokenizer or load_tokenizer("tiny-llama")
    return model_spec(config, "causal_lm", 0, tokenizer).construct(False)


def hf_trainer(out, resume: str | None = None, rank: int = 0, world: int = 1, main_first=contextlib.nullcontext,
               save_steps=3, use_cpu: bool = True, bf16: bool = False, dtype: torch.dtype = torch.float32,
               quantize: str = "none", before_train=None, steps: int = STEPS, batch: int = BATCH):
    """The Trainer run of ``SETTINGS``: the same model, adapters, batches (lrx's order; with
    ``world`` processes accelerate gives process ``rank`` its slice of each step's batch, which
    ``expected_rows`` holds: lrx's ``ShardedBatches``) and optimizer; trained, resumed from ``resume`` if given.
    ``bf16``: the Trainer's bf16 mixed precision; ``dtype``: the base's; ``quantize``: ``lrx.wrap``'s;
    ``before_train(trainer, adapter)`` is called before training; ``steps``, ``batch``: a shorter run
    (the events come at steps 2 and 4)."""
    config = load_config(None, SETTINGS, method="srlora")
    tokenizer = load_tokenizer("tiny-llama")
    data = build_datasets(config.data, tokenizer, seed=0, main_process_first=main_first)
    model = base_model(tokenizer).to(dtype)
    adapter = lrx.wrap(model, "srlora", seed=0, quantize=quantize, **METHOD)
    order = [i for rows in ShardedBatches(len(data.train), batch, 0) for i in rows][: steps * batch]
    mine = [i for rows in ShardedBatches(len(data.train), batch // world, 0, rank, world) for i in rows]
    args = TrainingArguments(
        str(out), max_steps=steps, per_device_train_batch_size=batch // world, learning_rate=1e-3,
        lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
        train_sampling_strategy="sequential", remove_unused_columns=False,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_steps=1, report_to=[],
        use_cpu=use_cpu, bf16=bf16, seed=0, disable_tqdm=True)
    callback = LrxCallback()
    trainer = Recording(model=model, args=args, train_dataset=data.train.select(order),
                        data_collator=data.collate_fn, callbacks=[callback])
    trainer.losses, trainer.rows = [], []
    if before_train is not None:
        before_train(trainer, adapter)
    trainer.train(resume_from_checkpoint=resume)
    trainer.expected_rows = data.train.select(mine[: steps * batch // world])["input_ids"]
    return trainer, adapter, callback
