"""LoRA-family methods: the adapted layer, the method protocol and the registry.

Pure torch: nothing here imports ``torch.distributed`` or ``deepspeed`` (a test checks).
A method registers itself with ``@register_method("name")``; ``--method name`` resolves
through ``get_method_class``.
"""

from __future__ import annotations

from lrx.errors import ConfigError
from lrx.methods.base import (
    EditingConfig,
    Method,
    MethodConfig,
    adapted_layers,
    find_targets,
    layer_counts,
    unfilled,
    without_retired_keys,
)
from lrx.methods.layer import AdaptedLinear
from lrx.methods.seam import LocalShards, LocalWeights, PieceShards, Shards, WeightAccess

_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make a ``Method`` subclass available as ``--method name``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_method_class(name: str) -> type[Method]:
    """The registered method class for ``name``; ConfigError listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'; available methods: {', '.join(available_methods())}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def build_method(config: MethodConfig) -> Method:
    """Instantiate the method named by ``config.name``."""
    return get_method_class(config.name)(config)


# Registration happens on import: one line per method.
from lrx.methods import eigenlorax, lora, pissa, srlora  # noqa: E402,F401

__all__ = [
    "AdaptedLinear",
    "EditingConfig",
    "LocalShards",
    "LocalWeights",
    "Method",
    "MethodConfig",
    "PieceShards",
    "Shards",
    "WeightAccess",
    "adapted_layers",
    "available_methods",
    "build_method",
    "find_targets",
    "get_method_class",
    "layer_counts",
    "register_method",
    "unfilled",
    "without_retired_keys",
]
