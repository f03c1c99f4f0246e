"""Adapter files: lrx's own format (exact training state) and a standard peft LoRA export.

lrx format (a folder): ``adapter_config.json`` (method config, base model, adapted modules)
and ``adapter_model.safetensors`` holding, per adapted module, ``lora_A``, ``lora_B`` and
the edit log (``edit_U``, ``edit_V``, ``edit_sizes``), the fully trained modules
(``modules_to_save``) and the method's own state under ``method_state.``. Loading rebuilds
``W0 + edits`` from the original model plus the log. Only safetensors and JSON are read.

The peft export writes the total change of every adapted matrix, ``edits + scale * B A``,
as exact-rank LoRA factors (scale folded into B, ``lora_alpha == r``) so that
``PeftModel.from_pretrained`` reproduces the trained model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import lrx
from lrx.build import Adapters
from lrx.errors import LrxError
from lrx.fileio import atomic_dir, read_json, read_safetensors, recorded_path
from lrx.methods import (
    AdaptedLinear,
    LocalShards,
    LocalWeights,
    Method,
    MethodConfig,
    adapted_layers,
    build_method,
    get_method_class,
    without_retired_keys,
)

ADAPTER_FORMAT = "lrx-adapter"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def edit_logs(model: nn.Module, gather=None, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every adapted layer's edit log, whole and on the CPU, as ``{name}.edit_U``, ``.edit_V`` and
    ``.edit_sizes``. ``gather`` is the backend's: with row-sharded logs (FSDP2) a collective,
    layer by layer (one layer's log is whole on the device at a time), so every process calls
    this; those that write nothing pass ``keep=False`` and get nothing."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        U, V = layer.edit_log.factors(gather)
        if keep:
            out[f"{name}.edit_U"], out[f"{name}.edit_V"] = U.detach().cpu(), V.detach().cpu()
            out[f"{name}.edit_sizes"] = torch.tensor(layer.edit_log.sizes, dtype=torch.long)
            if layer.quantized:  # the log's first columns are inside the quantized base
                out[f"{name}.edit_baked"] = torch.tensor(layer.edit_log.baked, dtype=torch.long)
    return out


def adapter_tensors(model: nn.Module, method: Method, method_state: dict | None = None,
                    params: dict[str, torch.Tensor] | None = None,
                    logs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Everything training changed, as a flat dict of contiguous CPU tensors.

    ``method_state`` is ``method.state_dict()``, ``params`` the trained tensors
    (``method.trainable_parameters``) and ``logs`` the edit logs (``edit_logs``), gathered whole
    when the caller took them already (all are collectives in sharded runs, so every process
    takes them and only one writes)."""
    out: dict[str, torch.Tensor] = dict(params) if params is not None else {
        k: p.detach() for k, p in method.trainable_parameters(model)}
    out.update(edit_logs(model) if logs is None else logs)
    for key, value in (method.state_dict() if method_state is None else method_state).items():
        out[f"method_state.{key}"] = value
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def save_adapter(path: str | Path, model: nn.Module, method: Method, meta: dict[str, Any],
                 method_state: dict | None = None, params: dict[str, torch.Tensor] | None = None,
                 logs: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an lrx adapter folder atomically.

    Args:
        path: destination folder (replaced atomically if it exists).
        model: the adapted model.
        method: the method that adapted it.
        meta: extra JSON-serialisable fields (base model name, task, num_labels ...).
        method_state, params, logs: already gathered state and tensors (see ``adapter_tensors``).
    """
    path = Path(path)
    config = {
        "format": ADAPTER_FORMAT,
        "format_version": 1,
        "lrx_version": lrx.__version__,
        "torch_version": torch.__version__,
        "method": with_absolute_paths(method.config),
        "adapted_modules": [name for name, _ in adapted_layers(model)],
        "saved_modules": method.saved_modules,
        **meta,
    }
    tensors = adapter_tensors(model, method, method_state, params, logs)
    with atomic_dir(path, needed=sum(t.numel() * t.element_size() for t in tensors.values())) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return path


def with_absolute_paths(config: MethodConfig) -> dict[str, Any]:
    """A method config as a dict, the files it names recorded absolute (readable from any folder)."""
    values = dataclasses.asdict(config)
    for key in config.PATH_FIELDS:
        if values.get(key) and Path(values[key]).exists():
            values[key] = str(Path(values[key]).resolve())
    return values


def method_values(config: dict[str, Any], json_file: Path) -> dict[str, Any]:
    """The method settings an adapter JSON records, ready for its config class: keys retired
    since it was written dropped, and a relative file it names (an older file) resolved from
    the JSON's folder, then from the working directory.

    Raises:
        LrxError: a file it names exists in neither place (the message names the JSON file).
    """
    values = dict(config["method"])
    cls = get_method_class(values["name"]).config_cls
    values = without_retired_keys(cls, values)
    for key in cls.PATH_FIELDS:
        if isinstance(values.get(key), str) and values[key]:
            values[key] = recorded_path(values[key], json_file, f"method.{key}",
                                        "restore it or run from the folder the run was started in")
    return values


def method_config(config: dict[str, Any], json_file: Path) -> MethodConfig:
    """The method config an adapter JSON records (``method_values``)."""
    return get_method_class(config["method"]["name"]).config_cls(**method_values(config, json_file))


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The JSON config of an lrx adapter folder; LrxError if it is missing or not lrx's."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise LrxError(f"{path} is not an adapter folder: {CONFIG_NAME} is missing")
    config = read_json(cfg_file, "re-export the adapter")
    if config.get("format") != ADAPTER_FORMAT:
        raise LrxError(f"{cfg_file} is not an lrx adapter (format={config.get('format')!r})")
    return config


def load_adapter(path: str | Path, model: nn.Module) -> Method:
    """Adapt ``model`` (the original base model) and load an lrx adapter into it.

    Returns:
        The method, with its state restored.

    Raises:
        LrxError: missing/corrupt files, or an adapter made for another model (names/shapes).
    """
    path = Path(path)
    config = read_adapter_config(path)
    method = build_method(method_config(config, path / CONFIG_NAME))
    names = method.wrap(model)
    if names != config["adapted_modules"]:
        raise LrxError(
            f"{path}: adapter was trained on modules {config['adapted_modules'][:3]}..., this model has "
            f"{names[:3]}...; load it onto the base model it was trained from ({config.get('base_model')})"
        )
    restore_adapter(path, model, method, quantizer_of(config, model, method))
    return method


def quantizer_of(config: dict[str, Any], model: nn.Module, method: Method):
    """The ``Quantizer`` of an adapter trained on a quantized base (config key ``quantize``),
    planned on ``model`` as the run planned it; None for a full-precision base."""
    if not config.get("quantize"):
        return None
    from lrx.quant import Quantizer, QuantSettings

    settings = QuantSettings.from_dict(config["quantize"])
    if settings.stored:  # the codes as the base checkpoint stores them
        from lrx.models import resolve_source
        from lrx.prequant import StoredQuantizer

        quantizer = StoredQuantizer(settings, resolve_source(config["base_model"]).path)
    else:
        quantizer = Quantizer(settings)
    quantizer.plan(model, method.saved_modules)
    return quantizer


def restore_adapter(path: str | Path, model: nn.Module, method: Method, quantizer=None) -> None:
    """Load an lrx adapter's tensors into a model that ``method`` wrapped (``Method.wrap``):
    adapter tensors, the edit log (replayed onto W0), modules_to_save and the method state
    (the method is attached for one process). An adapter trained on a quantized base needs
    its ``quantizer`` (``lrx.quant.Quantizer``, planned on ``model``): the base is quantized
    as in training, after the edits of the layers' init.

    Raises:
        LrxError: missing/corrupt files, or tensors made for another model (names/shapes).
    """
    saved = SavedAdapter(path)
    with torch.no_grad():  # restore, quantize, place the log: the build's order (lrx.build.Adapters)
        Adapters(method, saved=saved, quantizer=quantizer).init(model, LocalWeights())
    saved.restore_modules(model, method)
    method.attach(model, LocalShards())  # one process: the model is whole
    saved.restore_method_state(method)


class SavedAdapter:
    """An lrx adapter file read once and restored in parts, for models that are never whole:
    ``restore_layer`` for each adapted layer while its base weight is whole (FSDP2: as its
    block is loaded; ZeRO-3: gathered), ``restore_modules`` for modules_to_save (through a
    ``load`` that writes a whole value into a possibly sharded parameter), and
    ``restore_method_state`` once the method is attached.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors = read_safetensors(self.path / WEIGHTS_NAME)

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise LrxError(f"{self.path / WEIGHTS_NAME}: tensor {key!r} is missing; the file is incomplete")
        return self.tensors.pop(key)

    @torch.no_grad()
    def restore_layer(self, name: str, layer: AdaptedLinear) -> None:
        """Adapter tensors and the edit log (replayed onto W0) of one adapted layer."""
        for attr, param in layer.adapter_params().items():
            value = self.take(f"{name}.{attr}")
            if value.shape != param.shape:
                raise LrxError(
                    f"{self.path}: {name}.{attr} has shape {tuple(value.shape)}, the model needs "
                    f"{tuple(param.shape)}; the adapter belongs to another model or rank"
                )
            param.copy_(value)
        U, V, sizes = self.take(f"{name}.edit_U"), self.take(f"{name}.edit_V"), self.take(f"{name}.edit_sizes")
        baked = self.tensors.pop(f"{name}.edit_baked", None)  # trained on a quantized base
        layer.set_edit_log(U, V, sizes, None if baked is None else int(baked))

    @torch.no_grad()
    def restore_modules(self, model: nn.Module, method: Method, load=None) -> None:
        """The fully trained modules (modules_to_save). ``load(param, value)`` writes a whole value
        into a parameter (default ``copy_``; ``Backend.load_whole`` for sharded ones, a
        collective there, taken in model order) and raises ValueError on a shape mismatch."""
        load = load or _copy_whole
        for mod_name in method.saved_modules:
            for pname, p in model.get_submodule(mod_name).named_parameters():
                try:
                    load(p, self.take(f"{mod_name}.{pname}"))
                except ValueError as e:
                    raise LrxError(f"{self.path}: {mod_name}.{pname} {e}; the adapter belongs to another model") from None

    def restore_method_state(self, method: Method) -> None:
        """The method's own state; then nothing may be left over."""
        prefix = "method_state."
        method.load_state_dict({k[len(prefix):]: self.tensors.pop(k) for k in list(self.tensors) if k.startswith(prefix)})
        if self.tensors:
            raise LrxError(f"{self.path}: unexpected tensors {sorted(self.tensors)[:5]}; the adapter does not match this model")


def _copy_whole(param: torch.Tensor, value: torch.Tensor) -> None:
    if value.shape != param.shape:
        raise ValueError(f"has shape {tuple(value.shape)}, the model needs {tuple(param.shape)}")
    param.copy_(value)


def export_peft(path: str | Path, model: nn.Module, method: Method, base_model_name: str | None = None) -> Path:
    """Write the total change as a standard peft LoRA adapter (exact rank per module).

    Args:
        path: destination folder (written atomically).
        model: the adapted model (unsharded).
        method: its method (supplies exact delta factors).
        base_model_name: recorded as ``base_model_name_or_path``.
    """
    factors = {name: method.delta_factors(layer) for name, layer in adapted_layers(model)}
    saved = {k: p.detach() for k, p in method.trainable_parameters(model)
             if any(k.startswith(m + ".") for m in method.saved_modules)}
    return write_peft(path, factors, saved, method.saved_modules, base_model_name)


def write_peft(path: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
               saved: dict[str, torch.Tensor], saved_modules: list[str], base_model_name: str | None) -> Path:
    """Write per-module exact factors ``(B, A)`` and trained modules as a peft LoRA adapter."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    fused = [name for name, (B, _) in factors.items() if B.dim() == 3]
    for name, (B, A) in factors.items():
        ranks[name] = A.shape[-2]
        key = name
        if B.dim() == 3:
            key, B, A = peft_param_wrapper(name, fused, B, A)
        tensors[f"base_model.model.{key}.lora_A.weight"] = A
        tensors[f"base_model.model.{key}.lora_B.weight"] = B
    for key, value in saved.items():
        tensors[f"base_model.model.{key}"] = value
    r = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name,
        "r": r,
        "lora_alpha": r,  # scale 1: the adapter scale is already folded into lora_B
        "lora_dropout": 0.0,
        "target_modules": sorted(set(ranks) - set(fused)),
        "target_parameters": fused or None,
        # Full module names as patterns: peft matches them as (.*\.)?name$ (exact here).
        "rank_pattern": {name: k for name, k in ranks.items() if k != r},
        "alpha_pattern": {name: k for name, k in ranks.items() if k != r},
        "modules_to_save": saved_modules or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return path


def peft_param_wrapper(name: str, fused: list[str], B: torch.Tensor, A: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """One fused experts weight's factors (B: experts x out x k, A: experts x k x in) as peft's
    ``target_parameters`` stores them (``lora.ParamWrapper``, peft 0.22): ``lora_A`` (k * experts x
    in, expert-major rows), ``lora_B`` (out x k * experts, rank-major columns: ``get_delta_factors``
    reshapes them so), under the experts module's name with one ``.base_layer`` per weight of the
    same module that peft wraps after it (it wraps them in their module order, the first innermost).

    Returns:
        ``(module key, B, A)`` in peft's layout.
    """
    module = name.rpartition(".")[0]
    siblings = [n for n in fused if n.rpartition(".")[0] == module]
    E, out, k = B.shape
    return module + ".base_layer" * (len(siblings) - 1 - siblings.index(name)), \
        B.permute(1, 2, 0).reshape(out, k * E), A.reshape(E * k, A.shape[-1])


@torch.no_grad()
def layer_from_adapter(method: Method, tensors: dict[str, torch.Tensor], module: str) -> AdaptedLinear:
    """A standalone copy of one adapted layer rebuilt from adapter tensors: enough for
    ``method.delta_factors``, one layer of memory; its base is allocated but not read."""
    U = tensors[f"{module}.edit_U"]
    if U.dim() == 3:  # fused experts (never streamed with their weight): a holder, allocated not read
        holder = nn.Module()
        holder.num_experts = U.shape[0]
        holder.w = nn.Parameter(torch.empty(*U.shape[:2], tensors[f"{module}.edit_V"].shape[-1]), requires_grad=False)
        return _filled(method.make_experts_layer(module, holder, "w", fold_edits=False), tensors, module)
    linear = nn.Linear(tensors[f"{module}.edit_V"].shape[1], U.shape[0], bias=False, device="meta").to_empty(device="cpu")
    return _filled(method.make_layer(module, linear, fold_edits=False), tensors, module)


@torch.no_grad()
def layer_on_base(method: Method, module: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> AdaptedLinear:
    """The adapted layer ``module`` on a standalone copy of its base (``weight`` W0 and ``bias``),
    its adapter not filled yet: for ``lrx.build.Adapters.one_layer``, which restores it (the log
    replayed onto W0 as in training) and quantizes its base as the run did."""
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta").to_empty(device="cpu").to(weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return method.make_layer(module, linear, fold_edits=method.config.folds(weight.dtype))


@torch.no_grad()
def _filled(layer: AdaptedLinear, tensors: dict[str, torch.Tensor], module: str) -> AdaptedLinear:
    """``layer`` with its adapter tensors and edit log from an adapter's ``tensors``."""
    for attr, param in layer.adapter_params().items():
        param.copy_(tensors[f"{module}.{attr}"])
    layer.set_edit_log(tensors[f"{module}.edit_U"], tensors[f"{module}.edit_V"], tensors[f"{module}.edit_sizes"])
    return layer


def method_of(config: dict[str, Any], json_file: Path) -> Method:
    """The method an adapter config names (``json_file``), with what its layers are built on loaded."""
    method = build_method(method_config(config, json_file))
    method.load_resources()
    return method


def export_peft_from_adapter(adapter_dir: str | Path, path: str | Path) -> Path:
    """``export_peft`` from an lrx adapter folder, without the base model: each layer's exact
    factors come from a one-layer copy (``layer_from_adapter``)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = read_safetensors(adapter_dir / WEIGHTS_NAME)
    method = method_of(config, adapter_dir / CONFIG_NAME)
    factors = {m: method.delta_factors(layer_from_adapter(method, tensors, m)) for m in config["adapted_modules"]}
    saved = {k: v for k, v in tensors.items()
             if any(k.startswith(m + ".") for m in config.get("saved_modules", []))}
    return write_peft(path, factors, saved, config.get("saved_modules") or [], config.get("base_model"))
