"""train.schedule=plateau (ReduceLROnPlateau): torch's rule, warm-up, the config and metric
checks, and a run that lowers its learning rate and resumes exactly from a checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lrx.cli import main, train_main
from lrx.config import load_config
from lrx.errors import ConfigError
from lrx.lr import Plateau
from tests.test_distributed import table


@pytest.mark.parametrize("lower, patience", [(True, 0), (True, 2), (False, 1)])
def test_plateau_follows_torch_reduce_lr_on_plateau(lower, patience):
    values = [1.0, 0.9, 0.95, 0.9, 0.89996, 0.8, 0.85, 0.86, 0.87, 0.7, 0.7, 0.7, 0.71, 0.6, -0.1, 0.0]
    if not lower:
        values = [-v for v in values]
    ours = Plateau(warmup=0, factor=0.5, patience=patience, lower_is_better=lower)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min" if lower else "max", factor=0.5,
                                                     patience=patience, threshold=1e-4)
    got, want = [], []
    for v in values:
        ours.observe(v)
        ref.step(v)
        got.append(ours(100))
        want.append(opt.param_groups[0]["lr"])
    assert got == pytest.approx(want)
    assert min(want) < 1.0  # it did reduce


def test_plateau_warms_up_linearly_then_holds_its_scale():
    p = Plateau(warmup=4, factor=0.1, patience=0, lower_is_better=True)
    assert [p(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert not p.observe(2.0) and not p.observe(1.0)
    assert p.observe(1.0)  # no improvement, patience 0
    assert p(2) == pytest.approx(0.05) and p(10) == pytest.approx(0.1)


def test_plateau_without_evaluation_is_one_line_naming_the_fix(tmp_path):
    data = table(tmp_path / "t.tsv")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.format=table", f"data.train_path={data}", "train.schedule=plateau"])
    assert "data.eval_path" in str(e.value) and "\n" not in str(e.value)
    cfg = load_config(None, ["data.format=table", f"data.train_path={data}", f"data.eval_path={data}",
                             "train.schedule=plateau"])
    assert cfg.train.schedule == "plateau" and cfg.train.plateau_metric == "eval_loss"


@pytest.mark.parametrize("override, fragment", [
    ("train.plateau_factor=1", "plateau_factor must be in (0, 1)"),
    ("train.plateau_patience=-1", "plateau_patience must be >= 0"),
])
def test_bad_plateau_settings_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


LR = 1e-2


def args(data, out, *extra):
    """A 12-step LoRA run on a tiny BERT, evaluated every step, lr lowered on a plateau."""
    return ["--method", "lora", "model.name_or_path=tiny-bert", "data.format=table", f"data.train_path={data}",
            f"data.eval_path={data}", "method.r=4", "method.target_modules=[query,value]", "train.max_steps=12",
            f"train.lr={LR}", "train.warmup_steps=2",
            "train.schedule=plateau", "train.plateau_patience=0", "train.plateau_factor=0.5", "train.eval_every=1",
            "train.log_every=1", "train.eval_at_start=false", "logging.progress=false", "logging.tensorboard=false",
            f"logging.output_dir={out}", *extra]


def records(run_dir, split):
    """The run's logged records of ``split``, without the throughput and step time (which are timing)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("split", "tokens_per_s", "step_s")} for r in lines if r["split"] == split]


def test_an_unknown_plateau_metric_lists_the_choices(tmp_path, capsys):
    data = table(tmp_path / "t.tsv")
    assert main(args(data, tmp_path / "run", "train.plateau_metric=f1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "error: train.plateau_metric=f1 is not computed by this run's evaluation; choose one of eval_loss, accuracy"
    assert not (tmp_path / "run").exists()


def test_a_plateau_run_lowers_its_rate_and_resumes_exactly(tmp_path):
    data = table(tmp_path / "t.tsv", rows=48)
    assert main(args(data, tmp_path / "full", "train.save_every=6", "train.keep_checkpoints=3")) == 0
    train = records(tmp_path / "full", "train")
    lrs = [r["lr"] for r in train]
    assert lrs[:2] == pytest.approx([LR / 2, LR])  # warm-up (the rate each logged step ended with)
    lowered = [r["step"] for prev, r in zip(train, train[1:]) if r["lr"] < prev["lr"] - 1e-12]
    # Lowered before the checkpoint at step 6 and after it: the resumed run needs the saved state.
    assert any(s <= 6 for s in lowered) and any(s > 7 for s in lowered), lrs
    assert all(r["lr"] in [LR * 0.5**k for k in range(12)] for r in train[1:])
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    saved = state["scheduler"]["lr_lambdas"][0]
    assert saved["scale"] < 1 and set(saved) == {"warmup", "factor", "patience", "lower", "scale", "best", "bad"}

    shutil.copytree(tmp_path / "full", tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000006"
    assert main(args(data, tmp_path / "run", "train.save_every=6", "--resume", str(ckpt))) == 0
    for split in ("train", "eval"):
        got, want = records(tmp_path / "run", split), records(tmp_path / "full", split)
        assert [sorted(r) for r in got] == [sorted(r) for r in want] and len(got) == 12
        assert [list(r.values()) for r in got] == [pytest.approx(list(r.values()), abs=1e-6) for r in want]


def test_help_lists_the_plateau_settings(capsys):
    """``launch/train.py --help`` (``lrx.cli.train_main``, in this process: no interpreter start)."""
    with pytest.raises(SystemExit) as exited:
        train_main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for key in ("plateau_metric", "plateau_factor", "plateau_patience", "ReduceLROnPlateau"):
        assert key in out
