"""Checkpoints stored quantized by transformers + bitsandbytes (``save_pretrained`` of a model
loaded with ``BitsAndBytesConfig``): one process trains on the stored codes, bit for bit; the
merged export is the trained model; a run resumes exactly; FSDP2 and ZeRO-3 (2 processes, gloo)
stream the folder block by block, each process holding its piece of the stored codes, and train
as one process does; other formats are refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lrx.cli import main, train_main
from lrx.export import export_merged
from lrx.fileio import WeightFiles
from lrx.quant import QuantizedLinear
from tests.conftest import QUICKSTART, REPO, sharded_runs, tiny_model
from tests.test_checkpoint import adapter, assert_same_adapter
from tests.test_conformance import inputs, logits, rel
from tests.test_distributed import BACKENDS, launch_runs, losses

KINDS = {"nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
         "int8": {"load_in_8bit": True}}
_MADE: dict[str, Path] = {}


def made_folders(root: Path) -> Path:
    """A tiny Llama saved in fp32, and as transformers saves it loaded in nf4 (double quant) and
    int8: made once per session, under the first ``root`` asked (the one-process runs and the
    2-process launches of the ``sharded`` fixture read the same folders)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if "root" not in _MADE:
        tiny_model("llama", vocab=30522).save_pretrained(root / "fp32")
        for kind, settings in KINDS.items():
            model = AutoModelForCausalLM.from_pretrained(root / "fp32", device_map="cpu",
                                                         quantization_config=BitsAndBytesConfig(**settings))
            model.save_pretrained(root / kind)
        _MADE["root"] = root
    return _MADE["root"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return made_folders(tmp_path_factory.mktemp("prequantized"))


def argv(base, out, method, *extra, batch: int = 2):
    return ["--method", method, f"model.name_or_path={base}", "model.tokenizer=minilm-l6", "data.format=instruct",
            f"data.train_path={QUICKSTART / 'train.jsonl'}", "data.max_train_samples=12", "data.max_eval_samples=4", "data.max_length=48",
            "method.r=4", "method.target_modules=[q_proj,v_proj,up_proj]", "train.max_steps=6", f"train.batch_size={batch}",
            "train.lr=2e-2", "train.log_every=1", "train.eval_at_start=false", "train.save_every=3",
            "logging.progress=false", "logging.tensorboard=false", f"logging.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def single(folders, tmp_path_factory):
    """``single(kind, method)``: the one-process run on a stored folder (made once per module):
    its run folder and its trained model."""
    done = {}

    def get(kind: str, method: str):
        if (kind, method) not in done:
            trained, out = [], tmp_path_factory.mktemp(f"single-{kind}-{method}") / "run"
            code = train_main(argv(folders / kind, out, method), callbacks=[trained.append])
            assert code == 0
            done[kind, method] = out, trained[-1].model.eval()
        return done[kind, method]

    return get


def assert_stored_codes(model, folder):
    """Every quantized linear holds the codes and statistics the folder stores, bit for bit."""
    files = WeightFiles(sorted(folder.glob("*.safetensors")))
    layers = {n.removesuffix(".base"): m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 14  # 7 linears in each of 2 blocks; the head stays full precision
    for name, layer in layers.items():
        assert torch.equal(layer.weight, files.get(f"{name}.weight")), name
        for key in layer._state_keys:
            stored = f"{name}.{key}" if key == "SCB" else f"{name}.weight.{key}"
            assert torch.equal(getattr(layer, "q_" + key.replace(".", "_")), files.get(stored)), stored


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["lora", "srlora"])
def test_a_prequantized_folder_trains_on_its_stored_codes_exports_and_resumes(folders, single, tmp_path, kind, method,
                                                                              capsys):
    full, model = single(kind, method)
    loss = losses(full)
    assert loss[-1] < loss[0]
    assert_stored_codes(model, folders / kind)
    recorded = json.loads((full / "adapter" / "adapter_config.json").read_text())["quantize"]
    assert recorded["kind"] == kind and recorded["stored"] is True

    from transformers import AutoModelForCausalLM

    export_merged(full / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert rel(logits(merged, inputs()), logits(model, inputs())) <= 1e-5
    if kind == "nf4":  # the peft export on the folder loaded as users load it (training mode: see test_quantized)
        import peft

        bnb = AutoModelForCausalLM.from_pretrained(folders / kind, device_map="cpu", dtype=torch.float32)
        restored = peft.PeftModel.from_pretrained(bnb, str(full / "adapter_peft")).train()
        assert rel(logits(restored, inputs()), logits(model, inputs())) <= 1e-5

    shutil.copytree(full, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")
    assert main(argv(folders / kind, tmp_path / "cut", method, "--resume", "auto")) == 0, capsys.readouterr().err
    assert losses(tmp_path / "cut") == loss
    assert_same_adapter(adapter(tmp_path / "cut"), adapter(full), atol=0.0)


def test_pissa_inits_from_the_stored_weight_and_keeps_its_edits_in_the_log(folders):
    """PiSSA reads each layer's dequantized stored weight (one layer at a time); its residual is
    not quantized again: the codes stay as stored and the init edit stays in the log, so the
    model at init is the stored base."""
    from lrx.build import Adapters
    from lrx.config import load_config
    from lrx.methods import LocalShards, LocalWeights, build_method
    from lrx.models import load_model, stored_quantization
    from lrx.prequant import StoredQuantizer

    def built(method_name):
        model = load_model(str(folders / "nf4"), task="causal_lm")
        quantizer = StoredQuantizer(stored_quantization(str(folders / "nf4")), folders / "nf4")
        if method_name is None:
            quantizer.plan(model, [])
            quantizer.apply(model)
            return model.eval()
        method = build_method(load_config(None, ["method.r=4"], method=method_name).method)
        adapters = Adapters(method, 0, None, quantizer)
        adapters.wrap(model)
        adapters.init(model, LocalWeights())
        method.attach(model, LocalShards())
        return model.eval()

    model, base = built("pissa"), built(None)
    assert_stored_codes(model, folders / "nf4")
    assert rel(logits(model, inputs()), logits(base, inputs())) <= 1e-5
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.edit_log.baked == 0 and layer.edit_log.rank == 4
    U, S, Vh = torch.linalg.svd(layer.base.dequantize(), full_matrices=False)
    top = U[:, :4] * S[:4] @ Vh[:4]
    assert rel(-(layer.edit_log.U @ layer.edit_log.V), top) <= 1e-4


def test_fp4_without_double_quant_and_biases_load_as_transformers_loads_them(tmp_path):
    """A tiny Qwen2 (q/k/v biases) stored in fp4 without double quantization: lrx's model holds
    the stored codes and biases and computes what transformers + bitsandbytes compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config

    from lrx.models import load_model, stored_quantization
    from lrx.prequant import StoredQuantizer

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.bias"):  # initialised to zero: make them tell
                param.normal_()
    model.save_pretrained(tmp_path / "fp32")
    fp4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False)
    AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=fp4, device_map="cpu").save_pretrained(
        tmp_path / "fp4")
    settings = stored_quantization(str(tmp_path / "fp4"))
    assert (settings.kind, settings.double_quant) == ("fp4", False)
    model = load_model(str(tmp_path / "fp4"), task="causal_lm")
    quantizer = StoredQuantizer(settings, tmp_path / "fp4")
    quantizer.plan(model, [])
    assert quantizer.apply(model) == 14
    assert_stored_codes(model.eval(), tmp_path / "fp4")
    bias = model.model.layers[1].self_attn.k_proj.bias
    assert bias.abs().sum() > 0 and torch.equal(bias, WeightFiles([tmp_path / "fp4" / "model.safetensors"]).get(
        "model.layers.1.self_attn.k_proj.bias"))
    bnb = AutoModelForCausalLM.from_pretrained(tmp_path / "fp4", device_map="cpu", dtype=torch.float32).train()
    assert rel(logits(model, inputs()), logits(bnb, inputs())) <= 1e-5


def test_other_quantized_formats_and_a_conflicting_quantize_are_refused_in_one_line(folders, tmp_path, capsys):
    shutil.copytree(folders / "fp32", tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    assert main(argv(tmp_path / "gptq", tmp_path / "run", "lora")) == 2
    err = capsys.readouterr().err.strip()
    assert "stored quantized (gptq), which lrx cannot read" in err and "bitsandbytes nf4/fp4" in err
    assert len(err.splitlines()) == 1
    assert main(argv(folders / "nf4", tmp_path / "run", "lora", "model.quantize=int8")) == 2
    err = capsys.readouterr().err.strip()
    assert "model.quantize=int8 but" in err and "stored quantized as nf4" in err and len(err.splitlines()) == 1
    # A stored folder is no longer refused under FSDP2: in a process no launcher started, it gets
    # FSDP2's own one line about the launcher, before anything is written.
    assert main(argv(folders / "nf4", tmp_path / "run", "lora", "distributed.backend=fsdp2")) == 2
    err = capsys.readouterr().err.strip()
    assert "fsdp2 cannot join the process group" in err and "stored quantized" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ---- sharded: FSDP2 and ZeRO-3 on 2 processes (gloo) -----------------------------------------

SHARDED_METHODS = ("lora", "srlora")


def sharded_run(root: Path, kind: str, method: str) -> tuple[list[str], dict]:
    """A 2-process run on the stored ``kind`` folder (a global batch of 2, as ``single``'s) in
    ``root/{kind}-{method}/run``, each rank's codes checked after every step into
    ``root/{kind}-{method}/codes.rankR.json`` (tests/dist_prequantized.py)."""
    base, out = made_folders(root / "bases") / kind, root / f"{kind}-{method}"
    return ([str(REPO / "launch" / "train.py"), *argv(base, out / "run", method, batch=1)],
            {"stored_codes": [str(base), str(out / "codes")]})


@sharded_runs
def sharded_args(root: Path, backend: str) -> dict:
    """This module's runs in the ``sharded`` fixture's one launch per backend: lora and srlora on the nf4 folder."""
    return {f"prequantized-nf4-{method}": sharded_run(root, "nf4", method) for method in SHARDED_METHODS}


def assert_sharded_as_single(result, folder: Path, single_run, backend: str, method: str, tmp_path: Path) -> None:
    """The 2-process run in ``folder`` streamed the stored folder block by block, each rank held
    its half of the stored codes bit for bit (and the statistics whole), and it trained as the
    one process did: losses, SRLoRA's events (fused pairs, kept exactly in the edit log), the
    adapter, and a merged export that is the one-process trained model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    single_dir, model = single_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{backend}: 2 blocks + root loaded block by block" in result.stderr + result.stdout
    assert losses(folder / "run") == pytest.approx(losses(single_dir), abs=1e-4)
    counts = [{k: json.loads((d / "summary.json").read_text())[k] for k in ("trainable_parameters", "total_parameters")}
              for d in (single_dir, folder / "run")]
    assert counts[1] == counts[0]  # ZeRO-3's parameters partitioned while building count whole
    ranks = [json.loads((folder / f"codes.rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == 14 and ranks[0].keys() == ranks[1].keys()
    for name, layer in ranks[0].items():
        assert ranks[0][name]["same"] and ranks[1][name]["same"], name
        assert layer["held"] + ranks[1][name]["held"] == layer["total"], name
        assert max(layer["held"], ranks[1][name]["held"]) <= -(-layer["total"] // 2), name
    a, b = load_file(str(single_dir / "adapter" / "adapter_model.safetensors")), load_file(
        str(folder / "run" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and torch.allclose(a[key].float(), b[key].float(), rtol=0, atol=1e-4), key
    if method == "srlora":
        events = [[json.loads(x) for x in (d / "method_events.jsonl").read_text().splitlines()]
                  for d in (single_dir, folder / "run")]
        assert len(events[1]) == len(events[0]) > 0
        for x, y in zip(*events):
            assert (x["step"], x["layer"], x["fused_pairs"]) == (y["step"], y["layer"], y["fused_pairs"])
            assert y["fusion_error"] == 0.0  # a stored base takes no folds: every edit is in the exact log
        assert any(k.endswith(".edit_U") for k in b) and all(b[k].item() == 0 for k in b if k.endswith(".edit_baked"))
    export_merged(folder / "run" / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert rel(logits(merged, inputs()), logits(model, inputs())) <= 1e-4


@pytest.mark.distributed
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("method", SHARDED_METHODS)
def test_an_nf4_folder_trains_sharded_as_in_one_process(single, sharded, tmp_path, backend, method):
    result, run_dir = sharded(backend, f"prequantized-nf4-{method}")
    assert_sharded_as_single(result, run_dir.parent, single("nf4", method), backend, method, tmp_path)


@pytest.mark.nightly
@pytest.mark.distributed
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_an_int8_folder_trains_sharded_as_in_one_process(folders, single, tmp_path, backend):
    """As the nf4 runs (regular suite), on the int8 folder: its own launch per backend (nightly),
    which also resumes the srlora run from its step-3 checkpoint: the same losses and adapter."""
    runs = [sharded_run(tmp_path, "int8", method) for method in SHARDED_METHODS]
    full = tmp_path / "int8-srlora" / "run"
    args, _ = runs[-1]
    runs.append([*args[:-1], f"logging.output_dir={tmp_path / 'resumed'}", "--resume",
                 str(full / "checkpoints" / "step-00000003")])  # args[-1]: the output folder
    *results, resumed = launch_runs(tmp_path / "launch", runs, 2, BACKENDS[backend][0])
    for method, result in zip(SHARDED_METHODS, results):
        assert_sharded_as_single(result, tmp_path / f"int8-{method}", single("int8", method), backend, method,
                                 tmp_path / method)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    assert losses(tmp_path / "resumed") == pytest.approx(losses(full)[3:], abs=1e-6)
    assert_same_adapter(adapter(tmp_path / "resumed"), adapter(full), atol=1e-6)
