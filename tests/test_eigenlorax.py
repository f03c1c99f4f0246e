"""EigenLoRAx: the basis builder against float64, its bad-input errors, and the method."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lrx.adapter import export_peft, load_adapter, save_adapter
from lrx.build import Adapters
from lrx.cli import eigenbasis_main, main
from lrx.config import load_config
from lrx.eigenbasis import build_basis, load_basis
from lrx.errors import LrxError
from lrx.methods import adapted_layers, build_method
from lrx.methods.layer import adapter_weight
from tests.conftest import REPO, tiny_model
from tests.test_cli import write_table

MODULES = {"enc.0.q": (24, 16), "enc.0.v": (24, 16), "enc.1.q": (20, 24)}  # name: (in, out)


def write_adapter(folder, seed, r=3, modules=MODULES, base="tiny-base", scale=1.0, nan=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_in, d_out) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, d_in, generator=g, dtype=dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, r, generator=g, dtype=dtype) * scale
    if nan:
        next(iter(tensors.values()))[0, 0] = float("nan")
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": r, "base_model_name_or_path": base,
         "target_modules": sorted(modules)}))
    return folder


def sources(tmp_path, n=4, **kw):
    return [write_adapter(tmp_path / f"a{i}", seed=i, **kw) for i in range(n)]


def test_basis_matches_float64_reference(tmp_path):
    srcs = sources(tmp_path)
    meta = build_basis(srcs, tmp_path / "basis", k=5)
    _, tensors = load_basis(tmp_path / "basis")
    for name in MODULES:
        for part in ("A", "B"):
            cols = []
            for src in srcs:
                from safetensors.torch import load_file

                t = load_file(str(src / "adapter_model.safetensors"))[f"base_model.model.{name}.lora_{part}.weight"]
                cols.append(t.double().t() if part == "A" else t.double())
            M = torch.cat(cols, dim=1)
            M = M - M.mean(dim=1, keepdim=True)
            U, S, _ = torch.linalg.svd(M, full_matrices=False)
            C = tensors[f"{name}.C_{part}"].double()
            assert C.shape == (M.shape[0], 5)
            cos = (C * U[:, :5]).sum(0).abs()
            assert torch.all(cos > 1 - 1e-6), (name, part, cos)
            torch.testing.assert_close(tensors[f"{name}.evr_{part}"].double(), (S[:5] ** 2) / (S**2).sum(),
                                       rtol=1e-5, atol=1e-7)
    assert meta["k"] == 5 and len(meta["sources"]) == 4 and len(meta["sources"][0]["sha256"]) == 64


def test_augmentation_is_orthonormal_and_deterministic(tmp_path):
    srcs = sources(tmp_path)
    build_basis(srcs, tmp_path / "b1", k=4, augment=6, seed=3)
    build_basis(srcs, tmp_path / "b2", k=4, augment=6, seed=3)
    assert (tmp_path / "b1/eigenbasis.safetensors").read_bytes() == (tmp_path / "b2/eigenbasis.safetensors").read_bytes()
    _, tensors = load_basis(tmp_path / "b1")
    for name in MODULES:
        for part in ("A", "B"):
            C = tensors[f"{name}.C_{part}"].double()
            assert C.shape[1] == 10
            assert (C.t() @ C - torch.eye(10, dtype=torch.float64)).abs().max() <= 1e-6


def test_fewer_columns_than_k_warns_and_augments_only_if_asked(tmp_path, caplog):
    srcs = sources(tmp_path, n=2, r=2)  # 4 columns, centred rank 3
    with caplog.at_level(logging.WARNING):
        build_basis(srcs, tmp_path / "b", k=8)
    assert "only 3 principal components exist" in caplog.text
    _, tensors = load_basis(tmp_path / "b")
    assert tensors["enc.0.q.C_A"].shape[1] == 3
    build_basis(srcs, tmp_path / "b_aug", k=8, augment=5)
    assert load_basis(tmp_path / "b_aug")[1]["enc.0.q.C_A"].shape[1] == 8


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda p: write_adapter(p / "x", 9, base="other-model"), "trained on base model 'other-model'"),
        (lambda p: write_adapter(p / "x", 9, modules={**MODULES, "enc.0.q": (25, 16)}), "has shape in=25"),
        (lambda p: write_adapter(p / "x", 9, modules={k: v for k, v in MODULES.items() if k != "enc.1.q"}),
         "target modules differ"),
        (lambda p: write_adapter(p / "x", 9, modules={**MODULES, "enc.2.q": (8, 8)}), "extra ['enc.2.q']"),
        (lambda p: write_adapter(p / "x", 9, nan=True), "contains NaN or Inf"),
    ],
)
def test_inconsistent_or_broken_sources_name_the_file(tmp_path, make, fragment):
    bad = make(tmp_path)
    with pytest.raises(LrxError) as e:
        build_basis([*sources(tmp_path), bad], tmp_path / "basis", k=3)
    assert fragment in str(e.value) and str(bad) in str(e.value)
    assert not (tmp_path / "basis" / "eigenbasis.safetensors").exists()


def test_pickle_and_empty_folders_are_refused(tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    with pytest.raises(LrxError, match=r"adapter_model\.bin: pickle weight files are refused"):
        build_basis([pickled], tmp_path / "basis", k=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LrxError, match=f"adapter folder {empty} is empty"):
        build_basis([empty], tmp_path / "basis", k=2)


def test_builder_cli(tmp_path, capsys):
    srcs = sources(tmp_path)
    tool = str(REPO / "tools" / "build_eigenbasis.py")
    out = subprocess.run([sys.executable, tool, str(tmp_path / "b"), *map(str, srcs), "--k", "3", "--augment", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "explained variance kept" in out.stdout and "K=3, P=1" in out.stdout
    # Bad input and --help: what the tool runs (lrx.cli.eigenbasis_main), in this process.
    assert eigenbasis_main([str(tmp_path / "c"), str(tmp_path / "missing"), "--k", "3"]) == 2
    assert "missing not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        eigenbasis_main(["--help"])
    assert exited.value.code == 0 and "--augment" in capsys.readouterr().out


# ---- the method on a tiny BERT -------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_basis(tmp_path_factory):
    from tests.test_conformance import eigenbasis_for

    return eigenbasis_for("bert")


def eigen(basis, *overrides):
    cfg = load_config(None, [f"method.basis={basis}", "method.r=4", *overrides], method="eigenlorax").method
    model = tiny_model("bert")
    original = copy.deepcopy(model)
    method = build_method(cfg)
    torch.manual_seed(0)
    Adapters(method).adapt(model)
    return original, model, method


def test_only_loadings_train_with_2kr_parameters(bert_basis):
    _, model, method = eigen(bert_basis)
    layers = dict(adapted_layers(model))
    assert layers
    meta, _ = load_basis(bert_basis)
    k = meta["k"] + meta["augment"]
    for layer in layers.values():
        assert set(layer.adapter_params()) == {"alpha_A", "alpha_B"}
        assert sum(p.numel() for p in layer.adapter_params().values()) == 2 * k * 4
        assert not layer.C_A.requires_grad and "C_A" in dict(layer.named_buffers())
    adapter = sum(p.numel() for n, p in method.trainable_parameters(model) if ".alpha_" in n)
    assert adapter == len(layers) * 2 * k * 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in method.trainable_parameters(model)}


def test_loadings_only_adapter_references_the_basis(bert_basis, tmp_path):
    _, model, method = eigen(bert_basis)
    save_adapter(tmp_path / "ad", model, method, {})
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["method"]["basis_sha256"] == load_basis(bert_basis)[0]["sha256"]
    from safetensors.torch import load_file

    keys = {k.rsplit(".", 1)[-1] for k in load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))}
    assert "C_A" not in keys and {"alpha_A", "alpha_B"} <= keys
    # A different basis under the same path is detected.
    other = tmp_path / "other_basis"
    build_basis(sources(tmp_path), other, k=2)
    config["method"]["basis"] = str(other)
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LrxError, match="is not the one the adapter was trained on"):
        load_adapter(tmp_path / "ad", tiny_model("bert"))


def test_the_basis_an_adapter_names_is_found_from_any_folder(bert_basis, tmp_path, monkeypatch):
    """A basis given as a relative path is recorded absolute; one recorded relative (older files)
    is resolved from the adapter's folder, whatever the working directory."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(bert_basis, work / "basis")
    monkeypatch.chdir(work)
    original, model, method = eigen("basis", "method.init=zero_b")
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.alpha_B.normal_(0, 0.1)
    save_adapter(work / "runs" / "ad", model, method, {})
    file = work / "runs" / "ad" / "adapter_config.json"
    assert json.loads(file.read_text())["method"]["basis"] == str(work / "basis")
    config = json.loads(file.read_text())
    config["method"]["basis"] = "../../basis"  # relative to the adapter's folder, as an older file may hold
    file.write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)  # elsewhere
    fresh = copy.deepcopy(original)
    load_adapter(work / "runs" / "ad", fresh)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    config["method"]["basis"] = "gone"
    file.write_text(json.dumps(config))
    with pytest.raises(LrxError, match="adapter_config.json: method.basis 'gone' not found"):
        load_adapter(work / "runs" / "ad", copy.deepcopy(original))


