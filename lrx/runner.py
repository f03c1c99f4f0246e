"""One training run, composed in the fixed build order.

config -> checkpoint and run-folder checks -> backend -> tokenizer -> data -> method ->
``backend.build`` (construct, wrap, load the base, initialise or restore the adapters, place
or shard) -> trainer (optimizer, engine, attach) -> schedule check and resume -> run folder
written -> train -> evaluate -> save adapter (+ peft export) -> sample generation.
``lrx.cli`` calls ``run``; nothing here branches on a method's name or a backend's kind.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import datasets
import torch

from lrx.build import Adapters
from lrx.checkpoint import CheckpointManager
from lrx.config import RunConfig, save_config
from lrx.data import build_datasets, prompt_add_special_tokens, render_prompt
from lrx.diskspace import warn_if_short
from lrx.distributed import ModelSpec, Timeouts, build_backend
from lrx.errors import ConfigError
from lrx.fileio import WeightFiles
from lrx.methods import adapted_layers, build_method, layer_counts
from lrx.models import (
    absolute_path,
    check_positions,
    load_model,
    load_tokenizer,
    resolve_source,
    resolve_task,
    safetensors_files,
    take_stored_quantization,
)
from lrx.prequant import StoredQuantizer
from lrx.quant import QuantizedLinear, Quantizer, QuantSettings, bitsandbytes
from lrx.rundir import check_run_dir
from lrx.speed import prepare_for_training
from lrx.stop import Stopped, StopRequest
from lrx.trainer import Trainer

log = logging.getLogger(__name__)

RUN_MARKER = "config.yaml"  # the resolved config, written first


def model_spec(config: RunConfig, task: str, num_labels: int, tokenizer, device_type: str = "cpu",
               hooked: bool = False) -> ModelSpec:
    """The model of a run for ``Backend.build``: how to construct it, where its weights can be
    read one tensor at a time (a base stored as safetensors files, ``model.sharded_load``),
    and the speed settings (``lrx.speed``), which must be applied before the model is sharded."""
    mc, seed = config.model, config.train.seed
    files = safetensors_files(mc.name_or_path, mc.gguf_file) if mc.sharded_load != "off" else []
    if mc.sharded_load == "on" and not files:
        raise ConfigError("model.sharded_load=on needs a base stored as safetensors files; set model.sharded_load=auto")

    def construct(meta: bool) -> torch.nn.Module:
        torch.manual_seed(seed)
        return load_model(mc.name_or_path, task=task, num_labels=max(num_labels, 1), dtype=mc.dtype,
                          vocab_size=len(tokenizer), gguf_file=mc.gguf_file, pad_token_id=tokenizer.pad_token_id,
                          meta="params" if meta else False)

    def before_sharding(model: torch.nn.Module) -> None:
        prepare_for_training(model, config.train, task, device_type, mc.name_or_path, quantized=mc.quantize != "none",
                             hooked=hooked)

    return ModelSpec(construct, reader=WeightFiles(files) if files else None, source=f"{len(files)} safetensors files",
                     stream=mc.sharded_load, dtype=getattr(torch, mc.dtype), before_sharding=before_sharding,
                     blockwise=mc.quantize_stored)  # stored codes: read layer by layer (StoredQuantizer)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Trainable and all parameters, without the frozen ones that hold row-sharded edit logs;
    a quantized layer counts its weights (out x in), not the bytes of its packed codes; a
    parameter ZeRO-3 partitioned while building (``ds_numel``) its whole size."""
    logs = {id(t) for _, layer in adapted_layers(model) for t in layer.edit_log.held()}
    weights = {id(m.weight): m.weight_count() for m in model.modules() if isinstance(m, QuantizedLinear)}
    params = [p for p in model.parameters() if id(p) not in logs]
    size = [(p, weights.get(id(p), getattr(p, "ds_numel", p.numel()))) for p in params]
    return sum(n for p, n in size if p.requires_grad), sum(n for _, n in size)


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


