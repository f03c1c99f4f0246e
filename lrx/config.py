"""Run configuration: typed dataclasses, YAML files as data, dotted CLI overrides.

Precedence is CLI > YAML > dataclass defaults. Every field carries its help text as an
attribute docstring (the torchtitan convention); ``field_help`` reads them back for
``--help``. Unknown keys and values of the wrong type raise ``ConfigError`` naming the key
and the valid choices. Reading fields (help, coercion of values, building a section) is in
``lrx/fields.py``; its names stay importable from here.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lrx.errors import ConfigError
from lrx.fields import build_section, field_help, type_name  # noqa: F401 (field_help, type_name: lrx.config's names)
from lrx.methods import MethodConfig, get_method_class, without_retired_keys

log = logging.getLogger(__name__)

# The quick-start instruction set, found from the package (not the working directory), so that
# `python launch/train.py --method srlora` trains as typed from any folder.
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "data" / "quickstart"


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str = "smollm2-135m"
    """Base model: a short name (smollm2-135m, minilm-l6, tiny-llama, tiny-bert) or a local HF folder."""
    gguf_file: str | None = None
    """GGUF file inside name_or_path to load (set automatically for smollm2-135m)."""
    tokenizer: str | None = None
    """Tokenizer folder or short name; None = the model's own."""
    task: Literal["auto", "causal_lm", "sequence_classification"] = "auto"
    """Model head; auto = causal_lm for instruct data, sequence_classification otherwise."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the frozen base weights (adapters are always float32)."""
    sharded_load: Literal["auto", "on", "off"] = "auto"
    """Load the base straight into shards, never whole on a process (FSDP2: from the meta device one
    block at a time; ZeRO-3: under zero.Init, or block by block for a folder stored quantized);
    auto = when the base is a folder of safetensors files."""
    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"
    """Store the frozen linear layers quantized with bitsandbytes (QLoRA: nf4); output heads and
    modules_to_save stay in model.dtype. PiSSA/SRLoRA quantize their residual; later edits stay exact."""
    double_quant: bool = True
    """4-bit: quantize the per-block scales too (QLoRA's double quantization, ~0.4 bits per weight less)."""
    quantize_stored: bool = False
    """Set by lrx, not by hand: the checkpoint is stored quantized by bitsandbytes and ``quantize`` /
    ``double_quant`` were taken from it (its codes are read as stored)."""


@dataclass(kw_only=True)
class DataConfig:
    format: Literal["instruct", "glue", "table"] = "instruct"
    """instruct: JSONL prompt/response or chat messages; glue: a GLUE TSV; table: any CSV/TSV."""
    train_path: str | None = str(QUICKSTART / "train.jsonl")
    """Training file (JSONL for instruct, TSV/CSV otherwise); default: the quick-start instruction set
    shipped in configs/data/quickstart (format=instruct only)."""
    eval_path: str | None = "auto"
    """Evaluation file; None = no evaluation; auto = the quick-start's eval set when train_path is the
    quick-start's, else none."""
    glue_task: str | None = None
    """GLUE task for format=glue: rte, mrpc, cola, sts-b, sst-2, qnli, wnli."""
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    """format=table: one or two text columns fed to the tokenizer."""
    label_column: str = "label"
    """format=table: the label column."""
    delimiter: str | None = None
    """format=table: field delimiter; None = from the extension (.tsv tab, .csv comma)."""
    label_names: list[str] | None = None
    """format=table: string labels in id order; None = sorted unique values."""
    regression: bool = False
    """format=table: labels are floats (one output, MSE loss)."""
    max_length: int = 512
    """Truncate (or pack) sequences to this many tokens."""
    packing: bool = False
    """format=instruct: concatenate examples into blocks of exactly max_length tokens (no padding); each
    example attends only to itself (per-example position_ids, no attention across examples)."""
    mask_prompt: bool = True
    """format=instruct: compute the loss on response tokens only."""
    max_train_samples: int | None = None
    """Use only the first N training rows (quick runs)."""
    max_eval_samples: int | None = None
    """Use only the first N evaluation rows."""

    def __post_init__(self) -> None:
        _require(self.max_length >= 2, "max_length", self.max_length, ">= 2")
        quickstart = self.train_path == str(QUICKSTART / "train.jsonl")
        if quickstart and self.format != "instruct":  # the quick-start set is instruction data: no default here
            self.train_path, quickstart = None, False  # building the data says what to set
        if self.eval_path == "auto":
            self.eval_path = str(QUICKSTART / "eval.jsonl") if quickstart else None


