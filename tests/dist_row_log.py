"""Run by tests/test_gpu.py under torchrun, one process per GPU: SRLoRA on a tiny bf16 Llama
under FSDP2 with bf16 mixed precision and its edit log beside the adapter, trained twice: with
the log replicated (offloaded: fp32 in host memory, a bf16 copy on the GPU) and row-sharded
(frozen fp32 parameters FSDP2 splits and all-gathers in bf16). With one GPU the second run
holds its log as row parameters too (one shard). Rank 0 writes both runs' losses and their
edit logs' checksums to argv[1]; argv[2] ``cpu`` runs it on CPUs (gloo, no mixed precision).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.adapter import edit_logs  # noqa: E402
from lrx.build import Adapters  # noqa: E402
from lrx.config import load_config  # noqa: E402
from lrx.distributed import build_backend  # noqa: E402
from lrx.methods import adapted_layers, build_method  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.dist_common import finish, run  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ = 12, 4, 32


def train(backend, rows: bool) -> dict:
    model = tiny_model("llama", dtype=torch.bfloat16)
    cfg = load_config(None, ["method.r=4", "method.target_modules=[all-linear]", "method.interval=3"],
                      method="srlora").method
    method = build_method(cfg)
    weights = backend.weights()
    weights.shards_rows = rows  # one GPU: row parameters of one shard; several: FSDP2's own choice when True
    torch.manual_seed(0)
    Adapters(method).adapt(model, weights)
    model = backend.prepare(model)
    params = [p for _, p in method.trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run = backend.setup(model, optimizer, scheduler, micro_batch=GLOBAL_BATCH // backend.world_size, grad_accum=1,
                        max_grad_norm=0.0)
    method.attach(model, backend.shards(), torch.bfloat16)
    method.on_train_start(model, optimizer, STEPS)
    data = torch.randint(0, 128, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    per = GLOBAL_BATCH // backend.world_size
    losses, events = [], 0
    for step in range(STEPS):
        batch = data[step, backend.rank * per : (backend.rank + 1) * per].to(backend.device)
        with torch.autocast(backend.device.type, dtype=torch.bfloat16):
            loss = run(input_ids=batch, labels=batch).loss
        backend.backward(loss)
        method.after_backward(model, step)
        backend.step(optimizer, scheduler, params, 0.0)
        losses.append(backend.all_reduce_sum(loss.detach().float().clone()).item() / backend.world_size)
        events += bool(method.after_optimizer_step(model, optimizer, step + 1))
    layers = [layer for _, layer in adapted_layers(model)]
    logs = edit_logs(model, backend.gather)
    return {"losses": losses, "events": events, "row_logs": sum(layer.edit_log.storage == "rows" for layer in layers),
            "log_dtype": str(layers[0].edit_log.U.dtype), "edit_rank": layers[0].edit_log.rank,
            "log_sums": {k: [float(v.double().sum()), float(v.double().abs().sum())] for k, v in logs.items()
                         if not k.endswith("edit_sizes")}}


def main() -> None:
    backend = build_backend("fsdp2", sys.argv[2] if len(sys.argv) > 2 else "cuda")
    report = {"world_size": backend.world_size, "replicated": train(backend, False), "rows": train(backend, True)}
    finish(backend, sys.argv[1], report)


if __name__ == "__main__":
    run(main)
