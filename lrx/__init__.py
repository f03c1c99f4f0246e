"""lrx: distributed LoRA-family fine-tuning (SRLoRA, EigenLoRAx, LoRA, PiSSA).

The Python API (``lrx.api``): ``wrap`` a model you already have with a method, train it (inside a
transformers Trainer with ``lrx.hf.LrxCallback``), ``Adapter.save`` / ``load`` / ``Adapter.merge``.
"""

__version__ = "0.1.0"

from lrx.api import Adapter, load, method_config, wrap  # noqa: E402  (after __version__: lrx.adapter reads it)

__all__ = ["Adapter", "load", "method_config", "wrap", "__version__"]