CHECKPOINTING = ("none", "full", "selective", "every2")
"""``train.activation_checkpointing`` choices (``lrx.speed.apply_checkpointing``)."""
CHECKPOINTING_ALIASES = {"true": "full", "false": "none", "on": "full", "off": "none", "yes": "full", "no": "none"}
"""The on/off values the switch took before it had modes."""

COMPILE_SWITCH = {"auto": "auto", "true": True, "on": True, "yes": True, "1": True, "false": False, "off": False,
                  "no": False, "0": False}
"""``train.compile``'s values: auto (``lrx.speed.compiles`` decides) or a switch."""


@dataclass(kw_only=True)
class TrainConfig:
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    epochs: float = 1.0
    """Training epochs (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 = derived from epochs."""
    batch_size: int = 8
    """Micro-batch size (sequences per forward pass)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    schedule: Literal["linear", "cosine", "constant", "plateau"] = "linear"
    """Learning-rate decay after warm-up; plateau = ReduceLROnPlateau: constant, multiplied by plateau_factor
    whenever plateau_metric has not improved for more than plateau_patience evaluations (needs data.eval_path)."""
    plateau_metric: str = "eval_loss"
    """schedule=plateau: what it watches after each evaluation: eval_loss or perplexity (lower is better) or a
    task metric (accuracy, f1, pearson, matthews ...: higher is better)."""
    plateau_factor: float = 0.1
    """schedule=plateau: multiplies the learning rate at each reduction."""
    plateau_patience: int = 2
    """schedule=plateau: evaluations without improvement (by more than 1e-4 relative) tolerated before a reduction."""
    warmup_ratio: float = 0.0
    """Warm-up length as a share of all optimizer steps."""
    warmup_steps: int = 0
    """Warm-up length in steps; overrides warmup_ratio when > 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold; 0 disables clipping."""
    seed: int = 0
    """Seed for adapter init, data order and dropout."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward: none; full = every block's (HF gradient checkpointing,
    non-reentrant; least memory, about a third more compute); selective = every block, keeping the
    outputs of the matmuls whose input is at least twice as wide as their output (the MLP's down
    projection: torch's selective checkpointing; about 1 GiB more than full for an 8B model at 4k
    tokens a micro-batch, a quarter less recompute); every2 = full on every other block. true/false mean full/none."""
    fused_loss: Literal["auto", "liger", "chunked", "off"] = "auto"
    """Causal LM: compute the loss without materialising the full logits (the head's matmul and the
    cross-entropy fused over chunks of rows): liger = liger-kernel's Triton kernel (CUDA, pip install
    liger-kernel); chunked = the same in torch (any device); auto = liger where it runs, else chunked;
    off = full logits. Models whose logits are scaled or soft-capped keep full logits."""
    compile: str = "auto"
    """torch.compile each transformer block (adapted layers included) before it is sharded, as
    torchtitan does: faster steps once compiled, a compile pause at the start (and after each
    recomposition event that grows an edit log). true, false, or auto = on for a CUDA device with
    an unquantized base (an 8B Llama on one H100: 1.29x the eager step with full checkpointing, 1.41x without), off on CPU (inductor's
    CPU compile is slow), for quantized bases (not measured to pay off) and under ZeRO-3 (its
    parameters are gathered by module hooks, which a compiled block would trace)."""
    bf16: bool = True
    """bf16 autocast for forward/backward on GPU (ignored on CPU)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (GPU when available)."""
    log_every: int = 10
    """Optimizer steps between log lines (the only points where the host waits for the GPU)."""
    eval_every: int = 0
    """Optimizer steps between evaluations; 0 = at the end of every epoch."""
    eval_at_start: bool = True
    """Evaluate once before training too (the baseline the run improves on)."""
    eval_batch_size: int = 32
    """Batch size for evaluation."""
    sample_prompt: str | None = None
    """Causal LM: prompt whose greedy completion is printed after training."""
    max_new_tokens: int = 48
    """Causal LM: tokens to generate for the sample."""
    save_every: int = 0
    """Write a checkpoint every N optimizer steps (0 = only at the end of training)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in output_dir/checkpoints (older ones are deleted)."""
    resume: str | None = None
    """Resume from a checkpoint: auto = the newest complete one in output_dir (or start fresh), or a folder."""
    stop_signals: list[str] = field(default_factory=lambda: ["TERM", "INT", "USR1"])
    """Signals that stop the run gracefully: every process finishes its optimizer step, a checkpoint is written,
    exit status 75 (resume with --resume auto); a second one exits at once. [] = the signals' default actions."""
    stop_grace_s: float = 0.0
    """After a stop signal, exit at once if the checkpoint is not written within this many seconds (0 = no deadline)."""

    def __post_init__(self) -> None:
        # Every numeric key in one place (NaN and infinities are refused for all floats in _coerce).
        _require(self.lr > 0, "lr", self.lr, "> 0 (e.g. 2e-4)")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
                 self.adam_betas, "two values in [0, 1), e.g. [0.9, 0.999]")
        _require(self.epochs > 0, "epochs", self.epochs, "> 0")
        _require(self.max_steps >= 0, "max_steps", self.max_steps, ">= 0 (0 = derived from epochs)")
        for name in ("batch_size", "grad_accum", "log_every", "eval_batch_size", "max_new_tokens", "keep_checkpoints"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("warmup_steps", "eval_every", "save_every"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0 (0 = off)")
        _require(0 <= self.warmup_ratio <= 1, "warmup_ratio", self.warmup_ratio, "in [0, 1]")
        _require(0 < self.plateau_factor < 1, "plateau_factor", self.plateau_factor, "in (0, 1), e.g. 0.1")
        _require(self.plateau_patience >= 0, "plateau_patience", self.plateau_patience, ">= 0")
        _require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0 = no clipping)")
        ac = CHECKPOINTING_ALIASES.get(self.activation_checkpointing.lower(), self.activation_checkpointing)
        _require(ac in CHECKPOINTING, "activation_checkpointing", self.activation_checkpointing,
                 f"one of {', '.join(CHECKPOINTING)} (or true/false)")
        self.activation_checkpointing = ac
        switch = str(self.compile).lower()
        _require(switch in COMPILE_SWITCH, "compile", self.compile, "auto, true or false")
        self.compile = COMPILE_SWITCH[switch]
        for name in self.stop_signals:
            _require(_is_signal(name), "stop_signals", self.stop_signals, "signal names such as [TERM, INT, USR1]")
        _require(self.stop_grace_s >= 0, "stop_grace_s", self.stop_grace_s, ">= 0 (0 = no deadline)")
        _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device", self.device,
                 "auto, cpu, cuda or cuda:N")


