"""LoRA (Hu et al., 2021): ``W0 + (alpha / r) B A`` with A random and B zero at init.

The initialisation matches peft's default (A kaiming-uniform with a=sqrt(5), B zeros), so
the base model's output is unchanged at step 0. All behaviour lives in ``Method``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrx.methods import register_method
from lrx.methods.base import Method, MethodConfig


@dataclass(kw_only=True)
class LoRAConfig(MethodConfig):
    """Plain LoRA has no options beyond the common ones."""


@register_method("lora")
class LoRA(Method):
    config_cls = LoRAConfig
    adapts_experts = True
