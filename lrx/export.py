"""Merged export: ``W0 + edits + scale * B A`` written as a plain transformers checkpoint.

    lrx export runs/my-run/adapter OUT [--dtype bfloat16]      (or python tools/export_merged.py ...)

Loads the base model the adapter names (or ``--base``), restores the adapter exactly
(``lrx.load``, the Python API), folds every adapted layer into its base weight in fp32 and
replaces each ``AdaptedLinear`` by a plain ``nn.Linear`` (``Adapter.merge``), and saves with
``save_pretrained`` (sharded safetensors + ``model.safetensors.index.json``, config,
tokenizer). The result opens with ``AutoModelFor*.from_pretrained`` and no lrx or peft.

When the base is a local folder of safetensors files holding every weight the adapter
changes (a model saved by transformers), the export streams: it reads base tensors one at a
time, adds each adapted layer's exact change ``method.delta_factors`` (computed on a
one-layer copy of the adapted module) and writes one output shard at a time, so memory stays
near one shard plus one layer. Other bases (GGUF, architecture-only configs, checkpoints with
other key names) are exported by loading the whole model. ``ADAPTER`` may also be a
checkpoint folder (``RUN/checkpoints/step-N``): its ``adapter/`` is used.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lrx.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    SavedAdapter,
    export_peft_from_adapter,
    layer_from_adapter,
    layer_on_base,
    method_of,
    method_values,
    read_adapter_config,
)
from lrx.api import load
from lrx.build import Adapters
from lrx.errors import LrxError
from lrx.fileio import WeightFiles, recorded_path
from lrx.merge import merge_into_linears, plain_linear  # noqa: F401 (lrx.export's names)
from lrx.methods import get_method_class
from lrx.models import SHORT_NAMES, TINY_NAMES, load_model, load_tokenizer
from lrx.quant import QuantizedLinear, Quantizer, QuantSettings
from lrx.rundir import PEFT_ENTRIES, check_output_dir, write_marker

log = logging.getLogger(__name__)


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
    check_output_dir(out, "OUT")  # not a file, writable, empty: nothing there is overwritten
    adapter_dir = adapter_folder(adapter_dir)
    config = checked_adapter_config(adapter_dir, resolve=("tokenizer",) if base else ("base_model", "tokenizer"))
    name = base or config.get("base_model")
    if not name:
        raise LrxError(f"{adapter_dir}: no base model recorded; pass --base")
    if name in TINY_NAMES:
        raise LrxError(f"{adapter_dir} was trained on {name}, a random model that is built at training time and "
                       "never saved: a merged export would add the adapter to other random weights; export the "
                       "adapter alone with --peft, or train on a saved model folder")
    gguf = None if base else config.get("gguf_file")
    tokenizer = load_tokenizer(config.get("tokenizer") or name, None if config.get("tokenizer") else gguf)
    stored = (config.get("quantize") or {}).get("stored")  # codes stored quantized: merged through the model
    files = sorted(Path(name).glob("*.safetensors")) if Path(name).is_dir() and not gguf and not stored else []
    if files and stream_merged(adapter_dir, config, files, out, dtype=dtype, max_shard_size=max_shard_size):
        tokenizer.save_pretrained(out)
        return out
    task = config.get("task", "causal_lm")
    # A quantized run quantized W0 as model.dtype held it: load it so to quantize it the same way.
    dtype_in = config.get("model_dtype") or "float32" if config.get("quantize") else "float32"
    model = load_model(name, task=task, num_labels=max(config.get("num_labels") or 2, 1), gguf_file=gguf,
                       vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, dtype=dtype_in)
    adapter = load(adapter_dir, model)  # the Python API: lrx export is one of its users
    n = len(adapter.method.layers)
    adapter.merge()
    model.to(DTYPES[dtype])
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    log.info("merged %d layers of %s into %s", n, name, out)
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def adapter_folder(path: str | Path) -> Path:
    """An lrx adapter folder, or the ``adapter/`` of a checkpoint folder."""
    path = Path(path)
    return path / "adapter" if (path / "adapter" / WEIGHTS_NAME).is_file() else path


def export_peft_adapter(adapter_dir: str | Path, out: str | Path) -> Path:
    """Write an lrx adapter (or checkpoint) as a standard peft LoRA adapter of exact rank;
    needs no base model (``lrx.adapter.export_peft_from_adapter``).

    ``out`` must be new, empty, or a peft export this function wrote (then it is replaced).

    Raises:
        LrxError: missing/corrupt adapter; ``out`` is a file or holds anything else.
    """
    check_output_dir(out, "OUT", kind="peft")
    adapter_dir = adapter_folder(adapter_dir)
    checked_adapter_config(adapter_dir)
    path = export_peft_from_adapter(adapter_dir, out)
    write_marker(path, "peft", PEFT_ENTRIES)
    return path


def model_path(value: str, json_file: Path, key: str) -> str:
    """A model or tokenizer recorded in an adapter JSON: a short name as it is, else a path
    (``fileio.recorded_path``)."""
    if value in SHORT_NAMES or value in TINY_NAMES:
        return value
    return recorded_path(value, json_file, key, "pass --base or run from the folder the run was started in")


def checked_adapter_config(adapter_dir: Path, resolve: tuple[str, ...] = ()) -> dict:
    """The adapter's config, checked for what an export reads (a hand-edited file fails here,
    in one line naming it, instead of deep inside the export), with the paths named in
    ``resolve`` (``base_model``, ``tokenizer``) resolved by ``model_path``; the files the method
    settings name are checked by ``adapter.method_config``.

    Raises:
        LrxError: naming the file and the key.
    """
    config = read_adapter_config(adapter_dir)
    file = adapter_dir / CONFIG_NAME
    method_cfg, modules = config.get("method"), config.get("adapted_modules")
    if not isinstance(method_cfg, dict) or not isinstance(method_cfg.get("name"), str):
        raise LrxError(f"{file}: 'method' must be a mapping with a 'name'; re-export the adapter (was it edited?)")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise LrxError(f"{file}: 'adapted_modules' must be a non-empty list of module names; re-export the adapter")
    if not isinstance(config.get("saved_modules") or [], list):
        raise LrxError(f"{file}: 'saved_modules' must be a list; re-export the adapter")
    for key in ("base_model", "gguf_file", "tokenizer"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise LrxError(f"{file}: '{key}' must be a string or null; re-export the adapter")
    quant = config.get("quantize")
    if quant is not None and (not isinstance(quant, dict) or quant.get("kind") not in ("nf4", "fp4", "int8")):
        raise LrxError(f"{file}: 'quantize' must be null or a mapping with kind nf4, fp4 or int8; re-export the adapter")
    if config.get("model_dtype", "float32") not in ("float32", "bfloat16", None):
        raise LrxError(f"{file}: 'model_dtype' must be float32 or bfloat16; re-export the adapter")
    for key in ("base_model", "tokenizer"):
        if key in resolve and config.get(key):
            config[key] = model_path(config[key], file, key)
    try:
        cls = get_method_class(method_cfg["name"]).config_cls
    except LrxError as e:
        raise LrxError(f"{file}: method settings are invalid ({str(e).splitlines()[0]}); re-export the adapter") from None
    values = method_values(config, file)  # retired keys dropped (older files), the files it names found
    try:
        cls(**values)
    except (TypeError, ValueError) as e:
        raise LrxError(f"{file}: method settings are invalid ({str(e).splitlines()[0]}); re-export the adapter") from None
    weights = adapter_dir / WEIGHTS_NAME
    if weights.is_file():  # a missing file is named (with any pickle found) by read_safetensors
        try:
            with safe_open(str(weights), framework="pt") as f:
                keys = set(f.keys())
        except (SafetensorError, OSError) as e:
            raise LrxError(f"{weights} is not a valid safetensors file ({e}); it may be truncated or corrupt") from None
        missing = [m for m in modules if f"{m}.edit_U" not in keys]
        if missing:
            raise LrxError(f"{file} names modules {missing[:3]} that {weights} has no tensors for; "
                           "re-export the adapter")
    return config


def quantized_keys(config: dict, method, folder: Path) -> set[str]:
    """The weight keys of the linears a quantized run kept quantized: planned on the model
    built on the meta device (nothing read), as the run planned them."""
    model = load_model(str(folder), task=config.get("task", "causal_lm"), num_labels=max(config.get("num_labels") or 2, 1),
                       meta=True)
    method.wrap(model)
    quantizer = Quantizer(QuantSettings.from_dict(config["quantize"]))
    quantizer.plan(model, method.saved_modules)
    return {f"{name.removesuffix('.base')}.weight" for name in quantizer.targets.values()}


@torch.no_grad()
def stream_merged(adapter_dir: Path, config: dict, files: list[Path], out: Path, *, dtype: str,
                  max_shard_size: str) -> bool:
    """Merged export reading and writing one tensor / shard at a time (see the module doc).

    Returns:
        False (nothing written) when the base files lack a weight the adapter changes.
    """
    base = WeightFiles(files)
    method = method_of(config, adapter_dir / CONFIG_NAME)  # with what its layers are built on (EigenLoRAx's basis)
    restored = SavedAdapter(adapter_dir)  # quantized layers restore from it as the build restores them
    adapter = restored.tensors
    modules = config["adapted_modules"]
    saved = {k: v for k, v in adapter.items() if any(k.startswith(m + ".") for m in config.get("saved_modules", []))}
    missing = [f"{m}.weight" for m in modules if f"{m}.weight" not in base] + [k for k in saved if k not in base]
    if missing:
        log.info("base files lack %s...; exporting through the whole model instead", missing[:2])
        return False

    quantized = quantized_keys(config, method, files[0].parent) if config.get("quantize") else set()
    quantizer = Quantizer(QuantSettings.from_dict(config["quantize"])) if quantized else None
    build = Adapters(method, saved=restored, quantizer=quantizer)  # restore, quantize: the run's order
    dtype_in = getattr(torch, config.get("model_dtype") or "float32")
    # A quantized run's base as the run held it (``model.dtype``), as the whole-model path loads it.
    held = dtype_in if quantized else None

    adapted = {f"{m}.weight": m for m in modules}

    def read(key: str) -> torch.Tensor | None:
        value = base.get(key) if key in base else None
        return value.to(held) if held is not None and value is not None and value.is_floating_point() else value

    def merged(key: str) -> torch.Tensor:
        if key in saved:
            return saved[key]
        weight, module = read(key), adapted.get(key)
        if module is not None and key in quantized:  # as training made it: W0 + init edits quantized, then the rest
            layer = layer_on_base(method, module, weight.to(dtype_in), read(f"{module}.bias"))
            return build.one_layer(module, layer).merged_weight()
        if module is not None:
            B, A = method.delta_factors(layer_from_adapter(method, adapter, module))  # one layer
            return weight.float() + B @ A
        if key in quantized:  # a frozen linear the run kept quantized: its dequantized weight
            return QuantizedLinear.of(weight.to(dtype_in), quantizer.settings).dequantize()
        return weight

    shards = write_streamed(out, base, files[0].parent, merged, dtype=dtype, max_shard_size=max_shard_size)
    log.info("streamed %d merged layers into %s (%d shards)", len(modules), out, shards)
    return True


def write_streamed(out: Path, base: WeightFiles, base_dir: Path, value, *, dtype: str, max_shard_size: str) -> int:
    """Write ``value(key)`` for every tensor of ``base`` as a transformers checkpoint in ``out``,
    one safetensors shard at a time, with the base's config (and generation config).

    Returns:
        The number of shards written.
    """
    dt = DTYPES[dtype]
    meta = {key: torch.empty(base.shape(key), device="meta", dtype=dt) for key in base.keys()}  # shapes only
    plan = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    out.mkdir(parents=True, exist_ok=True)
    for shard, keys in plan.filename_to_tensors.items():
        tensors = {key: (v := value(key)).to(dt if v.is_floating_point() else v.dtype).contiguous() for key in keys}
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        del tensors
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if (base_dir / "generation_config.json").is_file():
        shutil.copy(base_dir / "generation_config.json", out)
    return len(plan.filename_to_tensors)
