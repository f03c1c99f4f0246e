"""ZeRO-3's bf16 engine and SRLoRA's events: lossless on whatever dtype the engine keeps.

DeepSpeed's bf16 engine casts every parameter of a model not built under ``zero.Init`` to bf16.
Fold-or-log was decided from the base's dtype before that cast, so every event folded into a
bf16 partition (fusion errors ~4e-3, only written to the event log) and the adapter, rebuilt
from the exact log, no longer described the trained model. The engine now keeps an fp32 base in
fp32 (``model.dtype=float32`` is honoured) and a bf16 base logs its edits.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lrx.adapter import load_adapter
from lrx.build import Adapters
from lrx.config import load_config
from lrx.data import build_datasets
from lrx.errors import ConfigError
from lrx.methods import LocalShards, build_method
from lrx.models import load_model, load_tokenizer
from tests.conftest import QUICKSTART, REPO, sharded_runs
from tests.test_distributed import losses

pytestmark = pytest.mark.distributed

ARGS = ["--method", "srlora", "model.name_or_path=tiny-llama", f"data.train_path={QUICKSTART / 'train.jsonl'}",
        f"data.eval_path={QUICKSTART / 'eval.jsonl'}", "data.max_train_samples=32", "data.max_eval_samples=8",
        "data.max_length=64", "method.r=4", "train.max_steps=10", "train.batch_size=2", "train.log_every=1",
        "train.lr=1e-3", "train.eval_at_start=false", "distributed.backend=zero3", "train.device=cpu",
        "logging.progress=false", "logging.tensorboard=false"]


def eval_loss(model, config) -> float:
    """The trainer's evaluation loss (a token-weighted mean over the eval set), in one process."""
    tokenizer = load_tokenizer(config.model.name_or_path)
    data = build_datasets(config.data, tokenizer, cache_dir=None)
    total, weight = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data.eval), config.train.eval_batch_size):
            batch = data.collate_fn([data.eval[i] for i in range(start, min(start + config.train.eval_batch_size, len(data.eval)))])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.double().item() * n
            weight += n
    return total / weight


DTYPES = ["float32", "bfloat16", "bfloat16-nf4"]


@sharded_runs
def engine_args(root, backend: str) -> dict:
    """The runs of every ``DTYPES`` entry, on 2 processes with ZeRO-3's bf16 engine on as on a GPU
    (made in the ``sharded`` launch of ZeRO-3, ``tests/train_many.py``)."""
    if backend != "zero3":
        return {}
    return {f"bf16-engine-{dtype}": ([str(REPO / "launch" / "train.py"), *ARGS, f"model.dtype={dtype.partition('-')[0]}",
                                      f"logging.output_dir={root / dtype}", f"model.quantize={dtype.partition('-')[2] or 'none'}"],
                                     {"bf16_engine": True}) for dtype in DTYPES}


@pytest.fixture(scope="module")
def engine_runs(sharded):
    """dtype -> (result, run folder) of ``engine_args``."""
    return {dtype: sharded("zero3", f"bf16-engine-{dtype}") for dtype in DTYPES}


@pytest.mark.parametrize("dtype", DTYPES)
def test_srlora_events_stay_lossless_under_zero3s_bf16_engine(engine_runs, dtype):
    """fp32 bases fold exactly, bf16 and nf4 bases (whose codes the bf16 engine leaves as
    integers and whose statistics it leaves fp32) keep their edits in the log."""
    run, out = engine_runs[dtype]
    dtype = dtype.partition("-")[0]
    assert run.returncode == 0, run.stderr[-3000:]
    events = [json.loads(x) for x in (out / "method_events.jsonl").read_text().splitlines()]
    assert len({e["event"] for e in events}) == 4
    assert max(e["fusion_error"] for e in events) <= 1e-3  # folded exactly (fp32) or logged (bf16)
    assert all(torch.isfinite(torch.tensor(losses(out))))
    if dtype == "float32":  # the adapter rebuilds the trained model: W0 + the exact log + B A
        config = load_config(out / "config.yaml")
        torch.manual_seed(config.train.seed)
        tokenizer = load_tokenizer("tiny-llama")
        model = load_model("tiny-llama", task="causal_lm", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        load_adapter(out / "adapter", model)
        trained = json.loads((out / "summary.json").read_text())["eval"]["eval_loss"]
        assert eval_loss(model.eval(), config) == pytest.approx(trained, rel=1e-5)


def test_a_fold_into_a_base_the_backend_keeps_in_bf16_is_refused():
    """The guard behind it: an edit folded into a weight kept in bf16 would lose most of itself."""
    method = build_method(load_config(None, ["method.target_modules=0", "method.r=2"], method="pissa").method)
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    Adapters(method).adapt(model)
    model.to(torch.bfloat16)  # as DeepSpeed's bf16 engine casts every parameter
    with pytest.raises(ConfigError, match="stores this base weight in bfloat16"):
        method.attach(model, LocalShards())
