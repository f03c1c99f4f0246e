"""Merged export opens in plain transformers and reproduces the trained model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lrx.adapter import load_adapter
from lrx.cli import main
from lrx.errors import LrxError
from lrx.export import export_merged
from tests.conftest import REPO, tiny_model
from tests.test_cli import write_table
from tests.test_conformance import eigenbasis_for

EXTRA = {
    "lora": ["method.target_modules=[query,value]"],
    "srlora": ["method.target_modules=[query,value]", "method.r_target=8"],  # 2 events in 8 steps
    "eigenlorax": [],
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_model("bert", vocab=30522).save_pretrained(path)  # MiniLM tokenizer ids
    return path


@pytest.mark.parametrize("method", list(EXTRA))
def test_merged_export_matches_trained_model(tmp_path, base_dir, method, capsys, caplog):
    data = write_table(tmp_path / "t.tsv")
    extra = EXTRA[method] + ([f"method.basis={eigenbasis_for('bert')}"] if method == "eigenlorax" else [])
    code = main(["--method", method, f"model.name_or_path={base_dir}", "model.tokenizer=minilm-l6",
                 "data.format=table", f"data.train_path={data}", "method.r=4", "train.max_steps=8",
                 "train.lr=1e-2", "logging.progress=false", f"logging.output_dir={tmp_path / 'run'}", *extra])
    assert code == 0, capsys.readouterr().err
    if method == "srlora":
        events = (tmp_path / "run" / "method_events.jsonl").read_text().splitlines()
        assert {json.loads(e)["event"] for e in events} == {1, 2}
    with caplog.at_level("INFO", logger="lrx.export"):
        out = export_merged(tmp_path / "run" / "adapter", tmp_path / "merged", max_shard_size="1MB")
    assert "streamed" in caplog.text  # the base is a safetensors folder: one tensor at a time
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all((out / shard).is_file() for shard in set(index["weight_map"].values()))
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    trained = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    load_adapter(tmp_path / "run" / "adapter", trained)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, trained(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
    assert not any("lora" in k or "alpha" in k for k in merged.state_dict())
    with pytest.raises(LrxError, match="already holds a model"):
        export_merged(tmp_path / "run" / "adapter", out)


def test_export_cli_errors(tmp_path):
    tool = str(REPO / "tools" / "export_merged.py")
    run = subprocess.run([sys.executable, tool, str(tmp_path / "nope"), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "is not an adapter folder" in run.stderr


def test_export_streams_from_a_checkpoint_folder(tmp_path, base_dir, capsys, caplog):
    """A base saved as safetensors is exported tensor by tensor; a checkpoint folder works as
    input; the shard index names every tensor once, in the shard that holds it."""
    data = write_table(tmp_path / "t.tsv")
    code = main(["--method", "srlora", f"model.name_or_path={base_dir}", "model.tokenizer=minilm-l6",
                 "data.format=table", f"data.train_path={data}", "method.r=4", "train.max_steps=8", "train.save_every=4",
                 "train.lr=1e-2", "logging.progress=false", f"logging.output_dir={tmp_path / 'run'}", *EXTRA["srlora"]])
    assert code == 0, capsys.readouterr().err
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000008"
    with caplog.at_level("INFO", logger="lrx.export"):
        out = export_merged(ckpt, tmp_path / "merged", max_shard_size="200KB", dtype="bfloat16")
    assert "streamed 4 merged layers" in caplog.text
    index = json.loads((out / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    total = 0
    for key, shard in index["weight_map"].items():
        with safe_open(str(out / shard), framework="pt") as f:
            assert key in f.keys()
            t = f.get_tensor(key)
            total += t.numel() * t.element_size()
    assert total == index["metadata"]["total_size"]
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    trained = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    load_adapter(ckpt / "adapter", trained)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, trained(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() <= 2e-2  # bf16 weights


def test_peft_export_from_a_checkpoint_folder(tmp_path, base_dir, capsys):
    from peft import PeftModel

    data = write_table(tmp_path / "t.tsv")
    code = main(["--method", "srlora", f"model.name_or_path={base_dir}", "model.tokenizer=minilm-l6",
                 "data.format=table", f"data.train_path={data}", "method.r=4", "train.max_steps=8",
                 "train.lr=1e-2", "logging.progress=false", f"logging.output_dir={tmp_path / 'run'}", *EXTRA["srlora"]])
    assert code == 0, capsys.readouterr().err
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000008"
    assert main(["export", str(ckpt), str(tmp_path / "peft"), "--peft"]) == 0
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), tmp_path / "peft").eval()
    trained = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    load_adapter(ckpt / "adapter", trained)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, trained(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
