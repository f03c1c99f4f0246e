"""The fast paths of a training step against the plain one: fused linear + cross-entropy,
compiled blocks, activation checkpointing modes, packing without cross-example attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrx import loss as lrx_loss
from lrx.build import Adapters
from lrx.config import TrainConfig, load_config
from lrx.data import IGNORE_INDEX
from lrx.loss import causal_lm_ce_sum, chunked_ce_sum, install_fused_ce, resolve_fused_ce, token_ce_sum
from lrx.methods import build_method
from lrx.speed import prepare_for_training
from tests.conftest import tiny_model


def _labels(n: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::3] = IGNORE_INDEX
    return labels


def test_chunked_linear_ce_matches_the_float64_loss_and_gradients():
    """Loss and the gradients of the hidden states, the head and its bias, chunk by chunk
    (rows not a multiple of the chunk), against full logits in float64."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(50, generator=g, dtype=torch.float64) * 0.1
    labels = _labels(37, 50, g)
    ref_inputs = [t.clone().requires_grad_() for t in (h, w, b)]
    ref = F.cross_entropy(F.linear(*ref_inputs), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    inputs = [t.float().requires_grad_() for t in (h, w, b)]
    out = chunked_ce_sum(*inputs, labels, rows=8)
    (2.0 * out).backward()  # the backward scales by the incoming gradient
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    for mine, theirs in zip(inputs, ref_inputs):
        assert torch.allclose(mine.grad.double(), 2.0 * theirs.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone, no gradients computed
        assert chunked_ce_sum(*inputs, labels, rows=8).item() == pytest.approx(ref.item(), rel=1e-6)


def _adapted_llama(tie: bool):
    model = tiny_model("llama", vocab=96)
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    cfg = load_config(None, ["method.r=4", "method.target_modules=[all-linear]"], method="lora")
    method = build_method(cfg.method)
    Adapters(method).adapt(model)
    for p in method.layers[next(iter(method.layers))].parameters():  # the adapters start with B = 0:
        p.data.normal_(0, 0.1) if p.requires_grad else None  # move them so their gradients are not trivial
    model.lm_head.weight.requires_grad_(not tie)  # a trained head (modules_to_save) where untied
    return model.train()


@pytest.mark.parametrize("tie", [False, True])
def test_fused_forward_gives_the_plain_loss_and_gradients(tie, monkeypatch):
    """The model's fused forward (``ce_labels=``) against its logits, in fp32: the summed loss
    and the gradients of every trained tensor (adapters, the untied head), several chunks."""
    monkeypatch.setattr(lrx_loss, "CHUNK_ELEMENTS", 96 * 5)  # 5 rows a chunk
    model = _adapted_llama(tie)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 96, (2, 11), generator=g), "attention_mask": torch.ones(2, 11, dtype=torch.long)}
    batch["attention_mask"][1, 8:] = 0
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    batch["labels"][:, :3] = IGNORE_INDEX
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def loss_and_grads():
        model.zero_grad()
        loss = causal_lm_ce_sum(model, model, batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in trained}

    plain, plain_grads = loss_and_grads()
    assert resolve_fused_ce("auto", model, "cpu") == "chunked"
    install_fused_ce(model, "chunked")
    fused, fused_grads = loss_and_grads()
    assert fused == pytest.approx(plain, rel=1e-6)
    assert len(plain_grads) > 2 and ("lm_head.weight" in fused_grads) != tie
    for name, grad in plain_grads.items():
        assert (fused_grads[name] - grad).norm() <= 1e-6 * grad.norm(), name
    with torch.no_grad():  # without ce_labels: the model's own forward (evaluation, generation)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert token_ce_sum(logits, batch["labels"]).item() == pytest.approx(plain, rel=1e-6)


def test_models_with_scaled_logits_keep_them():
    model = tiny_model("llama", vocab=32)
    model.config.final_logit_softcapping = 30.0
    assert resolve_fused_ce("auto", model, "cpu") == "off"
    assert resolve_fused_ce("off", tiny_model("llama", vocab=32), "cpu") == "off"


def test_packed_examples_do_not_attend_to_each_other():
    """Three examples packed into one row (as the collator gives them: position_ids, no
    attention mask) give each example's logits as it alone does, in fp32."""
    import datasets

    from lrx.data import Collator, pack_sequences

    model = tiny_model("llama", vocab=64)
    prepare_for_training(model, TrainConfig(fused_loss="off"), "causal_lm", "cpu", "tiny")  # no KV cache: masks
    g = torch.Generator().manual_seed(2)
    examples = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (5, 7, 4)]
    ds = datasets.Dataset.from_dict({"input_ids": examples, "labels": examples})
    row = Collator(0, "causal_lm")(list(pack_sequences(ds, 16)))
    assert "attention_mask" not in row and row["position_ids"].tolist() == [[0, 1, 2, 3, 4, *range(7), 0, 1, 2, 3]]
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits[0]
        start = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex])).logits[0]
            assert torch.allclose(packed[start : start + len(ex)], alone, atol=1e-5, rtol=1e-5)
            start += len(ex)


