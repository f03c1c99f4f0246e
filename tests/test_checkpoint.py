"""Checkpoints: what they hold, world-size changes, bad input (kill and resume: tests/test_faults.py).

Runs go through ``launch/train.py`` as users start them; ``killed_at`` (other modules' kill tests)
kills one at a chosen step through ``tests/train_killed.py`` (rank 0 sends itself SIGKILL right
after that step's checkpoint logic).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrx import checkpoint
from lrx.cli import main
from tests.conftest import REPO, sharded_runs
from tests.test_distributed import BACKENDS, launch, launch_runs, losses, reference, table  # noqa: F401 (fixture)

pytestmark = pytest.mark.distributed


def args(data, out, *extra, batch=8, base="tiny-bert"):
    """train.py arguments of a 12-step srlora run on ``data`` into ``out``."""
    return [str(REPO / "launch" / "train.py"), "--method", "srlora", f"model.name_or_path={base}",
            *([] if base == "tiny-bert" else ["model.tokenizer=minilm-l6"]),
            "data.format=table", f"data.train_path={data}", "method.r=4",
            "method.target_modules=[query,value,intermediate.dense]", "train.max_steps=12", "train.lr=1e-2",
            "train.log_every=1", "train.eval_at_start=false", "logging.progress=false", "logging.tensorboard=false",
            f"train.batch_size={batch}", f"logging.output_dir={out}", *extra]



def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        diff = (a[key].double() - b[key].double()).abs().max().item() if a[key].numel() else 0.0
        assert diff <= atol, (key, diff)


def killed_at(step: int, argv: list[str]) -> list[str]:
    """The same run through tests/train_killed.py, killed after step ``step``."""
    return [str(REPO / "tests" / "train_killed.py"), "--kill-at-step", str(step), *argv[1:]]


def run(argv, nproc=1, backend="fsdp2", env=None):
    launcher = BACKENDS[backend][0] if nproc > 1 else "python"
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        return launch(argv, nproc, launcher)
    finally:
        os.environ.clear()
        os.environ.update(old)


# Killed and stopped multi-process runs resume exactly: tests/test_faults.py (one FSDP2 run of 3
# processes, sharding A unevenly, and one ZeRO-3 run, each through a crash or hang, signals during
# an event's step and a checkpoint's write, and a requeue; the base loaded straight into shards).


# name: (first run's backend and processes, the resumed run's, extra arguments of both)
WORLD_SIZES = {"2-to-1": (("fsdp2", 2), ("single", 1), ()), "1-to-2": (("single", 1), ("zero3", 2), ()),
               "1-to-2-fsdp2-log": (("single", 1), ("fsdp2", 2), ("method.fuse=log",))}


def world_size_args(folder: Path, name: str, first: bool) -> list[str]:
    """train.py arguments of the first run of ``WORLD_SIZES[name]`` (a checkpoint at step 6) in
    ``folder``, or of its run resumed from that checkpoint."""
    (_, n1), (_, n2), extra = WORLD_SIZES[name]
    data = table(folder / "t.tsv")
    if first:
        return args(data, folder / "run", "train.save_every=6", *extra, batch=8 // n1)
    ckpt = folder / "run" / "checkpoints" / "step-00000006"
    return args(data, folder / "run", "train.save_every=6", "--resume", str(ckpt), *extra, batch=8 // n2)


@sharded_runs
def world_size_runs(root: Path, backend: str) -> dict:
    """The 2-process runs of ``WORLD_SIZES`` on ``backend`` (made in the ``sharded`` launch): the
    first run of 2-to-1 (resumed on one process by the test), and the resumed runs of 1-to-2, whose
    one-process first runs are made here, in this process, before the launch (their results in
    ``first.code`` and ``first.err``)."""
    runs = {}
    for name, ((b1, _), (b2, _), _) in WORLD_SIZES.items():
        if backend not in (b1, b2):
            continue
        folder = root / name
        folder.mkdir()
        if backend == b2:  # the one-process run, then its checkpoint resumed in the launch
            first = run(world_size_args(folder, name, first=True))
            (folder / "first.code").write_text(str(first.returncode))
            (folder / "first.err").write_text(first.stderr[-3000:])
        runs[f"world-size-{name}"] = world_size_args(folder, name, first=backend == b1)
    return runs


@pytest.mark.parametrize("name", list(WORLD_SIZES))
def test_resume_on_another_world_size(reference, sharded, name):  # noqa: F811 (the fixture)
    """A checkpoint resumes on another number of processes (its edit log replayed, under FSDP2
    then split by rows; folded into the base, or with method.fuse=log beside the adapter) to the
    uninterrupted run's losses and adapter. The 2-process halves run in the ``sharded`` launch."""
    (b1, n1), (b2, n2), extra = WORLD_SIZES[name]
    ref = reference(f"world-size{'-'.join(extra)}", lambda d: run(args(table(d / "t.tsv"), d / "ref", *extra))) / "ref"
    if n1 == 2:
        a, folder = sharded(b1, f"world-size-{name}")
        folder = folder.parent
        assert a.returncode == 0, a.stderr[-3000:]
        b = run(world_size_args(folder, name, first=False), n2, b2)
    else:
        b, folder = sharded(b2, f"world-size-{name}")
        folder = folder.parent
        assert (folder / "first.code").read_text() == "0", (folder / "first.err").read_text()
    assert b.returncode == 0, b.stderr[-3000:]
    assert ("edit logs of 6 layers split by rows" in b.stderr) == (b2 == "fsdp2")
    assert losses(folder / "run") == pytest.approx(losses(ref), abs=1e-4)
    assert_same_adapter(adapter(folder / "run"), adapter(ref), atol=1e-4)


