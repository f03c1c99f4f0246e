"""Run by the ``srlora_reports`` fixture under torchrun (4 processes); its ``job`` is called in the
test process (one process) and in the ``sharded`` launch (2 processes, ``tests/train_many.py``):
SRLoRA on a small Llama with uneven shapes (255 MLP rows; ZeRO-3 ranges that split rows).

argv: backend (single, fsdp2, zero3), then one or more jobs separated by ``+``, each run in
these processes one after another (one launch): an output JSON, then optionally ``log`` (edits applied
from the edit log beside the adapter, ``method.fuse=log``, instead of folded into the fp32
base), ``nf4`` (the base quantized as ``model.quantize=nf4`` builds it, through ``Adapters``),
and a DeepSpeed config, ``moe`` (a tiny Qwen3-MoE of 3 experts, SRLoRA on its fused experts
only: FSDP2 blocks of 2 and 1 experts, ZeRO-3 ranges that cut an expert; with ``nf4``: on all its
linears and experts, the experts stored as ``QuantizedExperts``, whose codes each rank reports
the piece of, and the adapter merged onto a fresh model on rank 0); or ``buffers BASIS`` (tests/dist_buffers.py: EigenLoRAx's
bases stay whole on every rank); or ``families CELL...`` (cells of tools/family_table.py, each
FAMILY/METHOD/BASE: its report is their table). Every rank
takes checksums of what must be identical everywhere (pool S and V, pair scores, chosen
pairs, the edit log gathered whole); rank 0 writes them all-gathered, with the losses and,
for every event, the relative change of the logits across it (must be ~0: events preserve
the function) and how many numbers it all-reduced; and per rank the bytes of edit log it
holds (FSDP2: its rows only).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from lrx.build import Adapters  # noqa: E402
from lrx.config import load_config  # noqa: E402
from lrx.distributed import ModelSpec, build_backend  # noqa: E402
from lrx.methods import adapted_layers, build_method  # noqa: E402
from tests.dist_buffers import buffers  # noqa: E402
from tests.dist_common import finish, one_process_group, run  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ = 10, 4, 16


def uneven_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=28, intermediate_size=255, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=0.0)
    return AutoModelForCausalLM.from_config(config).float()


def tiny_moe() -> torch.nn.Module:
    from transformers import Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=3, num_experts_per_tok=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).float()


def checksum(t: torch.Tensor) -> list[float]:
    t = t.detach().double().cpu()
    return [float(t.sum()), float(t.abs().sum()), float((t * torch.arange(t.numel()).view(t.shape)).sum())]


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    jobs = [[]]
    for a in args[1:]:
        jobs.append([]) if a == "+" else jobs[-1].append(a)
    with one_process_group():
        for out, *rest in jobs:
            job(args[0], out, rest)


def job(name: str, out: str, rest: list[str]) -> None:
    if rest[:1] == ["buffers"]:  # tests/dist_buffers.py's job, in the same launch
        return buffers(name, rest[1], out)
    if rest[:1] == ["families"]:  # cells of the family table (tests/test_families.py), in the same launch
        return families(name, out, rest[1:])
    fuse = "log" if "log" in rest else "fold"
    replicate = 2 if "hsdp" in rest else 1  # FSDP2 on a 2-D mesh: 2 replicas x world/2 shards
    ds_config = next((a for a in rest if a not in ("log", "hsdp", "nf4", "moe")), None)
    backend = build_backend(name, "cpu", deepspeed_config=ds_config, replicate=replicate)
    rank, world = backend.rank, backend.world_size
    model = tiny_moe() if "moe" in rest else uneven_llama()
    # moe: the experts alone (ZeRO-3's hooks then need the embeddings' output to need a gradient:
    # ZeRO3.setup); moe + nf4: every linear, the experts quantized beside quantized attention.
    targets = "experts" if "moe" in rest and "nf4" not in rest else "all-linear"
    cfg = load_config(None, ["method.r=4", f"method.target_modules=[{targets}]", "method.interval=3",
                             f"method.fuse={fuse}"], method="srlora").method
    method = build_method(cfg)
    quantizer = None
    if "nf4" in rest:
        from lrx.quant import Quantizer, QuantSettings

        quantizer = Quantizer(QuantSettings.for_processes("nf4", world_size=backend.world_size))
    model = backend.build(ModelSpec(lambda meta, built=model: built), Adapters(method, 0, None, quantizer))
    params = [p for _, p in method.trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run = backend.setup(model, optimizer, scheduler, micro_batch=GLOBAL_BATCH // world, grad_accum=1, max_grad_norm=0.0)
    shards = backend.shards()
    reduced = []  # numbers all-reduced by the method's collectives (counted per event)
    inner = shards.all_reduce
    shards.all_reduce = lambda t: (reduced.append(t.numel()), inner(t))[1]
    method.attach(model, shards)
    method.on_train_start(model, optimizer, STEPS)
    data = torch.randint(0, 96, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    probe = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(2))
    mine = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    report = {"losses": [], "invariance": [], "events": [], "event_all_reduce": []}

    def logits() -> torch.Tensor:
        return run(input_ids=probe).logits.detach().double()  # with grad enabled: FSDP2 reshards after

    for step in range(STEPS):
        batch = data[step, mine]
        loss = run(input_ids=batch, labels=batch).loss
        backend.backward(loss)
        method.after_backward(model, step)
        backend.step(optimizer, scheduler, params, 0.0)
        report["losses"].append(backend.all_reduce_sum(loss.detach().clone()).item() / world)
        if step + 1 == (method.events_done + 1) * method.interval and method.events_done < cfg.n_events:
            before = logits()
            reduced.clear()
            records = method.after_optimizer_step(model, optimizer, step + 1)
            report["event_all_reduce"].append(sum(reduced))
            after = logits()
            report["invariance"].append(((after - before).norm() / before.norm()).item())
            report["events"].append([[r["layer"], r["fused_pairs"]] for r in records])
    mine_sums = {}
    for lname, layer in adapted_layers(model):
        pool = method.pool[lname]
        mine_sums[f"{lname}.pool_S"] = checksum(pool["S"])
        mine_sums[f"{lname}.pool_V"] = checksum(pool["V"])
        U, V = layer.edit_log.factors(backend.gather)  # a collective where the log is row-sharded
        mine_sums[f"{lname}.edit_U"] = checksum(U)
        mine_sums[f"{lname}.edit_V"] = checksum(V)
    scores = method.all_pair_scores()
    for lname, s in scores.items():
        mine_sums[f"{lname}.scores"] = checksum(s)
    mine_sums["chosen"] = [float(x) for ev in report["events"] for _, ids in ev for x in torch.tensor(ids).flatten()]
    state = method.state_dict()
    report["state"] = {k: checksum(v) for k, v in state.items() if k.startswith(("stats.", "pool."))}
    layers = list(adapted_layers(model))
    cap = method.edit_rank_bound()
    report["log_bytes_at_capacity"] = sum(4 * cap * (lay.out_features + lay.in_features) for _, lay in layers)
    report["log_bytes_bound"] = {  # the most one of S processes holds with the log's rows split
        s: sum(4 * cap * (-(-lay.out_features // s) + -(-lay.in_features // s)) for _, lay in layers) for s in (1, 2, 4)}
    report["fused_A_numbers"] = sum(cfg.swap * lay.in_features for _, lay in layers)
    report["n_layers"], report["r"] = len(layers), cfg.r
    held = 0  # the bytes of edit log this process keeps: its piece of every tensor of each layer's log
    for _, lay in layers:
        for t in lay.edit_log.held():
            local = t.to_local() if hasattr(t, "to_local") else t
            held += local.numel() * local.element_size()
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine_sums)
        report["log_bytes_held"] = [None] * world
        dist.all_gather_object(report["log_bytes_held"], held)
    else:
        gathered = [mine_sums]
        report["log_bytes_held"] = [held]
    report["per_rank"] = gathered
    # The share of the quantized codes this process holds (a DTensor's rows, a ZeRO-3 partition).
    codes = [m.weight for m in model.modules() if type(m).__name__ == "QuantizedLinear"]
    if codes:
        local = sum(c.to_local().numel() if hasattr(c, "to_local") else c.ds_tensor.numel() if hasattr(c, "ds_tensor")
                    else c.numel() for c in codes)
        report["codes_share"] = local / sum(c.ds_numel if hasattr(c, "ds_numel") else c.numel() for c in codes)
    if "moe" in rest and "nf4" in rest:
        report.update(quantized_experts(model, method, backend, shards, probe, logits, Path(out).with_suffix(".adapter")))
    report["world_size"] = world
    report["mesh"] = list(backend.mesh.shape) if hasattr(backend, "mesh") else None
    finish(backend, out, report)


def quantized_experts(model, method, backend, shards, probe: torch.Tensor, logits, folder: Path) -> dict:
    """``moe nf4``: each rank's piece of every ``QuantizedExperts``' codes (its flat span and the
    bytes; all ranks'), each experts log's rank and baked columns, the trained model's logits of
    ``probe`` (``logits()``, a collective) and on rank 0 those of the saved adapter merged onto a
    freshly built model (``merged_logits``)."""
    import lrx
    from lrx.checkpoint import save_final_adapter
    from lrx.export import merge_into_linears
    from lrx.quant import QuantizedExperts, QuantSettings

    pieces = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedExperts):
            start, end = shards.span(m.weight)
            pieces[name] = [start, end, shards.local(m.weight)[:end - start].tolist()]
    gathered = [pieces]
    if backend.world_size > 1:
        gathered = [None] * backend.world_size
        dist.all_gather_object(gathered, pieces)
    logs = {n: [lay.edit_log.rank, lay.edit_log.baked] for n, lay in adapted_layers(model) if getattr(lay, "fused", False)}
    meta = {"base_model": None, "task": "causal_lm", "num_labels": 0, "model_dtype": "float32",
            "quantize": QuantSettings.for_processes("nf4", world_size=backend.world_size).to_dict()}
    save_final_adapter(folder, model, method, meta, backend.gather, backend.is_main)
    out = {"expert_codes": gathered, "expert_logs": logs, "trained_logits": logits().flatten().tolist()}
    if backend.is_main:
        merged = lrx.load(folder, tiny_moe()).model.eval()
        merge_into_linears(merged)
        with torch.no_grad():
            out["merged_logits"] = merged(input_ids=probe).logits.double().flatten().tolist()
        out["merged_modules"] = sorted({type(m).__name__ for m in merged.modules() if type(m).__module__.startswith("lrx.")})
    return out


def families(name: str, out: str, cells: list[str]) -> None:
    """tools/family_table.py's ``cells`` (FAMILY/METHOD/BASE) under this backend; rank 0 writes
    ``{family: {method/base: cell}}``."""
    from tools import family_table

    table = family_table.run_sharded(name, [tuple(c.split("/")) for c in cells], Path(out).parent / "bases")
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(table))


if __name__ == "__main__":
    run(main)
