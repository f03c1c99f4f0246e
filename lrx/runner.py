"""One training run, composed in the fixed build order.

config -> run directory check -> backend -> tokenizer -> data -> base model -> method
(wrap + init adapters) -> place/shard -> train -> evaluate -> save adapter (+ peft export)
-> sample generation. ``launch/train.py`` calls ``run``; nothing here branches on a
method's name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import datasets
import torch

from lrx import checkpoint
from lrx.adapter import SavedAdapter, export_peft_from_adapter, save_adapter, trained_tensors
from lrx.config import RunConfig, save_config
from lrx.data import build_datasets, prompt_add_special_tokens, render_prompt
from lrx.distributed import build_backend
from lrx.errors import ConfigError
from lrx.methods import adapted_layers, build_method
from lrx.models import absolute_path, check_positions, load_model, load_tokenizer, safetensors_files
from lrx.rundir import check_run_dir, claim_run_dir
from lrx.trainer import Trainer, planned_steps

log = logging.getLogger(__name__)

RUN_MARKER = "config.yaml"  # the resolved config, written first


def resolve_task(model_task: str, data_task: str) -> str:
    """Model head for the data: causal LM for instruct data, classification otherwise."""
    wanted = "causal_lm" if data_task == "causal_lm" else "sequence_classification"
    if model_task not in ("auto", wanted):
        raise ConfigError(f"model.task={model_task} does not fit {data_task} data; use model.task={wanted} or auto")
    return wanted


def sharded_load_files(config: RunConfig, backend) -> list[Path]:
    """The base's safetensors files when the model is loaded straight into shards
    (``model.sharded_load``: FSDP2 block by block from the meta device, ZeRO-3 under
    ``zero.Init``; fresh and resumed runs alike), else []."""
    mc = config.model
    able = hasattr(backend, "prepare_from_files") or hasattr(backend, "construct_partitioned")
    files = safetensors_files(mc.name_or_path, mc.gguf_file) if able and mc.sharded_load != "off" else []
    if mc.sharded_load == "on" and not files:
        raise ConfigError("model.sharded_load=on needs distributed.backend=fsdp2 or zero3 and a base stored as "
                          "safetensors files; set model.sharded_load=auto")
    return files


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@torch.no_grad()
def sample_generation(model, tokenizer, prompt: str, max_new_tokens: int, device: torch.device) -> str:
    """Greedy completion of ``prompt`` rendered as the training data renders prompts."""
    model.eval()
    enc = tokenizer(
        render_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=prompt_add_special_tokens(tokenizer)
    ).to(device)
    out = model.generate(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run(config: RunConfig) -> dict[str, Any]:
    """Train one adapter as ``config`` says; returns the summary written to summary.json."""
    t0 = time.perf_counter()
    run_dir = Path(config.logging.output_dir)
    resume = None
    if config.train.resume:
        resume = checkpoint.resolve_resume(config.train.resume, run_dir)
        if resume is None:
            log.info("train.resume=auto: no complete checkpoint in %s; starting a new run", run_dir)
    if resume is not None:
        checkpoint.check_compatible(resume, config.to_dict())  # before any slow loading
    check_run_dir(run_dir, config.logging.overwrite, resume)  # raises before any slow loading; writes nothing
    if not config.logging.progress:
        datasets.disable_progress_bars()
    backend = build_backend(config.distributed.backend, config.train.device, bf16=config.train.bf16,
                            deepspeed_config=config.distributed.deepspeed_config)
    try:
        return _run(config, backend, t0, resume)
    finally:
        backend.close()


def _run(config: RunConfig, backend, t0: float, resume: Path | None = None) -> dict[str, Any]:
    run_dir = Path(config.logging.output_dir)
    mc = config.model
    tokenizer = load_tokenizer(mc.tokenizer or mc.name_or_path, None if mc.tokenizer else mc.gguf_file)
    data = build_datasets(config.data, tokenizer, seed=config.train.seed)
    task = resolve_task(mc.task, data.task)

    files = sharded_load_files(config, backend)
    meta_blocks = bool(files) and hasattr(backend, "prepare_from_files")  # FSDP2: meta, then block by block
    torch.manual_seed(config.train.seed)
    with backend.construct_partitioned() if files and not meta_blocks else contextlib.nullcontext():  # ZeRO-3
        model = load_model(
            mc.name_or_path, task=task, num_labels=max(data.num_labels, 1), dtype=mc.dtype,
            vocab_size=len(tokenizer), gguf_file=mc.gguf_file, pad_token_id=tokenizer.pad_token_id,
            meta="params" if meta_blocks else False,
        )
    method = build_method(config.method)
    if backend.world_size > 1 and not method.supports_sharding:
        raise ConfigError(f"method {method.name} does not run sharded yet; train it in one process "
                          f"(python launch/train.py) or with distributed.backend=single")
    torch.manual_seed(config.train.seed)
    weights = backend.weights()
    adapted = method.apply(model, weights, init=resume is None and not meta_blocks)
    # Resuming: each adapted layer gets its adapter and edit log (replayed onto W0) while its
    # base is whole (FSDP2 from files: as its block is loaded; ZeRO-3: gathered alone).
    saved = SavedAdapter(checkpoint.adapter_dir(resume)) if resume is not None else None
    if saved is not None and not meta_blocks:
        for name, layer in adapted_layers(model):
            with weights.gathered(layer) if layer.fold_edits else contextlib.nullcontext():
                saved.restore_layer(name, layer)
    if config.train.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{mc.name_or_path} does not support activation checkpointing; "
                              "set train.activation_checkpointing=false")
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if meta_blocks:  # built on the meta device: load and initialise one block at a time, then shard it
        if saved is not None:
            names = {id(layer): name for name, layer in adapted_layers(model)}

            def init(layer):
                saved.restore_layer(names[id(layer)], layer)
        else:
            init = method.layer_initializer(model, weights)
        model = backend.prepare_from_files(model, files, init)
    else:
        model = backend.prepare(model)
    if saved is not None:  # modules_to_save (into their shards) and the method state
        saved.restore_rest(model, method, backend.load_whole)
    trainable, total = count_parameters(model)
    log.info("%s: adapted %d linear layers; trainable %s of %s parameters (%.3f%%)",
             method.name, len(adapted), f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    check_positions(model.config, config.data.max_length)  # every check before the first file is written
    method.check_schedule(planned_steps(config.train, len(data.train), backend.world_size))
    if backend.is_main:
        run_dir = claim_run_dir(run_dir, config.logging.overwrite, resume)  # replaces the old run only now
        save_config(config, run_dir / RUN_MARKER)
    backend.barrier()
    meta = {"base_model": absolute_path(mc.name_or_path), "gguf_file": mc.gguf_file,  # readable from any folder
            "tokenizer": absolute_path(mc.tokenizer), "task": task,
            "num_labels": data.num_labels, "label_names": data.label_names}
    trainer = Trainer(
        config, model, method, data.train, data.eval, data.collate_fn, data.task, data.metric_names,
        backend.device, run_dir, backend=backend, adapter_meta=meta,
    )
    if resume is not None:
        trainer.resume(resume, checkpoint.read_state(resume))
    evals = trainer.fit()

    # Collectives when sharded (every process takes them): the method state and the trained
    # tensors, gathered whole; then one process writes.
    method_state = method.state_dict()
    params = backend.gather(trained_tensors(model, method))
    if backend.is_main:
        save_adapter(run_dir / "adapter", model, method, meta, method_state, params)
        export_peft_from_adapter(run_dir / "adapter", run_dir / "adapter_peft")
    backend.barrier()
    summary: dict[str, Any] = {
        "method": method.name,
        "model": mc.name_or_path,
        "steps": trainer.step,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "final_train_loss": trainer.history[-1]["loss"] if trainer.history else None,
        "eval": evals[-1] if evals else None,
        "eval_history": evals,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "run_dir": str(run_dir),
    }
    if task == "causal_lm" and config.train.sample_prompt:
        summary["sample_prompt"] = config.train.sample_prompt
        with trainer.autocast:  # as in training (a bf16 run's offloaded edit log is bf16 on the GPU)
            summary["sample_completion"] = sample_generation(
                model, tokenizer, config.train.sample_prompt, config.train.max_new_tokens, backend.device
            )
    if backend.device.type == "cuda":
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(backend.device) / 2**30, 2)
    summary["is_main"] = backend.is_main
    summary["world_size"] = backend.world_size
    if backend.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
