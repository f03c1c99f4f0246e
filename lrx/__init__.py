"""lrx: distributed LoRA-family fine-tuning (SRLoRA, EigenLoRAx, LoRA, PiSSA).

The Python API (``lrx.api``): ``wrap`` a model you already have with a method, train it (inside a
transformers Trainer with ``lrx.hf.LrxCallback``), ``Adapter.save`` / ``load`` / ``Adapter.merge``.
Those names are imported from ``lrx.api`` on first use (PEP 562): ``import lrx.stop`` or
``import lrx.faults`` then costs no transformers import (~3 s of CPU in every launched process).
"""

__version__ = "0.1.0"

__all__ = ["Adapter", "load", "method_config", "wrap", "__version__"]

_API = {"Adapter", "load", "method_config", "wrap"}


def __getattr__(name: str):
    if name in _API:
        from lrx import api

        value = getattr(api, name)
        globals()[name] = value  # once: later lookups skip this function
        return value
    raise AttributeError(f"module 'lrx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