def _step_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Two forward/backward passes (the second runs compiled code without recompiling), the
    loss and the trained tensors' gradients of the last."""
    for _ in range(2):
        model.zero_grad()
        loss = causal_lm_ce_sum(model, model, batch)
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("settings", [{"activation_checkpointing": "full"}, {"activation_checkpointing": "selective"},
                                      {"compile": True, "activation_checkpointing": "every2"},
                                      {"compile": True, "activation_checkpointing": "full"}])
def test_checkpointed_and_compiled_steps_equal_the_plain_step(settings, monkeypatch):
    """Every checkpointing mode and compiled blocks (aot_eager: the graphs torch.compile
    captures, without inductor's minute-long CPU compile) against the plain step, in fp32."""
    import lrx.speed

    monkeypatch.setattr(lrx.speed, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, 96, (2, 9), generator=g)}
    batch["labels"] = batch["input_ids"].clone()
    results = []
    for tc in (TrainConfig(), TrainConfig(**settings)):
        model = _adapted_llama(tie=True)
        prepare_for_training(model, tc, "causal_lm", "cpu", "tiny")
        results.append(_step_grads(model, batch))
    (plain, plain_grads), (fast, fast_grads) = results
    assert fast == pytest.approx(plain, rel=1e-6)
    for name, grad in plain_grads.items():
        assert (fast_grads[name] - grad).norm() <= 1e-6 * grad.norm(), name
    blocks = model.model.layers
    if settings.get("compile"):
        assert all(block._compiled_call_impl is not None for block in blocks)
        # The blocks really ran compiled: graphs captured, none broken (a break inside the
        # checkpoint made the whole block run eager).
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
        assert not torch._dynamo.utils.counters["graph_break"]
    mode = settings.get("activation_checkpointing", "none")
    assert [block.gradient_checkpointing for block in blocks] == {
        "none": [False, False], "every2": [True, False]}.get(mode, [True, True])


def test_compile_auto_compiles_on_cuda_for_unquantized_bases():
    """train.compile=auto: compiled blocks where they were measured to pay off (CUDA, an
    unquantized base), eager on CPU and for quantized bases; true/false as given."""
    from lrx.config import load_config
    from lrx.distributed import plan_layout
    from lrx.errors import ConfigError
    from lrx.speed import compiles

    assert TrainConfig().compile == "auto"
    assert compiles("auto", "cuda", quantized=False)
    assert not compiles("auto", "cpu", quantized=False) and not compiles("auto", "cuda", quantized=True)
    assert not compiles("auto", "cuda", quantized=False, hooked=True)  # ZeRO-3 gathers by module hooks
    assert compiles(True, "cpu", quantized=True) and not compiles(False, "cuda", quantized=False)
    assert plan_layout("zero3", 2).gather_hooks and not plan_layout("fsdp2", 2).gather_hooks
    assert load_config(None, ["train.compile=false"]).train.compile is False
    assert load_config(None, ["train.compile=on"]).train.compile is True
    with pytest.raises(ConfigError, match="compile must be auto, true or false, got 'sometimes'"):
        load_config(None, ["train.compile=sometimes"])


def test_a_run_with_every_fast_path_reports_its_speed(tmp_path, capsys):
    """launch/train.py's path with packing, selective checkpointing and the chunked loss
    (training and evaluation) against the same run with full logits: the same losses;
    summary.json says tokens/s and peak memory."""
    import json

    from tests.test_cli import TINY_LM, run_cli

    summaries = []
    for fused in ("off", "chunked"):
        out = tmp_path / fused
        args = [*TINY_LM, "data.packing=true", f"train.fused_loss={fused}", "train.activation_checkpointing=selective",
                "train.max_steps=2", "train.log_every=1", "train.eval_at_start=false", f"logging.output_dir={out}"]
        assert run_cli(args, capsys)[0] == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
    plain, fast = summaries
    assert fast["final_train_loss"] == pytest.approx(plain["final_train_loss"], rel=1e-5)
    assert fast["eval"]["eval_loss"] == pytest.approx(plain["eval"]["eval_loss"], rel=1e-5)
    assert fast["tokens_per_s"] > 0 and fast["peak_host_memory_gib"] > 0
    code, _, err = run_cli([*TINY_LM, "train.activation_checkpointing=sometimes"], capsys)
    assert code == 2 and "train.activation_checkpointing must be one of none, full, selective, every2" in err