# ---- bad input (one process, in-process CLI) --------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished one-process run with checkpoints at steps 3, 6 (kept: the last 2)."""
    root = tmp_path_factory.mktemp("ckpt")
    data = table(root / "t.tsv")
    argv = args(data, root / "run", "train.save_every=3", "train.max_steps=6")[1:]
    assert main(argv) == 0
    return root, data


def copy_run(saved, tmp_path):
    root, data = saved
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run", data


def resume_cli(data, run_dir, resume, *extra):
    return main(args(data, run_dir, "train.max_steps=8", "--resume", resume, *extra)[1:])


def test_checkpoints_hold_what_training_changed(saved):
    root, _ = saved
    found = checkpoint.checkpoint_dirs(root / "run")
    assert [p.name for p in found] == ["step-00000003", "step-00000006"]
    names = sorted(p.name for p in found[-1].iterdir())
    assert names == ["COMPLETE", "adapter", "optimizer.safetensors", "rng-rank0.safetensors", "trainer_state.json"]
    state = json.loads((found[-1] / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["micro"] == 6 and set(state["versions"]) == {"lrx", "torch", "transformers"}
    tensors = load_file(str(found[-1] / "adapter" / "adapter_model.safetensors"))
    assert not any(k.endswith(".weight") and ".base." in k for k in tensors)  # never the base weights
    assert any(k.startswith("method_state.stats.") for k in tensors)
    assert all(k.endswith((".exp_avg", ".exp_avg_sq")) for k in load_file(str(found[-1] / "optimizer.safetensors")))


def test_auto_skips_an_incomplete_checkpoint(saved, tmp_path, caplog):
    run_dir, data = copy_run(saved, tmp_path)
    newest = run_dir / "checkpoints" / "step-00000006"
    (newest / "COMPLETE").unlink()  # as if the save had been interrupted
    assert checkpoint.resolve_resume("auto", run_dir).name == "step-00000003"
    assert resume_cli(data, run_dir, str(newest)) == 2
    assert resume_cli(data, run_dir, "auto") == 0
    assert json.loads((run_dir / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())["step"] == 8


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or corrupt"),
    ("pickle", "pickle files are refused"),
    ("missing", "adapter_model.safetensors is missing"),
    ("config", "other method settings (r, r_target differ)"),
])
def test_bad_checkpoints_are_refused_clearly(saved, tmp_path, capsys, damage, message):
    run_dir, data = copy_run(saved, tmp_path)
    ckpt = run_dir / "checkpoints" / "step-00000006"
    extra = []
    if damage == "truncate":
        f = ckpt / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "pickle":
        (ckpt / "optimizer.safetensors").rename(ckpt / "optimizer.bin")
    elif damage == "missing":
        (ckpt / "adapter" / "adapter_model.safetensors").unlink()
    else:
        extra = ["method.r=2"]
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert resume_cli(data, run_dir, str(ckpt), *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing touched


def test_full_disk_leaves_earlier_checkpoints_intact(saved, tmp_path, capsys, monkeypatch):
    run_dir, data = copy_run(saved, tmp_path)
    real = checkpoint.save_file

    def full_disk(tensors, path, *a, **k):
        if "step-00000008" in path and path.endswith("optimizer.safetensors"):
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    assert resume_cli(data, run_dir, "auto") == 2
    assert "No space left on device" in capsys.readouterr().err
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["step-00000003", "step-00000006"]  # no partial step-8, nothing deleted
    assert checkpoint.resolve_resume("auto", run_dir).name == "step-00000006"
    torch.testing.assert_close(  # and it still loads
        load_file(str(run_dir / "checkpoints" / "step-00000006" / "optimizer.safetensors"))[
            next(iter(load_file(str(run_dir / "checkpoints" / "step-00000006" / "optimizer.safetensors"))))],
        next(iter(load_file(str(saved[0] / "run" / "checkpoints" / "step-00000006" / "optimizer.safetensors")).values())))


def snapshot(run_dir):
    return {str(p): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("micro"), "has no 'micro'"),
    (lambda s: s.update(step="six"), "'step' is 'six', expected a non-negative integer"),
    (lambda s: s.update(scheduler=[1]), "'scheduler' is [1], expected a JSON object"),
    (lambda s: s.update(global_micro_batch=0), "'global_micro_batch' is 0"),
], ids=["missing", "wrong-type", "not-an-object", "zero-batch"])
def test_a_damaged_progress_file_is_one_line_and_nothing_is_written(saved, tmp_path, capsys, edit, message):
    run_dir, data = copy_run(saved, tmp_path)
    file = run_dir / "checkpoints" / "step-00000006" / "trainer_state.json"
    state = json.loads(file.read_text())
    edit(state)
    file.write_text(json.dumps(state))
    before = snapshot(run_dir)
    assert resume_cli(data, run_dir, "auto") == 2
    err = last_error(capsys)
    assert err.startswith("error: ") and message in err and "trainer_state.json" in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("max_steps", [6, 5])