def adapter_meta(config: RunConfig, task: str, data, world_size: int = 1) -> dict[str, Any]:
    """What adapter files record besides the method: the base (absolute: readable from any
    folder), tokenizer, head, labels and the quantization (as run over ``world_size`` processes)."""
    mc = config.model
    return {"base_model": absolute_path(mc.name_or_path), "gguf_file": mc.gguf_file,
            "tokenizer": absolute_path(mc.tokenizer), "task": task, "num_labels": data.num_labels,
            "label_names": data.label_names, "model_dtype": mc.dtype,
            "quantize": quant_settings(config, world_size).to_dict() if mc.quantize != "none" else None}


def quant_settings(config: RunConfig, world_size: int = 1) -> QuantSettings:
    """``model.quantize`` as a run over ``world_size`` processes stores the base (adapted fused
    experts quantized too, on any number of processes: ``QuantSettings.for_processes``)."""
    return QuantSettings.for_processes(config.model.quantize, config.model.double_quant, world_size,
                                       stored=config.model.quantize_stored)


def throughput(history: list[dict], device: torch.device) -> dict[str, float]:
    """What the summary says of speed and memory: real (not padding) tokens per second over all
    processes, the median of the logged intervals (the first one holds compilation and warm-up),
    and the peak memory: the GPU's (allocated by torch) or, on CPU, the process's resident peak."""
    rates = sorted(r["tokens_per_s"] for r in history)
    out = {"tokens_per_s": round(rates[len(rates) // 2], 1) if rates else None}
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        import resource

        out["peak_host_memory_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out
def output_bytes(method, trainable: int) -> int:
    """About what one checkpoint plus the final adapter take: the trained tensors four times in
    fp32 (checkpoint adapter, Adam's two moments, the adapter) and the edit logs twice."""
    logs = sum(t.numel() for layer in method.layers.values() for t in layer.edit_log.held())
    return 4 * (4 * trainable + 2 * logs)


def fit(trainer: Trainer, backend) -> list[dict]:
    """``trainer.fit()``; a collective that timed out or lost a peer becomes one line naming the
    processes that stopped answering."""
    try:
        return trainer.fit()
    except RuntimeError as e:
        error = backend.failure(e, trainer.step)
        if error is None:
            raise
        raise error from None


def run(config: RunConfig, callbacks=()) -> dict[str, Any]:
    """Train one adapter as ``config`` says; returns the summary written to summary.json.
    ``callbacks`` are called with the trainer after every optimizer step."""
    t0 = time.perf_counter()
    take_stored_quantization(config.model)  # before the config is compared with a checkpoint's
    run_dir = Path(config.logging.output_dir)
    checkpoints = CheckpointManager(run_dir, keep=config.train.keep_checkpoints)
    resume = checkpoints.open(config.train.resume, config.to_dict())  # before any slow loading
    check_run_dir(run_dir, config.logging.overwrite or checkpoints.again, resume)  # before any slow loading
    if not config.logging.progress:
        datasets.disable_progress_bars()
    if config.model.quantize != "none":
        bitsandbytes(config.train.device if config.train.device != "auto" else None)  # installed, with a backend
    dc = config.distributed
    backend = build_backend(dc.backend, config.train.device, bf16=config.train.bf16,
                            deepspeed_config=dc.deepspeed_config, replicate=dc.replicate,
                            timeouts=Timeouts(dc.timeout_s, dc.checkpoint_timeout_s))
    stop = StopRequest(config.train.stop_signals, config.train.stop_grace_s).install()
    try:
        return _run(config, backend, checkpoints, t0, callbacks, stop)
    except Stopped as stopped:
        if backend.is_main:
            stop.record(stopped)
        raise
    finally:
        stop.uninstall()
        backend.close()


def log_adapted(method, trainable: int, total: int) -> None:
    row_logs = sum(layer.edit_log.storage == "rows" for layer in method.layers.values())
    log.info("%s: adapted %d linear layers: %s; trainable %s of %s parameters (%.3f%%)%s",
             method.name, len(method.layers), layer_counts(method.layers), f"{trainable:,}", f"{total:,}",
             100 * trainable / total,
             f"; edit logs of {row_logs} layers split by rows over the processes" if row_logs else "")


def _run(config: RunConfig, backend, checkpoints: CheckpointManager, t0: float, callbacks,
         stop: StopRequest | None = None) -> dict[str, Any]:
    mc = config.model
    tokenizer = load_tokenizer(mc.tokenizer or mc.name_or_path, None if mc.tokenizer else mc.gguf_file)
    data = build_datasets(config.data, tokenizer, seed=config.train.seed, main_process_first=backend.main_first)
    task = resolve_task(mc.task, data.task)
    method = build_method(config.method)
    method.load_resources()  # fills in what the method's settings left to it (a basis's sha256)
    settings = quant_settings(config, backend.world_size)
    quantizer = None if mc.quantize == "none" else (
        StoredQuantizer(settings, resolve_source(mc.name_or_path).path, backend.device)
        if mc.quantize_stored else Quantizer(settings, backend.device))
    # Resuming, the checkpoint's adapter is restored while the model is built (each layer while
    # its base is whole, modules_to_save into their shards), the rest by checkpoints.load below.
    adapters = Adapters(method, config.train.seed, checkpoints.saved_adapter(config.to_dict()), quantizer,
                        load=backend.load_whole)
    model = backend.build(model_spec(config, task, data.num_labels, tokenizer, backend.device.type,
                                     hooked=backend.layout.gather_hooks), adapters)
    trainable, total = count_parameters(model)
    log_adapted(method, trainable, total)
    check_positions(model.config, config.data.max_length)
    checkpoints.meta = adapter_meta(config, task, data, backend.world_size)
    trainer = Trainer(
        config, model, method, data.train, data.eval, data.collate_fn, data.task, data.metric_names,
        backend.device, Path(config.logging.output_dir), backend=backend, checkpoints=checkpoints,
        callbacks=callbacks, stop=stop,
    )
    method.check_schedule(trainer.total_steps)
    checkpoints.load(trainer)  # the one place a run resumes: trainer, method, optimizer, random states
    # Everything is checked: only now is the run folder written (an old run replaced with --overwrite).
    run_dir = Path(config.logging.output_dir)
    if backend.is_main:
        run_dir = checkpoints.claim(config.logging.overwrite or checkpoints.again)
        save_config(config, run_dir / RUN_MARKER)
        warn_if_short(run_dir, output_bytes(method, trainable))
    backend.barrier()
    evals = fit(trainer, backend)
    checkpoints.save(trainer, final=True)  # RUN/adapter and RUN/adapter_peft
    return summarize(config, trainer, tokenizer, task, evals, (trainable, total), time.perf_counter() - t0, run_dir)


def summarize(config: RunConfig, trainer: Trainer, tokenizer, task: str, evals: list[dict], counts: tuple[int, int],
              seconds: float, run_dir: Path) -> dict[str, Any]:
    """The run's summary (written to ``summary.json`` by the main process), with a sample
    completion of ``train.sample_prompt`` for causal LMs."""
    backend = trainer.backend
    summary = {
        "method": trainer.method.name,
        "model": config.model.name_or_path,
        "steps": trainer.step,
        "trainable_parameters": counts[0],
        "total_parameters": counts[1],
        "final_train_loss": trainer.history[-1]["loss"] if trainer.history else None,
        "eval": evals[-1] if evals else None,
        "eval_history": evals,
        "wall_time_s": round(seconds, 1),
        "run_dir": str(run_dir),
    }
    if task == "causal_lm" and config.train.sample_prompt:
        summary["sample_prompt"] = config.train.sample_prompt
        with trainer.autocast:  # as in training (a bf16 run's offloaded edit log is bf16 on the GPU)
            summary["sample_completion"] = sample_generation(
                trainer.module, tokenizer, config.train.sample_prompt, config.train.max_new_tokens, backend.device
            )
    summary.update(throughput(trainer.history, backend.device))
    summary["is_main"] = backend.is_main
    summary["world_size"] = backend.world_size
    if backend.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
