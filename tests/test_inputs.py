"""Bad input, as a careless or hostile user gives it (issue 17): nothing a user wrote is lost,
every bad input is one line (exit status 2) and writes nothing, and the ``lrx`` command.

Each case runs in-process through ``lrx.cli.main`` on tiny models.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lrx.cli import main
from lrx.config import load_config
from lrx.errors import ConfigError, LrxError
from tests.conftest import QUICKSTART, REPO, tiny_model
from tests.test_cli import TINY_LM, write_table


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.endswith(lines[0] + "\n"), err
    assert fragment in lines[0], lines[0]


def snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


QUICK = [*TINY_LM, "train.max_steps=2", "data.eval_path=none"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run with a checkpoint (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("runs") / "A"
    assert main([*QUICK, "train.save_every=2", f"logging.output_dir={out}"]) == 0
    return out


def copy_run(finished_run, dest):
    shutil.copytree(finished_run, dest)
    return dest


# ---- run folders: nothing a user wrote is lost (issue 17 items 1, 3, 4) -----------------------


def test_resume_into_a_folder_holding_another_run_is_refused(tmp_path, finished_run, capsys):
    b = copy_run(finished_run, tmp_path / "B")
    before = snapshot(b)
    ckpt = finished_run / "checkpoints" / "step-00000002"
    code, _, err = run_cli([*QUICK, "train.max_steps=4", f"logging.output_dir={b}", "--resume", str(ckpt)], capsys)
    assert code == 2
    one_line_error(err, f"logging.output_dir={b} holds another run")
    assert snapshot(b) == before


def test_resume_into_a_new_folder_branches_the_run(tmp_path, finished_run, capsys):
    a = copy_run(finished_run, tmp_path / "A")
    before = snapshot(a)
    ckpt = a / "checkpoints" / "step-00000002"
    code, _, err = run_cli([*QUICK, "train.max_steps=4", f"logging.output_dir={tmp_path / 'C'}",
                            "--resume", str(ckpt)], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "C" / "summary.json").read_text())["steps"] == 4
    assert snapshot(a) == before


def test_overwrite_deletes_only_what_lrx_wrote(tmp_path, finished_run, capsys):
    from lrx.rundir import MARKER, RUN_ENTRIES

    assert {p.name for p in finished_run.iterdir()} - {MARKER} <= set(RUN_ENTRIES)  # the marker names all
    run = copy_run(finished_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    (run / "data" / "keep.csv").write_text("a,b\n")
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    code, _, err = run_cli(["--overwrite", *QUICK, "train.lr=5e-3", f"logging.output_dir={run}"], capsys)
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine" and (run / "data" / "keep.csv").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() != adapter


@pytest.mark.parametrize("setup", ["config_only", "home_folder"])
def test_overwrite_refuses_a_folder_lrx_did_not_mark(tmp_path, capsys, setup):
    folder = tmp_path / "myproject"
    folder.mkdir()
    (folder / "config.yaml").write_text("my: own config\n")
    if setup == "home_folder":
        (folder / "thesis.tex").write_text("\\begin{document}")
        (folder / "adapter").mkdir()
        (folder / "adapter" / "weights.bin").write_bytes(b"x")
    before = snapshot(folder)
    code, _, err = run_cli(["--overwrite", *QUICK, f"logging.output_dir={folder}"], capsys)
    assert code == 2
    one_line_error(err, "no .lrx.json marker, so lrx did not write it and deletes nothing there")
    assert snapshot(folder) == before


@pytest.mark.parametrize("bad,fragment", [
    (["train.log_every=0"], "train.log_every must be >= 1"),
    (["train.batch_size=0"], "train.batch_size must be >= 1"),
    (["train.grad_accum=0"], "train.grad_accum must be >= 1"),
    (["train.eval_batch_size=0"], "train.eval_batch_size must be >= 1"),
    (["train.adam_betas=[0.9]"], "train.adam_betas must be two values in [0, 1)"),
    (["data.max_length=4096"], "data.max_length=4096 is longer than the model's 512 positions"),
    (["--method", "srlora"], "srlora needs at least 5 training steps"),  # checked on the model, before writing
], ids=["log_every", "batch_size", "grad_accum", "eval_batch_size", "adam_betas", "max_length", "srlora-steps"])
def test_a_rejected_overwrite_keeps_the_old_run(tmp_path, finished_run, capsys, bad, fragment):
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    code, _, err = run_cli(["--overwrite", *QUICK, f"logging.output_dir={run}", *bad], capsys)
    assert code == 2
    one_line_error(err, fragment)
    assert snapshot(run) == before


def test_output_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = run_cli([*QUICK, f"logging.output_dir={tmp_path / 'f' / 'run'}"], capsys)
    assert code == 2
    one_line_error(err, f"lies under the file {tmp_path / 'f'}")


def test_output_dir_without_write_permission(tmp_path, capsys, monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(tmp_path) else real(p, mode, **k))
    code, _, err = run_cli([*QUICK, f"logging.output_dir={tmp_path / 'run'}"], capsys)  # tests run as root
    assert code == 2
    one_line_error(err, f"no permission to write in {tmp_path}")
    assert not (tmp_path / "run").exists()


def test_a_short_srlora_run_writes_nothing(tmp_path, capsys):
    code, _, err = run_cli(["--method", "srlora", *QUICK, f"logging.output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    one_line_error(err, "srlora needs at least 5 training steps")
    assert not (tmp_path / "run").exists()


# ---- config: the whole config validated at load (issue 17 items 8, 9 and the traceback class) --


@pytest.mark.parametrize("override,fragment", [
    ("train.lr=-1e-4", "train.lr must be > 0"),
    ("train.lr=nan", "train.lr: expected a finite number"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.weight_decay=-1", "train.weight_decay must be >= 0"),
    ("train.batch_size=-2", "train.batch_size must be >= 1"),
    ("train.adam_betas=[0.9,0.999,0.5]", "train.adam_betas must be two values"),
    ("train.adam_betas=[0.9,1.0]", "train.adam_betas must be two values in [0, 1)"),
    ("train.max_steps=-1", "train.max_steps must be >= 0"),
    ("train.epochs=0", "train.epochs must be > 0"),
    ("train.epochs=inf", "train.epochs: expected a finite number"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio must be in [0, 1]"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
    ("train.eval_every=-1", "train.eval_every must be >= 0"),
    ("train.save_every=-1", "train.save_every must be >= 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
    ("train.max_grad_norm=-1", "train.max_grad_norm must be >= 0"),
    ("train.max_new_tokens=0", "train.max_new_tokens must be >= 1"),
    ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N"),
    ("data.max_length=0", "data.max_length must be >= 2"),
    ("method.alpha=0", "method.alpha must be > 0"),
    ("method.alpha=-16", "method.alpha must be > 0"),
])
def test_every_bad_number_is_refused_at_load(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_negative_pissa_alpha_is_named(capsys, tmp_path):
    code, _, err = run_cli(["--method", "pissa", *QUICK, "method.alpha=-8", f"logging.output_dir={tmp_path}/r"], capsys)
    assert code == 2
    one_line_error(err, "method.alpha must be > 0")


@pytest.mark.parametrize("text,fragment", [
    ("method:\n  r: 4\n  r: 8\n", "line 3: key 'r' is given twice (first at line 2)"),
    ("train:\n  lr: 1.0e-3\nmethod:\n  r: 4\ntrain:\n  epochs: 2\n", "line 5: key 'train' is given twice"),
])
def test_duplicate_yaml_keys_name_the_line(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path} {fragment}" in str(e.value)


def test_a_folder_as_config_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["--config", str(tmp_path)], capsys)
    assert code == 2
    one_line_error(err, f"--config {tmp_path} is a folder; pass a YAML file")


def test_binary_config_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64)}, str(path))
    code, _, err = run_cli(["--config", str(path)], capsys)
    assert code == 2
    one_line_error(err, f"config file {path} is not a UTF-8 text file")


# ---- model files ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage,fragment", [
    ("pickle_only", "pytorch_model.bin: pickle weight files are refused"),
    ("truncated", "model.safetensors is not a valid safetensors file"),
])
def test_unsafe_or_broken_model_folders(tmp_path, capsys, damage, fragment):
    folder = tmp_path / "base"
    model = tiny_model("bert", vocab=30522)
    model.save_pretrained(folder)
    if damage == "pickle_only":
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    else:
        f = folder / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])
    data = write_table(tmp_path / "t.tsv")
    code, _, err = run_cli([f"model.name_or_path={folder}", "model.tokenizer=minilm-l6", "data.format=table",
                            f"data.train_path={data}", "method.target_modules=[query,value]", "train.max_steps=1",
                            f"logging.output_dir={tmp_path / 'run'}", "logging.progress=false"], capsys)
    assert code == 2
    one_line_error(err, fragment)
    assert not (tmp_path / "run").exists()


# ---- ZeRO-3 without its launcher / with a broken DeepSpeed config -----------------------------


@pytest.mark.parametrize("ds_config,fragment", [
    (None, "distributed.backend=zero3 needs a launcher"),
    ("{not json", "is not valid JSON at line 1"),
    ("[1, 2]", "must be a JSON object"),
    ('{"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}', "hierarchical partitioning (zero_hpz_partition_size=8)"),
    ('{"zero_optimization": {"stage": 3, "mics_shard_size": 8}}', "hierarchical partitioning (mics_shard_size=8)"),
])
def test_zero3_bad_setups_are_one_line(tmp_path, capsys, monkeypatch, ds_config, fragment):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    extra = []
    if ds_config is not None:
        (tmp_path / "ds.json").write_text(ds_config)
        extra = [f"distributed.deepspeed_config={tmp_path / 'ds.json'}"]
    code, _, err = run_cli([*QUICK, "distributed.backend=zero3", "train.device=cpu", *extra,
                            f"logging.output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    one_line_error(err, fragment)
    assert not (tmp_path / "run").exists()


def test_hsdp_replicas_must_divide_the_processes_and_need_fsdp2(tmp_path, capsys):
    code, _, err = run_cli([*QUICK, "distributed.replicate=2", f"logging.output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    one_line_error(err, "distributed.replicate=2 (HSDP) is for distributed.backend=fsdp2, not single")
    assert not (tmp_path / "run").exists()


# ---- tools: export and eigenbasis never delete or overwrite what lrx did not write -----------


@pytest.mark.parametrize("kind", ["merged", "peft"])
def test_export_into_a_file_is_refused(tmp_path, finished_run, capsys, kind):
    target = tmp_path / "existing.txt"
    target.write_text("mine")
    code, out, err = run_cli(["export", str(finished_run / "adapter"), str(target),
                              *(["--peft"] if kind == "peft" else [])], capsys)
    assert code == 2 and "wrote" not in out
    one_line_error(err, f"OUT={target} is a file; choose a folder")
    assert target.read_text() == "mine"


def test_every_folder_deleting_path_refuses_a_folder_lrx_did_not_create(tmp_path, finished_run, capsys):
    """--overwrite of a run and export --peft (which replaces its own earlier output)."""
    from lrx.export import export_peft_adapter

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("x: 1\n")
    (folder / "adapter_config.json").write_text("{}")
    (folder / "paper.md").write_text("mine")
    before = snapshot(folder)
    with pytest.raises(LrxError, match="holds files lrx did not write there"):
        export_peft_adapter(finished_run / "adapter", folder)
    code, _, err = run_cli(["--overwrite", *QUICK, f"logging.output_dir={folder}"], capsys)
    assert code == 2
    one_line_error(err, "deletes nothing there")
    assert snapshot(folder) == before


def test_peft_export_replaces_only_its_own_earlier_export(tmp_path, finished_run):
    from lrx.export import export_peft_adapter

    out = tmp_path / "peft"
    export_peft_adapter(finished_run / "adapter", out)
    export_peft_adapter(finished_run / "adapter", out)  # its own earlier export: replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LrxError, match=re.escape("holds files lrx did not write there (notes.txt)")):
        export_peft_adapter(finished_run / "adapter", out)
    assert (out / "notes.txt").read_text() == "mine"


def test_merged_export_of_a_tiny_random_base_is_refused(tmp_path, finished_run):
    from lrx.export import export_merged

    with pytest.raises(LrxError, match="was trained on tiny-llama, a random model that is built at training time"):
        export_merged(finished_run / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("edit,fragment", [
    (lambda c: c.pop("method"), "'method' must be a mapping with a 'name'"),
    (lambda c: c.update(adapted_modules="model.layers.0"), "'adapted_modules' must be a non-empty list"),
    (lambda c: c["adapted_modules"].append("model.layers.9.self_attn.q_proj"),
     "names modules ['model.layers.9.self_attn.q_proj'] that"),
    (lambda c: c["method"].update(r="eight"), "method settings are invalid"),
    (lambda c: c["method"].update(r=0), "method settings are invalid (r must be >= 1, got 0)"),
])
@pytest.mark.parametrize("kind", ["merged", "peft"])
def test_export_of_a_hand_edited_adapter_is_one_line(tmp_path, finished_run, edit, fragment, kind):
    from lrx.export import export_merged, export_peft_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    edit(config)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LrxError) as e:
        (export_peft_adapter if kind == "peft" else export_merged)(adapter, tmp_path / "out")
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def _peft_sources(tmp_path, n=2):
    from tests.test_eigenlorax import sources

    return sources(tmp_path, n=n, r=2)  # 2 x 2 columns per module: 3 principal components exist


def test_eigenbasis_records_the_k_it_kept(tmp_path):
    from lrx.eigenbasis import build_basis, format_summary

    srcs = _peft_sources(tmp_path)
    build_basis(srcs, tmp_path / "b", k=1000)
    meta = json.loads((tmp_path / "b" / "eigenbasis.json").read_text())
    tensors = load_file(str(tmp_path / "b" / "eigenbasis.safetensors"))
    assert meta["k"] == 3 == max(t.shape[1] for k, t in tensors.items() if ".C_" in k)
    assert meta.get("k_requested") == 1000 and "K=3" in format_summary(meta)


def test_eigenbasis_refuses_the_same_adapter_twice(tmp_path):
    from lrx.eigenbasis import build_basis

    a, b = _peft_sources(tmp_path)
    with pytest.raises(LrxError, match=f"adapter {a} is given twice"):
        build_basis([a, b, a], tmp_path / "b1", k=2)
    shutil.copytree(a, tmp_path / "copy")
    with pytest.raises(LrxError, match=f"is the same adapter as {a / 'adapter_model.safetensors'}"):
        build_basis([a, b, tmp_path / "copy"], tmp_path / "b2", k=2)
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_eigenbasis_onto_a_file_is_refused(tmp_path):
    from lrx.eigenbasis import build_basis

    srcs = _peft_sources(tmp_path)
    (tmp_path / "f").write_text("mine")
    with pytest.raises(LrxError, match=f"OUT={tmp_path / 'f'} is a file; choose a folder"):
        build_basis(srcs, tmp_path / "f", k=2)
    assert (tmp_path / "f").read_text() == "mine"


def test_a_nan_in_a_basis_is_named_at_load(tmp_path):
    from lrx.eigenbasis import build_basis, load_basis, sha256_file

    build_basis(_peft_sources(tmp_path), tmp_path / "b", k=2)
    weights = tmp_path / "b" / "eigenbasis.safetensors"
    tensors = load_file(str(weights))
    tensors["enc.0.v.C_B"][3, 1] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    meta = json.loads((tmp_path / "b" / "eigenbasis.json").read_text())
    meta["sha256"] = sha256_file(weights)  # a consistent but broken basis
    (tmp_path / "b" / "eigenbasis.json").write_text(json.dumps(meta))
    with pytest.raises(LrxError, match=r"enc\.0\.v\.C_B contains NaN or Inf"):
        load_basis(tmp_path / "b")


# ---- the lrx command and the quick-start defaults (issue 14 point 5, issue 16 item 9) --------


def test_lrx_command_dispatches_subcommands(tmp_path, capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and all(c in out for c in ("train", "plan", "export", "eigenbasis"))
    code, out, err = run_cli(["plan", *QUICK, f"logging.output_dir={tmp_path / 'run'}"], capsys)
    assert code == 0, err
    assert not (tmp_path / "run").exists()
    code, out, err = run_cli(["train", *QUICK, f"logging.output_dir={tmp_path / 'run'}"], capsys)
    assert code == 0 and (tmp_path / "run" / "summary.json").is_file(), err


def test_module_entry_point_and_console_scripts(capsys, monkeypatch):
    import runpy

    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lrx"] == "lrx.cli:main" and scripts["lrx-train"] == "lrx.cli:train_main"
    monkeypatch.setattr("sys.argv", ["lrx", "export", "--help"])
    with pytest.raises(SystemExit) as e:  # python -m lrx export --help
        runpy.run_module("lrx", run_name="__main__")
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--peft" in out and "usage: lrx export" in out


def test_defaults_are_the_quick_start_from_any_folder(tmp_path, capsys, monkeypatch):
    """`python launch/train.py --method srlora` trains as typed: the default data is the shipped
    instruction set, found from the package; only the model and length are made tiny here."""
    monkeypatch.chdir(tmp_path)
    config = load_config(None, [], method="srlora")
    assert config.model.name_or_path == "smollm2-135m"
    assert config.data.train_path == str(QUICKSTART / "train.jsonl")
    assert config.data.eval_path == str(QUICKSTART / "eval.jsonl")
    assert load_config(None, ["data.train_path=mine.jsonl"]).data.eval_path is None  # not the quick-start's eval
    code, _, err = run_cli(["--method", "srlora", "model.name_or_path=tiny-llama", "data.max_train_samples=48",
                            "data.max_length=64", "train.max_steps=5", "logging.progress=false",
                            "logging.tensorboard=false", "data.eval_path=none"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())["steps"] == 5


@pytest.mark.parametrize("args,fragment", [
    (["--method", "pissa", "method.r=100"], "asks for 100 principal directions of a 64 x 64 weight"),
    (["--method", "srlora", "method.r=40"], "asks for 120 principal directions of a 64 x 64 weight"),
])
def test_a_rank_larger_than_a_layer_is_one_line(tmp_path, capsys, args, fragment):
    code, _, err = run_cli([*args, *QUICK, "train.max_steps=8", f"logging.output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    one_line_error(err, fragment)
    assert not (tmp_path / "run").exists()


# ---- paths recorded in lrx files -------------------------------------------------------------


def test_paths_in_an_adapter_resolve_from_its_folder(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    tiny_model("bert", vocab=30522).save_pretrained(work / "base")
    write_table(work / "t.tsv")
    monkeypatch.chdir(work)  # trained with paths relative to the working directory
    assert main(["model.name_or_path=base", "model.tokenizer=minilm-l6", "data.format=table", "data.train_path=t.tsv",
                 "method.target_modules=[query,value]", "train.max_steps=1", "logging.progress=false",
                 "logging.output_dir=run"]) == 0
    capsys.readouterr()
    config_file = work / "run" / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["base_model"] == str((work / "base").resolve())  # recorded so any folder can read it
    config["base_model"] = "../../base"  # relative to the folder that holds the JSON
    config_file.write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["export", str(work / "run" / "adapter"), str(tmp_path / "merged")], capsys)
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file()
    config["base_model"] = "nowhere/base"
    config_file.write_text(json.dumps(config))
    code, _, err = run_cli(["export", str(work / "run" / "adapter"), str(tmp_path / "merged2")], capsys)
    assert code == 2
    one_line_error(err, f"{config_file}: base_model 'nowhere/base' not found")