def test_compiled_srlora_run_equals_the_eager_run_and_its_events_do_not_recompile(tmp_path, capsys, monkeypatch):
    """SRLoRA through launch/train.py with compiled, checkpointed blocks (aot_eager) against the
    eager run: the same losses and events; the blocks ran compiled (graphs captured, none
    broken) and the events (edits folded into the fp32 base) recompiled nothing: at most one
    more graph, for the batches' varying length."""
    import json

    import lrx.speed
    from tests.test_cli import TINY_LM, run_cli

    monkeypatch.setattr(lrx.speed, "COMPILE_BACKEND", "aot_eager")
    runs = []
    for compiled in ("false", "true"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        out = tmp_path / compiled
        args = ["--method", "srlora", *TINY_LM, "method.r=4", "method.interval=1", "train.max_steps=5",
                "train.log_every=1", "data.eval_path=none", "train.activation_checkpointing=full",
                f"train.compile={compiled}", f"logging.output_dir={out}"]
        assert run_cli(args, capsys)[0] == 0
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append(([r["loss"] for r in lines if "loss" in r], dict(torch._dynamo.utils.counters["stats"])))
    (eager, _), (fast, stats) = runs
    assert len(fast) == 5 and fast == pytest.approx(eager, rel=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert 1 <= stats["unique_graphs"] <= 2


def test_throughput_benchmark_runs_lrx_and_peft_and_writes_its_rows(tmp_path):
    """tools/bench_throughput.py on a tiny shape on CPU: each variant in its own process, the
    JSON rows the README table is made from, and a bad variant refused in one line."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "rows.json"
    tool = str(REPO / "tools" / "bench_throughput.py")
    cmd = [sys.executable, tool, "--model-config", "tiny", "--device", "cpu", "--seq", "32", "--warmup", "1",
           "--steps", "1", "--profile", "1", "--variants", "lrx:lora:none:full:fused_loss=chunked", "peft:lora:none:none",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["checkpointing"]) for r in rows] == [("lrx", "full"), ("peft", "none")]
    for row in rows:
        assert row["tok_s"] > 0 and len(row["repeats_tok_s"]) == 2 and row["peak_gib"] > 0 and row["card"] == "cpu"
        # --profile: one more step under torch.profiler, after the timed ones (no device kernels on a CPU)
        assert row["profile"]["step_ms"] > 0 and row["profile"]["device_busy_ms"] == 0
    assert rows[0]["settings"] == {"fused_loss": "chunked", "loss": "chunked", "compile": "false", "backend": "single"}
    table = subprocess.run([sys.executable, tool, "--table", str(out)], capture_output=True, text=True).stdout
    assert "| lrx | lora | none | full | backend=single, compile=false, fused_loss=chunked, loss=chunked |" in table
    bad = subprocess.run([sys.executable, tool, "--variants", "lrx:lora:int3:full"], capture_output=True, text=True)
    assert bad.returncode == 2 and "bad variant 'lrx:lora:int3:full'" in bad.stderr


@pytest.mark.gpu
def test_liger_and_chunked_losses_agree_on_a_gpu():
    """liger-kernel's fused linear cross-entropy against the chunked torch one on CUDA, under
    bf16 autocast with a trained head: loss and gradients within bf16 rounding."""
    pytest.importorskip("liger_kernel")
    from lrx.loss import liger_ce_sum

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1000, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(5000, 256, device="cuda", generator=g) * 0.05
    labels = torch.randint(0, 5000, (1000,), device="cuda", generator=g)
    labels[::4] = IGNORE_INDEX
    results = []
    for fn in (chunked_ce_sum, liger_ce_sum):
        inputs = [t.clone().requires_grad_() for t in (h, w)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(inputs[0], inputs[1], None, labels)
        loss.backward()
        results.append((loss.float(), inputs[0].grad.float(), inputs[1].grad.float()))
    for mine, theirs in zip(*results):
        assert (mine - theirs).norm() <= 2e-2 * theirs.norm()


def test_selective_checkpointing_keeps_the_matmuls_that_narrow_their_input():
    """``selective`` keeps a matmul's output only where its input is at least twice as wide
    (the down projection, LoRA's A): the most recompute saved per byte; square and widening
    matmuls and attention are recomputed."""
    from torch.utils.checkpoint import CheckpointPolicy

    from lrx.speed import _matmuls, _selective_policy

    aten, matmuls = torch.ops.aten, _matmuls()

    def policy(op, *args):
        return _selective_policy(matmuls, None, op, *args)

    x = torch.empty(8, 64)
    assert policy(aten.mm.default, torch.empty(8, 224), torch.empty(224, 64)) == CheckpointPolicy.MUST_SAVE
    assert policy(aten.addmm.default, torch.empty(64), torch.empty(8, 224), torch.empty(224, 64)) == CheckpointPolicy.MUST_SAVE
    assert policy(aten.bmm.default, torch.empty(4, 8, 64), torch.empty(4, 64, 16)) == CheckpointPolicy.MUST_SAVE
    assert policy(aten.mm.default, x, torch.empty(64, 64)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(aten.mm.default, x, torch.empty(64, 224)) == CheckpointPolicy.PREFER_RECOMPUTE
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert policy(sdpa, x, x, x) == CheckpointPolicy.PREFER_RECOMPUTE