def test_resuming_at_or_past_the_last_step_trains_nothing_and_says_so(saved, tmp_path, capsys, max_steps):
    run_dir, data = copy_run(saved, tmp_path)
    before = snapshot(run_dir)
    assert main(args(data, run_dir, f"train.max_steps={max_steps}", "--resume", "auto")[1:]) == 2
    err = last_error(capsys)
    assert "is at step 6" in err and f"this run has {max_steps} steps" in err and "raise train.max_steps" in err
    assert snapshot(run_dir) == before


def test_a_corrupt_metrics_line_is_refused_before_anything_is_written(saved, tmp_path, capsys):
    run_dir, data = copy_run(saved, tmp_path)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"split": "train", "step": 7, "loss"\n')  # cut by a crash, or edited by hand
    before = snapshot(run_dir)
    assert resume_cli(data, run_dir, "auto") == 2
    err = last_error(capsys)
    assert "metrics.jsonl: line" in err and "not a JSON record" in err
    assert snapshot(run_dir) == before


class Killed(BaseException):
    """The process dies here (as SIGKILL would), in the middle of deleting a checkpoint."""


def test_rotation_unmarks_a_checkpoint_before_deleting_its_files(saved, tmp_path, monkeypatch):
    run_dir, data = copy_run(saved, tmp_path)
    oldest = run_dir / "checkpoints" / "step-00000003"
    real = shutil.rmtree

    def dies_midway(path, *a, **k):
        if os.path.basename(str(path)).startswith(("step-00000003", ".step-00000003")):
            (Path(path) / "optimizer.safetensors").unlink()  # some files are gone, then the process dies
            raise Killed
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", dies_midway)
    with pytest.raises(Killed):
        resume_cli(data, run_dir, "auto", "train.keep_checkpoints=2")
    monkeypatch.setattr(shutil, "rmtree", real)
    assert not (oldest / "COMPLETE").exists()  # half deleted: never taken for a complete checkpoint
    assert [p.name for p in checkpoint.checkpoint_dirs(run_dir)] == ["step-00000006", "step-00000008"]


def test_an_eigenlorax_run_resumes_and_a_changed_basis_is_refused(tmp_path, capsys):
    """EigenLoRAx fills in its basis's sha256 and modules when built: a checkpoint recording
    them resumes with the run's own command line (it was refused as "other method settings"),
    to the uninterrupted run's losses and adapter; a basis file changed since is refused."""
    from tests.test_conformance import eigenbasis_for

    basis = Path(eigenbasis_for("bert"))
    data = table(tmp_path / "t.tsv")
    argv = [a for a in args(data, tmp_path / "full", "train.save_every=3", "train.max_steps=6")[1:]
            if not a.startswith("method.target_modules")]
    argv[argv.index("srlora")] = "eigenlorax"
    argv.append(f"method.basis={basis}")
    assert main(argv) == 0
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")
    resume = [a.replace(str(tmp_path / "full"), str(tmp_path / "cut")) for a in argv] + ["--resume", "auto"]
    assert main(resume) == 0, capsys.readouterr().err
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert_same_adapter(adapter(tmp_path / "cut"), adapter(tmp_path / "full"), atol=0.0)

    changed = tmp_path / "basis"
    shutil.copytree(basis, changed)
    weights = changed / "eigenbasis.safetensors"
    tensors = load_file(str(weights))
    from safetensors.torch import save_file

    save_file({k: v + 1e-3 for k, v in tensors.items()}, str(weights))
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")
    capsys.readouterr()
    assert main([a.replace(str(basis), str(changed)) for a in resume]) == 2
    err = capsys.readouterr().err
    assert "basis" in err and "differ" in err and len(err.strip().splitlines()) == 1
