"""The torch versions lrx supports, and the one FSDP2 fix it carries for the oldest of them.

lrx supports torch >= ``TORCH_MIN`` (what ``pyproject.toml`` requires; the GPU machines run
2.11) and is tested up to ``TORCH_TESTED`` (README, "Status"). ``check_torch`` refuses an
older torch in one line before anything is built.

Integer parameters under FSDP2 (quantized bases: ``lrx.quant.QuantizedLinear`` keeps its packed
codes as a frozen uint8 parameter). torch 2.11's ``FSDPParam`` wraps each sharded parameter in
``nn.Parameter(dtensor)`` with the default ``requires_grad=True``, which torch refuses for an
integer tensor ("only Tensors of floating point dtype can require gradients"), and it would
cast integer parameters to the mixed-precision ``param_dtype`` for the all-gather (uint8 codes
turned into bf16 numbers). Newer torch passes the parameter's own ``requires_grad`` and keeps
non-floating parameters out of mixed precision (``FSDPParam.init_dtype_attrs``: ``not
orig_dtype.is_floating_point``). ``allow_integer_parameters()`` applies exactly those two changes
on a torch that lacks them (the FSDP2 backend calls it before sharding), so the codes stay sharded (nothing whole
per process) and all-gather as bytes, bit for bit.
"""

from __future__ import annotations

import inspect
import types

import torch

from lrx.errors import ConfigError

TORCH_MIN = (2, 11)
TORCH_TESTED = "2.11 (one H100: tools/gpu_conformance.py; CPU: tests/test_quantized.py) and 2.13 (CI)"


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_torch() -> None:
    """Raises ConfigError (one line) on a torch older than ``TORCH_MIN``."""
    if torch_version() < TORCH_MIN:
        need = ".".join(map(str, TORCH_MIN))
        raise ConfigError(f"lrx needs torch >= {need}; torch {torch.__version__} is installed: "
                          f"pip install 'torch>={need}' (the CUDA build your machine needs)")


def _fsdp_param_module():
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    return _fsdp_param


def fsdp2_keeps_integer_params() -> bool:
    """Whether this torch's FSDP2 shards integer parameters by itself (torch >= 2.12's
    ``init_dtype_attrs`` skips non-floating parameters)."""
    return "is_floating_point" in inspect.getsource(_fsdp_param_module().FSDPParam.init_dtype_attrs)


class _Nn(types.ModuleType):
    """``torch.nn`` as ``_fsdp_param`` sees it during ``fully_shard``, except that a new
    ``Parameter`` of a non-floating tensor does not ask for gradients."""

    def __getattr__(self, name):
        return getattr(torch.nn, name)

    @staticmethod
    def Parameter(data=None, requires_grad=True):  # noqa: N802 (torch.nn's name)
        floating = data is None or data.is_floating_point() or data.is_complex()
        return torch.nn.Parameter(data, requires_grad=requires_grad and floating)


def allow_integer_parameters(force: bool = False):
    """Make FSDP2 accept integer parameters and keep them out of mixed precision (see the module
    doc), for the rest of the process; nothing where torch does so itself, unless ``force``
    (tests apply it on a torch that needs none: it then changes nothing).

    Returns:
        A function that undoes it (tests), or None where nothing was changed.
    """
    module = _fsdp_param_module()
    cls = module.FSDPParam
    if (not force and fsdp2_keeps_integer_params()) or isinstance(module.nn, _Nn):
        return None
    init_dtype_attrs, saved_nn = cls.init_dtype_attrs, module.nn

    def keep_integers(self, mp_policy):  # called at FSDP2's lazy init, before the first all-gather
        init_dtype_attrs(self, mp_policy)
        if not self.orig_dtype.is_floating_point:
            self.param_dtype = None  # all-gathered as stored (bytes), never cast

    module.nn, cls.init_dtype_attrs = _Nn("torch.nn"), keep_integers

    def undo() -> None:
        module.nn, cls.init_dtype_attrs = saved_nn, init_dtype_attrs

    return undo
