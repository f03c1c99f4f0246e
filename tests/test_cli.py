"""launch/train.py end to end on tiny models, and its answers to bad input.

Bad input gets one line on stderr naming the problem and the fix, exit status 2, and
nothing already saved is touched.
"""

from __future__ import annotations

import json

import pytest

from lrx.cli import main, train_main
from tests.conftest import QUICKSTART

TINY_LM = [
    "model.name_or_path=tiny-llama", "data.format=instruct",
    f"data.train_path={QUICKSTART / 'train.jsonl'}", f"data.eval_path={QUICKSTART / 'eval.jsonl'}",
    "data.max_train_samples=32", "data.max_eval_samples=8", "data.max_length=64",
    "train.max_steps=4", "train.batch_size=4", "train.log_every=2", "train.lr=1e-3",
    "logging.progress=false", "logging.tensorboard=false",
]


def write_table(path, rows=40):
    lines = ["sentence\tlabel"] + [f"this is {'good' if i % 2 else 'bad'} number {i}\t{'pos' if i % 2 else 'neg'}"
                                   for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_tiny_causal_lm_run_writes_everything(tmp_path, capsys, method):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["--method", method, *TINY_LM, f"logging.output_dir={out_dir}",
                              "train.sample_prompt=What is 2 + 2?", "train.max_new_tokens=4"], capsys)
    assert code == 0, err
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "adapter_peft/adapter_model.safetensors"):
        assert (out_dir / name).is_file(), name
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["method"] == method
    assert "perplexity" in summary["eval"]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
    assert "sample completion" in out and str(out_dir) in out


def test_tiny_classification_run(tmp_path, capsys):
    data = write_table(tmp_path / "train.tsv")
    code, out, err = run_cli([
        "model.name_or_path=tiny-bert", "data.format=table", f"data.train_path={data}", f"data.eval_path={data}",
        "method.target_modules=[query,value]", "train.max_steps=3", "train.batch_size=8",
        "logging.progress=false", f"logging.output_dir={tmp_path / 'run'}",
    ], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["eval"]) >= {"eval_loss", "accuracy"}
    assert (tmp_path / "run" / "tb").is_dir()


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--method", "nope"], "unknown method 'nope'; available methods:"),
        (["train.nope=1"], "unknown config key 'train.nope'"),
        (["data.train_path=/nonexistent/train.jsonl"], "/nonexistent/train.jsonl"),
        (["model.name_or_path=/nonexistent/model"], "model '/nonexistent/model' not found"),
        (["method.target_modules=[nothing_here]"], "matches no linear layer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, fragment):
    code, _, err = run_cli([*TINY_LM, f"logging.output_dir={tmp_path / 'run'}", *extra], capsys)
    assert code == 2
    assert fragment in err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and fragment in error_lines[0] and err.endswith(error_lines[0] + "\n")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_malformed_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-4\n")
    code, _, err = run_cli(["--config", str(bad)], capsys)
    assert code == 2 and "malformed YAML" in err


def test_missing_columns(tmp_path, capsys):
    data = tmp_path / "t.csv"
    data.write_text("text,target\nhello,1\n")
    code, _, err = run_cli(["model.name_or_path=tiny-bert", "data.format=table", f"data.train_path={data}",
                            f"logging.output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "t.csv" in err and "sentence" in err


def test_existing_run_is_refused_then_overwritten(tmp_path, capsys):
    out_dir = tmp_path / "run"
    args = [*TINY_LM, f"logging.output_dir={out_dir}", "train.max_steps=2", "data.eval_path=none"]
    assert run_cli(args, capsys)[0] == 0
    adapter = (out_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    code, _, err = run_cli([*args, "train.lr=5e-3"], capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert (out_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert run_cli(["--overwrite", *args, "train.lr=5e-3"], capsys)[0] == 0
    assert (out_dir / "adapter" / "adapter_model.safetensors").read_bytes() != adapter


def test_help_lists_every_section_and_method(capsys):
    """``launch/train.py --help`` (``lrx.cli.train_main``, in this process: no interpreter start)."""
    with pytest.raises(SystemExit) as exited:
        train_main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for key in ("train.lr", "method.r", "data.glue_task", "logging.output_dir", "distributed.backend",
                "--method", "--overwrite", "only for --method pissa"):
        assert key in out


def test_bad_multi_process_environments(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli([*TINY_LM, f"logging.output_dir={tmp_path / 'run'}", "distributed.backend=single"], capsys)
    assert code == 2 and "distributed.backend=single but 2 processes were launched" in err
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run_cli([*TINY_LM, f"logging.output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "fsdp2 cannot join the process group" in err and "torchrun" in err


def test_activation_checkpointing_gives_the_same_losses(tmp_path, capsys):
    def run(flag):
        out = tmp_path / f"ckpt-{flag}"
        args = [*TINY_LM, "data.eval_path=none", "train.log_every=1", f"train.activation_checkpointing={flag}",
                f"logging.output_dir={out}"]
        assert run_cli(args, capsys)[0] == 0
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    assert run("true") == pytest.approx(run("false"), abs=1e-5)


def test_accumulated_micro_batches_give_the_token_mean_of_the_whole_batch(tmp_path, capsys):
    """Prompt-masked instruction data: 2 micro-batches of 4 examples hold different numbers of
    label tokens, and the step's loss (and gradient) is still the token mean over all 8, as one
    batch of 8 gives it."""
    def run(batch, accum):
        out = tmp_path / f"b{batch}x{accum}"
        args = [*TINY_LM, "data.eval_path=none", "train.log_every=1", f"train.batch_size={batch}",
                f"train.grad_accum={accum}", f"logging.output_dir={out}"]
        assert run_cli(args, capsys)[0] == 0
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    assert run(4, 2) == pytest.approx(run(8, 1), abs=1e-5)
