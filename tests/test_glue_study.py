"""tools/glue_study.py and tools/minilm_pack.py: the validation split, the plan and its
dependencies, the report (picks, steps to target, EigenLoRAx ratios), the exact model pack.
No training: every test runs in well under a second of CPU."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from tools import glue_study as gs
from tools import minilm_pack


def test_split_keeps_header_lines_and_order_and_is_seeded():
    rows = [f"{i}\ta{i}\tb{i}\tentailment\n" for i in range(50)]
    text = "index\tsentence1\tsentence2\tlabel\n" + "".join(rows)
    train, val, n_train, n_val = gs.split_lines(text, True, 0.1, seed=0)
    assert (n_train, n_val) == (45, 5)
    assert train.startswith("index\t") and val.startswith("index\t")
    got = train.splitlines(keepends=True)[1:] + val.splitlines(keepends=True)[1:]
    assert sorted(got) == sorted(rows)  # a partition of the data lines, verbatim
    assert train.splitlines()[1:] == [r.rstrip("\n") for r in rows if r in train]  # original order
    assert gs.split_lines(text, True, 0.1, seed=0) == (train, val, 45, 5)
    assert gs.split_lines(text, True, 0.1, seed=1)[1] != val


def test_split_without_header_and_without_final_newline():
    text = "".join(f"src\t{i % 2}\t\tsentence {i}\n" for i in range(19)) + "src\t1\t\tlast"
    train, val, n_train, n_val = gs.split_lines(text, False, 0.1, seed=0)
    assert (n_train, n_val) == (18, 2)
    assert train.endswith("\n") and val.endswith("\n")
    assert "last\n" in train + val


def _args(**kw):
    base = {
        "work": "/tmp/unused",
        "glue_dir": "/tmp/glue",
        "config": "configs/minilm/rte.yaml",
        "tasks": ["rte", "mrpc"],
        "methods": ["lora", "pissa", "srlora"],
        "sweep_lrs": [1e-4, 5e-4],
        "srlora_settings": ["24:0.5", "16:0.25"],
        "sweep_seeds": [0],
        "final_seeds": [0, 1],
        "eigen_configs": ["official:32:32:8:5e-3:0.1"],
        "eigen_seeds": [0],
        "eigen_epoch_factor": 3.0,
        "source_ranks": [4],
        "source_seeds": None,
        "wnli_ranks": [4],
        "wnli_sources": True,
        "wnli_seeds": [0],
        "eval_points": 20,
        "epochs": None,
        "max_train": None,
        "only": None,
        "overrides": [],
        "bracket": False,
        "lr_ladder": gs.LADDER,
        "eigen_train": ["train.schedule=plateau", "train.plateau_factor=0.5", "train.plateau_patience=3"],
        "eigen_val": True,
        "val_points": 30,
    }
    base.update(kw)
    return argparse.Namespace(**base)


def _study(tmp_path, **kw):
    study = gs.Study(_args(work=str(tmp_path), **kw))
    study.split_info = {"rte": {"train_rows": 2241}, "mrpc": {"train_rows": 3301}, "wnli": {"train_rows": 635}}
    study.build_plan()
    return study


def _done(study, key, value, **extra):
    """A record of ``key`` as ``run`` writes it, with the settings it would run with now."""
    over = study.by_key[key].resolved(study) if key in study.by_key else None
    study.results[key] = {"key": key, "value": value, "overrides": over or [], **extra}


def test_plan_counts_steps_and_picks_on_validation(tmp_path):
    study = _study(tmp_path)
    phases = {}
    for r in study.runs:
        phases[r.phase] = phases.get(r.phase, 0) + 1
    # sweep: 2 tasks x (lora 2 + pissa 2 + srlora 2x2) lrs; final: 2 tasks x 3 methods x 2 seeds;
    # sources: r=4 on each task + WNLI r=8 s0 and r=4; eigen: 2 held-out tasks x 1 seed
    assert phases == {"sweep": 16, "final": 12, "source": 4, "eigen": 2}
    run = study.by_key["final/rte/lora/s0"]
    assert run.steps(study) == math.ceil(2241 / 32) * 20
    assert study.by_key["eigen/rte/eigenlorax/official/s0"].epochs == 60
    assert not run.ready(study)
    _done(study, "sweep/rte/lora/lr=0.0001/s0", 60.0)
    assert not run.ready(study)
    _done(study, "sweep/rte/lora/lr=0.0005/s0", 62.0)
    assert run.ready(study)
    assert study.picked("rte", "lora") == ("lr=0.0005", ["train.lr=0.0005"])
    _done(study, "sweep/rte/srlora/rt=16,g=0.25,lr=0.0001/s0", 63.0)
    for key in ("sweep/rte/srlora/rt=24,g=0.5,lr=0.0001/s0", "sweep/rte/srlora/rt=24,g=0.5,lr=0.0005/s0",
                "sweep/rte/srlora/rt=16,g=0.25,lr=0.0005/s0"):
        _done(study, key, 61.0)
    label, over = study.picked("rte", "srlora")
    assert label == "rt=16,g=0.25,lr=0.0001"
    assert over == ["method.r_target=16", "method.gamma=0.25", "train.lr=0.0001"]
    cmd = study.command(run)
    assert "train.lr=0.0005" in cmd and f"train.eval_every={math.ceil(2241 / 32)}" in cmd
    assert any(c.endswith("splits/RTE/train.tsv") for c in cmd) and any(c.endswith("RTE/dev.tsv") for c in cmd)
    sweep_cmd = study.command(study.by_key["sweep/rte/lora/lr=0.0001/s0"])
    assert any(c.endswith("splits/RTE/val.tsv") for c in sweep_cmd)


def test_sources_are_retrained_when_their_adapters_are_gone(tmp_path):
    study = _study(tmp_path, tasks=["rte", "mrpc"])
    sources = study.sources("rte")
    assert set(sources) == {"final/mrpc/lora/s0", "final/mrpc/lora/s1", "source/mrpc/lora/r=4/s0",
                            "source/wnli/lora/r=8/s0", "source/wnli/lora/r=4/s0"}
    for r in study.runs:
        if r.phase != "eigen":
            _done(study, r.key, 50.0)
    pending = {r.key for r in study.pending()}
    # eigen runs wait for bases; every source of a basis not built yet is trained again
    assert {"eigen/rte/eigenlorax/official/s0", "eigen/mrpc/eigenlorax/official/s0"} <= pending
    assert set(sources) <= pending and "final/rte/pissa/s0" not in pending
    for key in study.sources("rte") + study.sources("mrpc"):
        path = study.adapter(key)
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_model.safetensors").write_bytes(b"")
    assert {r.key for r in study.pending()} == {"eigen/rte/eigenlorax/official/s0", "eigen/mrpc/eigenlorax/official/s0"}


def _rec(key, value, history, train_loss=None, params=73728, steps=100, label="lr=0.0005", setting=None):
    phase, task, method = key.split("/")[:3]
    rec = {"key": key, "phase": phase, "task": task, "method": method, "label": label, "setting": setting or label,
           "seed": int(key.rsplit("/s", 1)[1]), "value": value, "eval_loss": 0.5, "steps": steps,
           "trainable_parameters": params + 770, "adapter_parameters": params,
           "history": [[s, v, 0.6] for s, v in history]}
    if train_loss is not None:
        rec["train_loss"] = [[s, loss] for s, loss in train_loss]
    return rec


def test_report_steps_to_target_and_eigen_ratio(tmp_path):
    tl = [(50, 0.6), (100, 0.5)]
    results = [
        _rec("sweep/rte/lora/lr=0.0005/s0", 60.0, [(100, 60.0)]),
        _rec("sweep/rte/lora/lr=0.0001/s0", 58.0, [(100, 58.0)], label="lr=0.0001"),
        _rec("sweep/rte/srlora/rt=24,g=0.5,lr=0.0001/s0", 61.0, [(100, 61.0)], label="rt=24,g=0.5,lr=0.0001"),
        _rec("final/rte/lora/s0", 60.0, [(50, 55.0), (100, 60.0)], tl),
        _rec("final/rte/lora/s1", 62.0, [(50, 57.0), (100, 62.0)], tl),
        _rec("final/rte/srlora/s0", 63.0, [(50, 61.5), (100, 63.0)], tl, label="picked", setting="rt=24,g=0.5,lr=0.0001"),
        _rec("final/rte/srlora/s1", 61.0, [(50, 60.0), (100, 61.0)], tl, label="picked", setting="rt=24,g=0.5,lr=0.0001"),
        # a final recorded at an earlier pick (superseded, left out)
        _rec("final/rte/srlora/s2", 99.0, [(50, 99.0), (100, 99.0)], tl, label="picked", setting="rt=24,g=0.5,lr=0.001"),
        {**_rec("eigen/rte/eigenlorax/official/s0", 58.9, [(150, 50.0), (300, 58.9)], tl, params=12288, steps=300,
                label="official:K=32,P=32,r=8,lr=0.005,wd=0.1"),
         "overrides": ["train.lr=0.005", "train.schedule=plateau"], "val_value": 57.0,
         "lr": [[10, 2.5e-3], [20, 5e-3], [100, 5e-3], [200, 2.5e-3], [300, 1.25e-3]]},
        {"key": "sweep/rte/pissa/lr=0.0005/s0", "error": "boom"},
    ]
    report = gs.build_report(results)
    rte = report["tasks"]["rte"]
    assert rte["picked"] == {"lora": "lr=0.0005", "srlora": "rt=24,g=0.5,lr=0.0001"}
    assert rte["final"]["lora"]["mean"] == 61.0 and rte["final"]["srlora"]["setting"] == "rt=24,g=0.5,lr=0.0001"
    # target: LoRA's final mean 61.0; srlora's mean curve is 60.75 at step 50, 62.0 at 100
    assert rte["final"]["srlora"]["steps_to_lora_final"] == 100
    assert rte["final"]["srlora"]["steps_to_lora_final_per_seed"] == [50, 100]
    assert rte["final"]["lora"]["steps_to_lora_final"] == 100
    eig = report["eigenlorax"]["rte"]["official"]
    assert eig["ratio"] == pytest.approx(58.9 / 61.0) and eig["parameter_share"] == pytest.approx(1 / 6)
    assert eig["steps_to_lora_final"] is None
    assert eig["schedule"] == "plateau" and eig["val"] == [57.0]
    assert eig["lr_reductions"] == [2] and eig["final_lr"] == [1.25e-3]  # the warm-up's rises are not reductions
    assert report["tasks"]["rte"]["bracketed"] == {"lora": False, "srlora": False}
    assert "final/rte/srlora/s2" not in {s for s in map(str, rte["final"]["srlora"]["seeds"])} and \
        rte["final"]["srlora"]["seeds"] == [0, 1]
    text = gs.markdown(report)
    assert "| RTE (accuracy) | 61.0 +- 1.4 [2] | 62.0 +- 1.4 [2] |" in text and "0.966" in text
    gs.plot(report, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    json.dumps(report)


def test_minilm_pack_roundtrip_is_exact_and_marks_dropped_rows(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    src = tmp_path / "model"
    src.mkdir()
    tensors = {minilm_pack.EMBEDDING: rng.standard_normal((10, 4)).astype(np.float32),
               "encoder.layer.0.attention.self.query.weight": rng.standard_normal((4, 4)).astype(np.float32),
               "embeddings.position_ids": np.arange(8, dtype=np.int64)[None]}
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "bert"}')
    info = minilm_pack.pack(tmp_path / "m.pack", None, src, used=[5, 0, 3, 3])
    assert info["used_tokens"] == 3
    minilm_pack.unpack(tmp_path / "m.pack", tmp_path / "out")
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(back) == set(tensors)
    for name, a in tensors.items():
        if name != minilm_pack.EMBEDDING:
            assert back[name].dtype == a.dtype and np.array_equal(back[name], a)
    emb = back[minilm_pack.EMBEDDING]
    assert np.array_equal(emb[[0, 3, 5]], tensors[minilm_pack.EMBEDDING][[0, 3, 5]])
    assert np.isnan(emb[[1, 2, 4, 6, 7, 8, 9]]).all()
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "bert"}'


def test_bracket_step_walks_the_ladder_outward_from_an_edge():
    ladder = gs.LADDER
    assert gs.bracket_step([1e-4, 2e-4, 5e-4, 1e-3], 1e-4, ladder) == 5e-5
    assert gs.bracket_step([1e-4, 2e-4, 5e-4, 1e-3], 1e-3, ladder) == 2e-3
    assert gs.bracket_step([1e-4, 2e-4, 5e-4, 1e-3], 5e-4, ladder) is None
    assert gs.bracket_step([1e-3, 1e-2], 1e-2, ladder) is None  # the ladder ends there
    assert gs.split_label("rt=16,g=0.25,lr=0.001") == ("rt=16,g=0.25", 1e-3)
    assert gs.split_label("lr=5e-05") == ("", 5e-5)


def test_sweeps_are_extended_until_the_pick_is_bracketed_and_finals_wait(tmp_path):
    study = _study(tmp_path, tasks=["rte"], methods=["lora", "srlora"], bracket=True, eigen_configs=[])
    final = study.by_key["final/rte/lora/s0"]
    _done(study, "sweep/rte/lora/lr=0.0001/s0", 60.0)
    _done(study, "sweep/rte/lora/lr=0.0005/s0", 62.0)
    assert study.extend_sweeps() == ["sweep/rte/lora/lr=0.001/s0"]  # the best, 5e-4, was the top edge
    assert not final.ready(study) and final.resolved(study) is None
    _done(study, "sweep/rte/lora/lr=0.001/s0", 61.0)
    assert study.extend_sweeps() == [] and final.ready(study)
    assert final.resolved(study) == ["train.epochs=20", "train.lr=0.0005"]
    # srlora: only the best setting's lrs are extended, downward here
    for key, value in [("rt=24,g=0.5,lr=0.0001", 64.0), ("rt=24,g=0.5,lr=0.0005", 61.0),
                       ("rt=16,g=0.25,lr=0.0001", 60.0), ("rt=16,g=0.25,lr=0.0005", 63.0)]:
        _done(study, f"sweep/rte/srlora/{key}/s0", value)
    assert study.extend_sweeps() == ["sweep/rte/srlora/rt=24,g=0.5,lr=5e-05/s0"]
    added = study.by_key["sweep/rte/srlora/rt=24,g=0.5,lr=5e-05/s0"]
    assert added.overrides == ["method.r_target=24", "method.gamma=0.5", "train.lr=5e-05"]
    assert not study.sweep_done("rte", "srlora")


def test_a_final_recorded_at_another_pick_is_run_again(tmp_path):
    study = _study(tmp_path, tasks=["rte"], methods=["lora"], eigen_configs=[])
    _done(study, "sweep/rte/lora/lr=0.0001/s0", 60.0)
    _done(study, "sweep/rte/lora/lr=0.0005/s0", 62.0)
    _done(study, "final/rte/lora/s0", 61.0)
    assert study.done("final/rte/lora/s0")
    _done(study, "sweep/rte/lora/lr=0.0001/s0", 63.0)  # the pick moves to 1e-4
    assert not study.done("final/rte/lora/s0")
    assert "final/rte/lora/s0" in {r.key for r in study.pending()}
    old = {"key": "final/rte/lora/s0", "method": "srlora", "overrides": ["train.epochs=20", "method.r_target=16",
                                                                           "method.gamma=0.25", "train.lr=0.001"]}
    assert gs.record_setting(old) == "rt=16,g=0.25,lr=0.001"  # records from before 'setting' was kept


def test_eigen_runs_watch_validation_and_evaluate_dev_beside(tmp_path):
    study = _study(tmp_path)
    run = study.by_key["eigen/rte/eigenlorax/official/s0"]
    assert run.split == "val+dev"
    cmd = study.command(run)
    assert cmd[1].endswith("tools/glue_study.py") and cmd[2:4] == ["train", "--dev"] and cmd[4].endswith("RTE/dev.tsv")
    assert cmd[cmd.index("--dev-every") + 1] == str(math.ceil(run.steps(study) / 20))
    assert any(c.startswith("data.eval_path=") and c.endswith("splits/RTE/val.tsv") for c in cmd)
    assert f"train.eval_every={math.ceil(run.steps(study) / 30)}" in cmd
    for o in ("train.schedule=plateau", "train.plateau_metric=accuracy", "train.plateau_patience=3", "train.lr=0.005",
              "train.weight_decay=0.1", "method.r=8"):
        assert o in cmd
    # an EigenLoRAx record of the linear-schedule recipe is not this run's
    study.results[run.key] = {"key": run.key, "value": 55.0, "overrides": [o for o in run.resolved(study)
                                                                             if "plateau" not in o]}
    assert not study.done(run.key)


def test_train_with_dev_logs_dev_beside_and_trains_the_same(tmp_path):
    from tests.test_distributed import table

    data, dev = table(tmp_path / "t.tsv", rows=32), table(tmp_path / "dev.tsv", rows=24)
    base = ["--method", "lora", "model.name_or_path=tiny-bert", "data.format=table", f"data.train_path={data}",
            f"data.eval_path={data}", "method.target_modules=[query,value]", "method.r=4", "train.max_steps=6",
            "train.lr=1e-2", "train.log_every=1", "train.eval_every=2", "train.eval_at_start=false",
            "train.schedule=plateau", "train.plateau_patience=0", "logging.progress=false", "logging.tensorboard=false"]
    assert gs.main(["train", "--dev", str(dev), "--dev-every", "4", *base, f"logging.output_dir={tmp_path / 'a'}"]) == 0
    from lrx.cli import main

    assert main([*base, f"logging.output_dir={tmp_path / 'b'}"]) == 0
    got = [json.loads(x) for x in (tmp_path / "a" / gs.DEV_METRICS).read_text().splitlines()]
    assert [r["step"] for r in got] == [4, 6] and all(r["split"] == "eval" and "accuracy" in r for r in got)

    def logged(run):
        return [(r["split"], r["step"], r.get("loss"), r.get("lr"), r.get("eval_loss"))
                for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    assert logged("a") == logged("b")  # dev changes nothing the run sees