@dataclass(kw_only=True)
class DistributedConfig:
    backend: Literal["auto", "single", "fsdp2", "zero3"] = "auto"
    """Training backend; auto = zero3 under the deepspeed launcher, fsdp2 under torchrun, else single."""
    deepspeed_config: str | None = None
    """zero3: DeepSpeed JSON (default configs/deepspeed/zero3.json); lrx fills in batch sizes and clipping."""
    replicate: int = 1
    """fsdp2: replica groups of a 2-D mesh (HSDP): parameters are sharded within each group of
    processes/replicate and replicated across the groups; for multi-node jobs, the number of nodes
    (shard within a node, replicate across nodes). 1 = shard over every process."""

    timeout_s: float = 300.0
    """Seconds a collective of training may wait for the other processes before the run stops with an error
    naming the rank that did not answer (NCCL's own default is 600)."""
    checkpoint_timeout_s: float = 1800.0
    """Seconds the other processes wait while the main one writes files (checkpoints, the adapter, data caches)."""

    def __post_init__(self) -> None:
        _require(self.replicate >= 1, "replicate", self.replicate, ">= 1")
        for name in ("timeout_s", "checkpoint_timeout_s"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "> 0 seconds")


@dataclass(kw_only=True)
class LoggingConfig:
    output_dir: str = "runs/quickstart"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, adapter."""
    overwrite: bool = False
    """Replace a run lrx wrote in output_dir (otherwise refused); only the entries lrx wrote are deleted."""
    tensorboard: bool = True
    """Write TensorBoard event files under output_dir/tb."""
    progress: bool = True
    """Show a progress bar."""


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        # alpha / r scales every method's adapter: 0 trains nothing (B A stays exactly 0 for
        # methods that start B at 0), a negative value makes PiSSA's sqrt(S / scale) NaN.
        alpha = getattr(self.method, "alpha", 1.0)
        if not alpha > 0:
            raise ConfigError(f"method.alpha must be > 0 (the adapter scale is alpha / r), got {alpha}")
        if self.train.schedule == "plateau" and not self.data.eval_path:
            raise ConfigError("train.schedule=plateau lowers the learning rate on evaluation results and this run has "
                              "no evaluation: set data.eval_path, or another train.schedule (linear, cosine, constant)")
        if self.model.quantize != "none" and getattr(self.method, "fuse", None) == "fold":
            raise ConfigError(f"method.fuse=fold cannot fold edits into a {self.model.quantize} base (each fold would be "
                              "rounded away); set method.fuse=auto (edits stay exact in the log beside it)")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-serialisable) of the resolved config."""
        return dataclasses.asdict(self)


