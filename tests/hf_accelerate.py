"""Launched by ``tests/test_hf.py`` under ``accelerate launch`` with a config of
``configs/accelerate/``: the Trainer run of ``tests/hf_common.py`` on the model accelerate
placed. Rank 0 writes a JSON report: every rank's losses (its share of each step's loss) and
events, the placement lrx found and accelerate's distributed type, how each event changed the
model's output, the whole-tensor gathers inside events, the parameters' types, a digest of
what every rank must hold alike, and what ``merge()`` said.

Under the FSDP2 plugin on CPU processes (the suite) the script forces accelerate's FSDP path,
which accelerate 1.16 keeps for GPUs (``force_fsdp``); on GPUs it is not forced.

Under ZeRO-3 on CPU (the suite: 2 processes) the same process group then runs, after the fp32
run and its resume from the step-3 checkpoint, the guarantees of lower-precision bases:
``bf16`` (a bf16 base under accelerate's bf16 mixed precision: DeepSpeed's bf16 engine) and
``nf4`` (``lrx.wrap(quantize="nf4")``), 4 steps of one row per process each (both events;
bf16 matmuls are slow on CPUs), without checkpoints. With
``LRX_HF_GPU=1`` (the GPU check of the FSDP2 plugin, ``test_accelerate_fsdp2_on_one_gpu``) it
runs the fp32 base under bf16 mixed precision on the GPU, without checkpoints, and stops there.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.* when launched as a script

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import lrx  # noqa: E402
from lrx.distributed.zero3 import without_shm_allreduce  # noqa: E402
from lrx.errors import ConfigError  # noqa: E402
from lrx.methods import adapted_layers  # noqa: E402
from lrx.quant import QuantizedLinear  # noqa: E402
from tests.dist_common import run  # noqa: E402
from tests.hf_common import METHOD, base_model, hf_trainer  # noqa: E402

GPU = os.environ.get("LRX_HF_GPU") == "1"  # the lead's GPU check of the FSDP2 plugin (CPU in the suite)
PROBE = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def codes(model, gather=None) -> str:
    """A digest of every quantized linear's codes (gathered whole when sharded)."""
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    whole = gather(weights) if gather is not None and weights else weights
    return digest(whole[n].view(torch.uint8) for n in sorted(whole))


class Gathers:
    """Counts whole-tensor gathers (``DTensor.full_tensor``/``redistribute``, torch's all-gathers)
    while active: none may happen inside an FSDP2 event (its edits are shard-local)."""

    NAMES = ((dist, "all_gather"), (dist, "all_gather_into_tensor"), (DTensor, "full_tensor"), (DTensor, "redistribute"))

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self.saved = [(owner, name, getattr(owner, name)) for owner, name in self.NAMES]
        for owner, name, original in self.saved:
            setattr(owner, name, self._counted(original))

    def _counted(self, original):
        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for owner, name, original in self.saved:
            setattr(owner, name, original)


class Watch:
    """``before_train`` of ``hf_trainer``: the codes before training, every event's relative
    change of the logits on ``PROBE`` (the engine's forward, on every rank), and the whole-tensor
    gathers inside the events (``Gathers``)."""

    def __init__(self):
        self.invariance: list[float] = []
        self.codes = None
        self.gathers = Gathers()

    def __call__(self, trainer, adapter) -> None:
        self.codes = codes(adapter.model)
        method = adapter.method
        recompose = method.recompose

        def logits():
            return trainer.model_wrapped(input_ids=PROBE.to(trainer.args.device)).logits.detach().double()

        def watched(optimizer, step):
            before = logits()
            with self.gathers:
                records = recompose(optimizer, step)
            after = logits()
            self.invariance.append(((after - before).norm() / before.norm()).item())
            return records

        method.recompose = watched  # this instance only


