"""What each process of a sharded run on a pre-quantized folder holds of the stored codes (for
tests/test_prequantized.py). A run of tests/train_many.py with ``"stored_codes": [FOLDER, OUT]``
runs ``launch/train.py`` with ``stored_codes(FOLDER, OUT)`` as its callback: after every
optimizer step each rank writes ``OUT.rankR.json``: per quantized linear whether this rank's
piece of the codes (FSDP2: its block of rows; ZeRO-3: its flat partition) and its statistics
(whole buffers) equal the folder's bit for bit, and how many codes it holds of how many."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lrx.fileio import WeightFiles  # noqa: E402
from lrx.quant import QuantizedLinear  # noqa: E402
from lrx.sharding import fsdp_row_range  # noqa: E402


def piece(codes: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, slice, bool]:
    """This rank's piece of a sharded codes parameter: ``(local values, their flat slice of the
    whole, whether they are rows)``."""
    if hasattr(codes, "to_local"):  # FSDP2: a block of rows
        first, end = fsdp_row_range(codes.shape[0], world, rank)
        return codes.to_local(), slice(first, end), True
    if hasattr(codes, "ds_tensor"):  # ZeRO-3: a flat partition, padded at the end
        part = codes.ds_tensor.ds_numel
        start = min(rank * part, codes.ds_numel)
        end = min(start + part, codes.ds_numel)
        return codes.ds_tensor.view(-1)[: end - start], slice(start, end), False
    return codes.detach(), slice(0, codes.shape[0]), True


def check(model: torch.nn.Module, files: WeightFiles, rank: int, world: int) -> dict:
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        name = name.removesuffix(".base")
        local, where, rows = piece(module.weight, rank, world)
        stored = files.get(f"{name}.weight")
        expected = stored[where] if rows else stored.flatten()[where]
        same = local.dtype == stored.dtype and torch.equal(local.cpu(), expected)
        for key in module._state_keys:
            value = getattr(module, "q_" + key.replace(".", "_"))
            same = same and torch.equal(value.cpu(), files.get(f"{name}.{key}" if key == "SCB" else f"{name}.weight.{key}"))
        layers[name] = {"same": bool(same), "held": local.numel(), "total": stored.numel()}
    return layers


def stored_codes(folder: str, out: str):
    """A ``launch/train.py`` callback writing ``check`` of the trained model to ``OUT.rankR.json``."""
    files = WeightFiles(sorted(Path(folder).glob("*.safetensors")))

    def record(trainer) -> None:  # the run joins the process group after this callback is made
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(check(trainer.module, files, rank, world)))

    return record
