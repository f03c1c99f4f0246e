"""Run under torchrun by tests/test_distributed.py: are method buffers whole and identical on
every rank after sharding (argv[3]: fsdp2 or zero3)? Rank 0 writes a JSON report to argv[2]."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.build import Adapters  # noqa: E402
from lrx.config import load_config  # noqa: E402
from lrx.distributed import ModelSpec, build_backend  # noqa: E402
from lrx.methods import adapted_layers, build_method  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.dist_common import finish, run  # noqa: E402


def main() -> None:
    basis, out, name = sys.argv[1], sys.argv[2], sys.argv[3]
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


if __name__ == "__main__":
    run(main)
