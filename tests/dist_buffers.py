"""A job of tests/dist_srlora.py (``buffers BASIS``), for tests/test_distributed.py: are method
buffers whole and identical on every rank after sharding? Rank 0 writes a JSON report."""

import torch
import torch.distributed as dist

from lrx.build import Adapters
from lrx.config import load_config
from lrx.distributed import ModelSpec, build_backend
from lrx.methods import adapted_layers, build_method
from tests.conftest import tiny_model
from tests.dist_common import finish


def buffers(name: str, basis: str, out: str) -> None:
    """EigenLoRAx on a tiny BERT on backend ``name``: per adapted layer, the bases' checksums on
    every rank and the loadings' type; written to ``out``."""
    backend = build_backend(name, "cpu")
    model = tiny_model("bert")
    method = build_method(load_config(None, [f"method.basis={basis}", "method.r=4"], method="eigenlorax").method)
    model = backend.build(ModelSpec(lambda meta, built=model: built), Adapters(method, 0))
    params = [p for _, p in method.trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    backend.setup(model, optimizer, scheduler, micro_batch=1, grad_accum=1, max_grad_norm=0.0)
    report = {}
    for name, layer in adapted_layers(model):
        for key in ("C_A", "C_B"):
            t = getattr(layer, key)
            local = torch.tensor([float(t.double().sum()), float(t.double().abs().sum()), float(t.numel())])
            gathered = [torch.zeros(3, dtype=local.dtype) for _ in range(backend.world_size)]
            dist.all_gather(gathered, local)
            report[f"{name}.{key}"] = {"shape": list(t.shape), "type": type(t).__name__,
                                       "per_rank": [g.tolist() for g in gathered]}
        alpha = layer.alpha_A
        report[f"{name}.alpha_A.type"] = (
            "partitioned" if hasattr(alpha, "ds_tensor") and alpha.numel() == 0 else type(alpha).__name__
        )
    finish(backend, out, report)