def _is_signal(name: Any) -> bool:
    from lrx.stop import signal_number

    try:
        signal_number(str(name))
    except (KeyError, ValueError):
        return False
    return True


def _require(ok: bool, key: str, value: Any, want: str) -> None:
    """``__post_init__`` check: ValueError (a one-line ConfigError in ``build_section``)."""
    if not ok:
        raise ValueError(f"{key} must be {want}, got {value!r}")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "method": MethodConfig,
    "train": TrainConfig,
    "distributed": DistributedConfig,
    "logging": LoggingConfig,
}


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, str]]:
    """Turn ``["train.lr=2e-4", "method.r=16"]`` into ``{"train": {"lr": "2e-4"}, ...}``."""
    tree: dict[str, dict[str, str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name or "." in name:
            raise ConfigError(
                f"bad override {item!r}; write SECTION.KEY=VALUE, e.g. train.lr=2e-4 "
                f"(sections: {', '.join(SECTIONS)})"
            )
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}' in {item!r}; valid: {', '.join(SECTIONS)}")
        tree.setdefault(section, {})[name] = value
    return tree


class _DuplicateKey(Exception):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML itself keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(f"line {line}: key '{key}' is given twice (first at line {seen[key]}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML run config; ConfigError for a missing, binary or malformed file and for a
    key given twice."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; pass a YAML file (e.g. {path}/lora.yaml, see configs/)")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing file to --config (see configs/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a UTF-8 text file; pass a YAML file to --config") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror}); pass a readable YAML file") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path} {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{where}: malformed YAML ({problem}); fix the file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown config section '{section}'; valid: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping, got {values!r}")
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), method: str | None = None
) -> RunConfig:
    """Resolve a run config from defaults, a YAML file and CLI overrides.

    Args:
        path: YAML file, or None for defaults only.
        overrides: dotted ``section.key=value`` strings; they win over the YAML.
        method: method name from ``--method``; wins over ``method.name`` in YAML and overrides.

    Returns:
        The validated ``RunConfig``; ``config.method`` is the chosen method's config class.

    Raises:
        ConfigError: on any unknown key, wrong type or invalid value.
    """
    raw = read_yaml(path) if path is not None else {}
    cli = parse_overrides(list(overrides))
    yaml_method = dict(raw.get("method", {}))
    cli_method = cli.get("method", {})
    name = method or cli_method.get("name") or yaml_method.get("name") or "lora"
    method_cls = get_method_class(str(name)).config_cls
    if yaml_method.get("name", name) != name:
        # Switching methods from the CLI (the "one flag away" comparison): drop YAML keys the
        # new method does not have, instead of failing on e.g. srlora's r_target under lora.
        known = {f.name for f in dataclasses.fields(method_cls)}
        dropped = sorted(k for k in yaml_method if k not in known)
        if dropped:
            log.warning("method %s ignores YAML keys of method %s: %s", name, yaml_method["name"], dropped)
        yaml_method = {k: v for k, v in yaml_method.items() if k in known}

    sections = {}
    for section, cls in SECTIONS.items():
        values = {**raw.get(section, {}), **cli.get(section, {})}
        if section == "method":
            values = without_retired_keys(method_cls, {**yaml_method, **cli_method, "name": name})
            cls = method_cls
        sections[section] = build_section(cls, values, section)
    return RunConfig(**sections)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (re-loadable with ``--config``)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