def report(trainer, adapter, callback, watch: Watch) -> dict:
    """What one run shows on this rank."""
    placement = callback.placement
    layers = dict(adapted_layers(adapter.model))
    held = placement.gather(dict(adapter.method.trainable_parameters(adapter.model)))
    logs = [t for _, layer in sorted(layers.items()) for t in layer.edit_log.factors(placement.gather)]
    return {"losses": trainer.losses, "rows_as_planned": trainer.rows == trainer.expected_rows,
            "events": callback.events, "kind": placement.kind, "invariance": watch.invariance,
            "event_gathers": watch.gathers.count,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "param_types": sorted({type(p).__name__ for p in adapter.model.parameters()}),
            "mixed_precision": str(trainer.accelerator.mixed_precision),
            "digest": digest([held[k] for k in sorted(held)] + logs),  # adapter and edit logs, gathered
            "logged": all(not layer.fold_edits and layer.edit_log.rank > layer.edit_log.baked for layer in layers.values()),
            "log_dtypes": sorted({str(t.dtype) for t in logs}),
            "base_dtypes": sorted({str(layer.base.weight.dtype) for layer in layers.values()}),
            "codes_kept": watch.codes == codes(adapter.model, placement.gather)}


def merge_refusal(adapter) -> str:
    try:
        adapter.merge()
    except ConfigError as e:
        return str(e)
    return "merged"


def lower_precision(out: Path, rank: int, world: int) -> dict:
    """The bf16 and nf4 runs, in the process group of the first."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    runs = {}
    # A model built while the earlier runs' ZeRO-3 config is alive is partitioned (zero.Init):
    # refused in one line for nf4. Built before any (a script's order), it is whole.
    try:
        lrx.wrap(base_model(), "srlora", quantize="nf4", **METHOD)
        runs["nf4_partitioned"] = "wrapped"
    except ConfigError as e:
        runs["nf4_partitioned"] = str(e)
    for name, how in {"bf16": {"bf16": True, "dtype": torch.bfloat16}, "nf4": {"quantize": "nf4"}}.items():
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state()  # another mixed precision; the process group stays
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if how.get("bf16") else "no"
        watch = Watch()
        trainer, adapter, callback = hf_trainer(out / name, rank=rank, world=world, save_steps=0, before_train=watch, steps=4,
                                                batch=2, **how)
        runs[name] = report(trainer, adapter, callback, watch)
    return runs


def force_fsdp(trainer) -> None:
    """accelerate 1.16 sets ``DistributedType.FSDP`` only on GPU-type processes (``AcceleratorState``
    leaves CPU ones ``MULTI_CPU``, so its FSDP plugin would be dropped for DDP). On the suite's
    CPU gloo processes the shared state is made FSDP here, with the plugin accelerate built from
    the launch config, before the Trainer prepares the model: ``Accelerator.prepare_model`` then
    runs accelerate's own ``fsdp2_prepare_model`` (``fully_shard`` per decoder layer). No override on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if getattr(state, "fsdp_plugin", None) is None:
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* environment
    # Where AcceleratorState.__init__ puts the type: every later AcceleratorState() copies PartialState's.
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def main() -> None:
    out = Path(sys.argv[1])
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        without_shm_allreduce()  # DeepSpeed's CPU inference all-reduce leaks /dev/shm (lrx.distributed.zero3)
    # No accelerate state before the Trainer's arguments make it (with a PartialState made first,
    # without use_cpu, the Trainer saw one process here). The tokenised data is in lrx's cache already.
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    watch = Watch()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not GPU

    def before_train(trainer, adapter):
        if fsdp:
            force_fsdp(trainer)
        watch(trainer, adapter)

    trainer, adapter, callback = hf_trainer(out / "run", rank=rank, world=world, use_cpu=not GPU, bf16=GPU,
                                            save_steps=0 if GPU else 3, before_train=before_train)  # saves step 3
    mine = report(trainer, adapter, callback, watch)
    adapter.save(out / "adapter")
    mine["merge"] = merge_refusal(adapter)
    if not GPU:
        # Killed after step 3: a fresh model, wrapped again, resumed from the Trainer's checkpoint.
        resumed, again, _ = hf_trainer(out / "run", rank=rank, world=world, resume=str(out / "run" / "checkpoint-3"),
                                       before_train=(lambda t, a: force_fsdp(t)) if fsdp else None)
        mine["resumed_losses"] = resumed.losses
        again.save(out / "adapter_resumed")
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            mine.update(lower_precision(out, rank, world))
    every = [None] * world
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(every))
    dist.barrier()


if __name__ == "__main__":
    run(main)