def test_project_init_reproduces_an_adapter_in_the_basis_span(bert_basis, tmp_path):
    original, model, method = eigen(bert_basis, "method.init=zero_b")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # an adapter that lies in the basis span, at a different scale
        for _, layer in adapted_layers(model):
            layer.alpha_A.copy_(torch.randn(layer.alpha_A.shape, generator=g))
            layer.alpha_B.copy_(torch.randn(layer.alpha_B.shape, generator=g))
    export_peft(tmp_path / "src", model, method)
    cfg = json.loads((tmp_path / "src" / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 2 * cfg["r"]  # peft scale 2: project must account for it
    (tmp_path / "src" / "adapter_config.json").write_text(json.dumps(cfg))
    _, projected, _ = eigen(bert_basis, "method.init=project", f"method.project_from={tmp_path / 'src'}")
    for (_, a), (_, b) in zip(adapted_layers(model), adapted_layers(projected)):
        torch.testing.assert_close(adapter_weight(b), 2 * adapter_weight(a), rtol=1e-4, atol=1e-6)


def test_eigenlorax_trains_from_the_cli(bert_basis, tmp_path, capsys):
    data = write_table(tmp_path / "t.tsv")
    out = tmp_path / "run"
    code = main(["--method", "eigenlorax", "model.name_or_path=tiny-bert", "data.format=table",
                 f"data.train_path={data}", f"data.eval_path={data}", f"method.basis={bert_basis}", "method.r=4",
                 "train.max_steps=3", "train.lr=1e-2", "logging.progress=false", f"logging.output_dir={out}"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    meta, _ = load_basis(bert_basis)
    n_layers = len(meta["target_modules"])
    head = 64 * 2 + 2
    assert summary["trainable_parameters"] == n_layers * 2 * (meta["k"] + meta["augment"]) * 4 + head


def test_missing_basis_is_a_config_error():
    from lrx.errors import ConfigError

    with pytest.raises(ConfigError, match="eigenlorax needs method.basis"):
        load_config(None, [], method="eigenlorax")
    with pytest.raises(LrxError, match="is not an EigenLoRAx basis"):
        eigen("/nonexistent/basis")
