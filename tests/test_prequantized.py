"""Checkpoints stored quantized by transformers + bitsandbytes (``save_pretrained`` of a model
loaded with ``BitsAndBytesConfig``): one process trains on the stored codes, bit for bit; the
merged export is the trained model; a run resumes exactly; other formats are refused in one line.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lrx.cli import main, train_main
from lrx.export import export_merged
from lrx.fileio import WeightFiles
from lrx.quant import QuantizedLinear
from tests.conftest import QUICKSTART, tiny_model
from tests.test_checkpoint import adapter, assert_same_adapter
from tests.test_conformance import inputs, logits, rel
from tests.test_distributed import losses

KINDS = {"nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
         "int8": {"load_in_8bit": True}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama saved in fp32, and as transformers saves it loaded in nf4 (double quant) and int8."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("prequantized")
    tiny_model("llama", vocab=30522).save_pretrained(root / "fp32")
    for kind, settings in KINDS.items():
        model = AutoModelForCausalLM.from_pretrained(root / "fp32", quantization_config=BitsAndBytesConfig(**settings),
                                                     device_map="cpu")
        model.save_pretrained(root / kind)
    return root


def argv(base, out, method, *extra):
    return ["--method", method, f"model.name_or_path={base}", "model.tokenizer=minilm-l6", "data.format=instruct",
            f"data.train_path={QUICKSTART / 'train.jsonl'}", "data.max_train_samples=12", "data.max_eval_samples=4", "data.max_length=48",
            "method.r=4", "method.target_modules=[q_proj,v_proj,up_proj]", "train.max_steps=6", "train.batch_size=2",
            "train.lr=2e-2", "train.log_every=1", "train.eval_at_start=false", "train.save_every=3",
            "logging.progress=false", "logging.tensorboard=false", f"logging.output_dir={out}", *extra]


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
def test_a_prequantized_folder_trains_on_its_stored_codes_exports_and_resumes(folders, tmp_path, kind, method, capsys):
    trained = []
    code = train_main(argv(folders / kind, tmp_path / "full", method), callbacks=[trained.append])
    assert code == 0, capsys.readouterr().err
    loss = losses(tmp_path / "full")
    assert loss[-1] < loss[0]
    model = trained[-1].model.eval()
    assert_stored_codes(model, folders / kind)
    recorded = json.loads((tmp_path / "full" / "adapter" / "adapter_config.json").read_text())["quantize"]
    assert recorded["kind"] == kind and recorded["stored"] is True

    from transformers import AutoModelForCausalLM

    export_merged(tmp_path / "full" / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert rel(logits(merged, inputs()), logits(model, inputs())) <= 1e-5
    if kind == "nf4":  # the peft export on the folder loaded as users load it (training mode: see test_quantized)
        import peft

        bnb = AutoModelForCausalLM.from_pretrained(folders / kind, device_map="cpu", dtype=torch.float32)
        restored = peft.PeftModel.from_pretrained(bnb, str(tmp_path / "full" / "adapter_peft")).train()
        assert rel(logits(restored, inputs()), logits(model, inputs())) <= 1e-5

    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")
    assert main(argv(folders / kind, tmp_path / "cut", method, "--resume", "auto")) == 0, capsys.readouterr().err
    assert losses(tmp_path / "cut") == loss
    assert_same_adapter(adapter(tmp_path / "cut"), adapter(tmp_path / "full"), atol=0.0)


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
    assert main(argv(folders / "nf4", tmp_path / "run", "lora", "distributed.backend=fsdp2")) == 2
    err = capsys.readouterr().err.strip()
    assert "in one process only for now (not under FSDP2 or ZeRO-3)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
