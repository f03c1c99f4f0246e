"""lrx inside a transformers Trainer: ``lrx.wrap`` + ``lrx.hf.LrxCallback`` trains as
``launch/train.py`` does, its adapter reloads in lrx and (exported) in peft, a resumed Trainer
continues exactly, and misuse is one line.

One lrx run and one Trainer run (6 steps, 2 SRLoRA events, a checkpoint at step 3) are shared
by the checks; the resumed run continues from that checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import lrx
from lrx.cli import main
from lrx.config import load_config
from lrx.data import build_datasets
from lrx.errors import ConfigError, LrxError
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
    "logging.tensorboard=false", "method.r=4", "method.r_target=8", "method.gamma=0.5", "method.interval=2",
]


class Recording(Trainer):
    """A Trainer that keeps each step's exact loss (its log rounds to 4 digits)."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.item())
        return loss


def hf_trainer(out, resume: bool = False):
    """The Trainer run of ``SETTINGS``: the same model, adapters, batches and optimizer."""
    config = load_config(None, SETTINGS, method="srlora")
    tokenizer = load_tokenizer("tiny-llama")
    data = build_datasets(config.data, tokenizer, seed=0)
    model = model_spec(config, "causal_lm", data.num_labels, tokenizer).construct(False)
    adapter = lrx.wrap(model, "srlora", seed=0, **METHOD)
    order = [i for batch in ShardedBatches(len(data.train), BATCH, 0) for i in batch][: STEPS * BATCH]
    args = TrainingArguments(
        str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-3, lr_scheduler_type="linear",
        weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch", train_sampling_strategy="sequential",
        remove_unused_columns=False, save_strategy="steps", save_steps=3, logging_steps=1, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Recording(model=model, args=args, train_dataset=data.train.select(order),
                        data_collator=data.collate_fn, callbacks=[LrxCallback()])
    trainer.losses = []
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3") if resume else None)
    return trainer, adapter


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    assert main(["--method", "srlora", *SETTINGS, f"logging.output_dir={tmp / 'lrx'}"]) == 0
    trainer, adapter = hf_trainer(tmp / "hf")
    adapter.save(tmp / "hf_adapter", peft=tmp / "hf_peft")
    return tmp, trainer, adapter


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trainer_with_callback_trains_as_launch_train(runs):
    tmp, trainer, _ = runs
    lrx_losses = [r["loss"] for r in records(tmp / "lrx" / "metrics.jsonl") if r["split"] == "train"]
    assert len(trainer.losses) == STEPS
    assert max(abs(a - b) for a, b in zip(trainer.losses, lrx_losses)) <= 1e-5
    theirs, ours = records(tmp / "lrx" / "method_events.jsonl"), records(tmp / "hf" / "method_events.jsonl")
    assert [r["step"] for r in ours] == [2, 2, 2, 2, 4, 4, 4, 4]  # 2 events x 4 layers
    for a, b in zip(theirs, ours, strict=True):
        assert (a["step"], a["layer"], a["fused_pairs"], a["pointer"]) == (b["step"], b["layer"], b["fused_pairs"], b["pointer"])
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-4, abs=1e-12)
    expected, got = load_file(tmp / "lrx" / "adapter" / "adapter_model.safetensors"), \
        load_file(tmp / "hf_adapter" / "adapter_model.safetensors")
    assert sorted(expected) == sorted(got)
    assert max((expected[k].double() - got[k].double()).abs().max().item() for k in expected if expected[k].numel()) <= 1e-5


def fresh_base():
    config = load_config(None, SETTINGS, method="srlora")
    tokenizer = load_tokenizer("tiny-llama")
    return model_spec(config, "causal_lm", 0, tokenizer).construct(False).eval()


def test_saved_adapter_reloads_in_lrx_and_in_peft(runs):
    from peft import PeftModel

    tmp, _, adapter = runs
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = adapter.model.eval()(input_ids=ids).logits
        loaded = lrx.load(tmp / "hf_adapter", fresh_base())
        assert loaded.method.events_done == 2
        assert (loaded.model(input_ids=ids).logits - trained).abs().max().item() <= 1e-5
        peft = PeftModel.from_pretrained(fresh_base(), str(tmp / "hf_peft"))
        assert (peft(input_ids=ids).logits - trained).abs().max().item() <= 1e-5
        merged = loaded.merge()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert (merged(input_ids=ids).logits - trained).abs().max().item() <= 1e-5


def test_resume_from_checkpoint_continues_exactly(runs):
    tmp, trainer, adapter = runs
    resumed, again = hf_trainer(tmp / "hf", resume=True)
    assert resumed.losses == trainer.losses[3:]
    for name, layer in adapter.method.layers.items():
        other = again.method.layers[name]
        assert torch.equal(layer.lora_A, other.lora_A) and torch.equal(layer.lora_B, other.lora_B), name
        assert torch.equal(layer.base.weight, other.base.weight) and torch.equal(layer.edit_U, other.edit_U), name
    assert [r["step"] for r in records(tmp / "hf" / "method_events.jsonl")] == [2, 2, 2, 2, 4, 4, 4, 4]


def test_misuse_is_one_line(tmp_path):
    model = fresh_base()
    with pytest.raises(ConfigError, match="has no setting rank; its settings are .*r_target"):
        lrx.wrap(model, "srlora", rank=8)
    adapter = lrx.wrap(model, "srlora", **METHOD)
    model.train()
    with pytest.raises(LrxError, match=r"training without its hooks .*callbacks=\[lrx\.hf\.LrxCallback\(\)\]"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))  # evaluation needs no hooks
    with pytest.raises(ConfigError, match="already adapted"):
        lrx.wrap(model, "lora")
    with pytest.raises(ConfigError, match="was not adapted by lrx"):
        LrxCallback().on_train_begin(None, None, None, model=fresh_base())
    with pytest.raises(ConfigError, match="takes the lrx.Adapter"):
        LrxCallback(model)
    from lrx.distributed.found import check_zero_config

    with pytest.raises(ConfigError, match="zero_hpz_partition_size=2 .* not supported"):
        check_zero_config({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}})
    assert adapter.model is model
