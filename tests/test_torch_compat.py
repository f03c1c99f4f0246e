"""The supported torch range and the FSDP2 backport for integer (quantized) parameters.

On torch 2.11 ``fully_shard`` refuses a module with a uint8 parameter ("only Tensors of floating
point dtype can require gradients") and would cast it to the mixed-precision dtype; the FSDP2
backend applies ``allow_integer_parameters`` so that the codes shard and all-gather bit for
bit. Here (torch >= 2.12 needs no backport) the tests force it, so the backport itself is
exercised; run under torch 2.11 they show the fix (they fail there without it).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lrx.distributed import torch_compat
from lrx.errors import ConfigError
from lrx.quant import QuantizedLinear, QuantSettings
from lrx.runner import count_parameters
from tests.conftest import tiny_model


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def backport():
    undo = torch_compat.allow_integer_parameters(force=True)
    yield
    if undo is not None:
        undo()


class Block(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.plain = nn.Linear(64, 64)
        source = nn.Linear(64, 128)
        self.quant = QuantizedLinear.of(source.weight, QuantSettings(kind), source.bias)

    def forward(self, x):
        return self.quant(self.plain(x))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_fully_shard_keeps_integer_codes_bit_exact_under_mixed_precision(one_process_group, backport, kind):
    """The codes stay a frozen uint8/int8 DTensor, are all-gathered as stored under a bf16
    param_dtype (never cast), and the sharded block computes what the unsharded one does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    block = Block(kind)
    codes = block.quant.weight.detach().clone()
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = block(x.to(torch.bfloat16).float()).float()
    fully_shard(block, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    param = block.quant.weight
    assert param.dtype == codes.dtype and not param.requires_grad
    assert torch.equal(param.full_tensor(), codes)
    seen = {}
    block.quant.register_forward_pre_hook(lambda m, args: seen.update(codes=m.weight.detach().clone()))
    y = block(x)
    assert seen["codes"].dtype == codes.dtype and torch.equal(seen["codes"], codes)  # all-gathered as bytes
    assert ((y.float() - expected).norm() / expected.norm()).item() < 1e-2  # bf16 compute
    y.float().sum().backward()
    assert block.plain.weight.grad is not None and block.quant.weight.grad is None


def test_the_backport_leaves_floating_parameters_as_torch_makes_them():
    nn_ = torch_compat._Nn("torch.nn")
    assert nn_.Parameter(torch.zeros(2)).requires_grad
    assert not nn_.Parameter(torch.zeros(2), requires_grad=False).requires_grad
    assert not nn_.Parameter(torch.zeros(2, dtype=torch.uint8)).requires_grad
    assert nn_.Linear is nn.Linear


def test_an_older_torch_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.10.1+cu128")
    with pytest.raises(ConfigError, match=r"lrx needs torch >= 2\.11; torch 2\.10\.1\+cu128 is installed") as e:
        torch_compat.check_torch()
    assert "\n" not in str(e.value)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    torch_compat.check_torch()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantized_model_counts_weights_not_bytes(kind):
    model = tiny_model("llama")
    _, total = count_parameters(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                setattr(parent, name, QuantizedLinear.of(child.weight, QuantSettings(kind), child.bias))
    assert count_parameters(model)[1] == total
