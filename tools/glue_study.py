"""GLUE study: per-method learning rates picked on a held-out validation split, dev over seeds,
convergence curves and the EigenLoRAx leave-one-out with a richer basis (issue 19).

    python tools/glue_study.py run --glue-dir GLUE_DIR --work runs/glue-study \\
        --results runs/glue-study-runs.jsonl --jobs 14 --deadline 560 model.name_or_path=minilm-l6 train.device=cuda
    python tools/glue_study.py report --results runs/glue-study-runs.jsonl --json benchmarks/glue-study.json \\
        --plot benchmarks/glue-study-convergence.png

``run`` does, as dependencies allow (every run is one ``launch/train.py`` process with the
settings of ``configs/minilm/rte.yaml``; ``--jobs`` of them at once; sweep runs and the
adapters the bases need first, then the first EigenLoRAx config and the other finals, then the
other EigenLoRAx configs; longest first within each of these; bases are built in the
background):

1. **Split**: each task's ``train.tsv`` -> ``<work>/splits/<TASK>/{train,val}.tsv``, a seeded
   10 % validation split (``--val-fraction``, ``--split-seed``), lines copied verbatim.
2. **Sweep** (train on the 90 %, evaluate on val): lora and pissa at each ``--sweep-lrs``,
   srlora at each lr and each ``--srlora-settings`` (r_target/gamma), seeds ``--sweep-seeds``;
   with ``--bracket`` a method whose best lr is the lowest (highest) tried with its other
   settings gets the next lower (higher) lr of ``--lr-ladder``, until it is bracketed.
3. **Final**: each method at its best mean validation metric, seeds ``--final-seeds``, trained
   on the same 90 % and evaluated on dev every ``total_steps / --eval-points`` steps (curves).
4. **EigenLoRAx**: source LoRA adapters (the lora finals of every task, LoRA at each
   ``--source-ranks`` at lora's picked lr, LoRA on WNLI), for each held-out task a basis from the other tasks'
   sources (``tools/build_eigenbasis.py``) per ``--eigen-configs``, and eigenlorax on the held-out
   task (``--eigen-seeds``, ``--eigen-epoch-factor`` x the task's epochs, ``--eigen-train``:
   by default ReduceLROnPlateau watching the task metric on val, ``--val-points`` evaluations;
   dev evaluated beside it by ``glue_study.py train --dev``, which training never sees).

A run counts as done only when its record holds its current settings (a final recorded at an
earlier pick, or an EigenLoRAx run of another recipe, runs again).

Every finished run appends one compact JSON line to ``--results`` (and rewrites
``--mirror``); a later ``run`` with the same file skips what is there, so the study resumes
across calls. A run whose adapter a pending basis needs is trained again if its folder is
gone. ``--deadline`` (seconds) stops launching runs that would not finish in time and kills
what is still running when it passes. ``report`` turns the results into the JSON, the
markdown tables and the convergence plot.

The plan is in ``glue_study_plan.py``, the launcher in ``glue_study_runs.py``, the report in
``glue_study_report.py`` beside this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__:  # imported as tools.glue_study (by its tests, from the repository root)
    from tools.glue_bench import TASKS
    from tools.glue_study_plan import DEV_METRICS, LADDER, SOURCE_TASK, STUDY_TASKS, bracket_step, split_label, split_lines, write_splits
    from tools.glue_study_report import build_report, markdown, plot, record_setting
    from tools.glue_study_runs import Study
else:  # python tools/glue_study.py: this folder is the first on sys.path
    from glue_bench import TASKS
    from glue_study_plan import DEV_METRICS, LADDER, SOURCE_TASK, STUDY_TASKS, bracket_step, split_label, split_lines, write_splits
    from glue_study_report import build_report, markdown, plot, record_setting
    from glue_study_runs import Study

# What the tests (tests/test_glue_study.py) reach through this module.
__all__ = ["DEV_METRICS", "LADDER", "Study", "bracket_step", "build_report", "main", "markdown", "plot",
           "record_setting", "split_label", "split_lines", "train_with_dev"]


# ---- train with dev beside the run's own evaluation -------------------------------------------


def train_with_dev(argv: list[str]) -> int:
    """``launch/train.py ARGS`` that also evaluates ``--dev`` every ``--dev-every`` steps and at
    the end, into ``RUN/dev_metrics.jsonl``. The run's own evaluation set (the validation
    split) is what a plateau schedule watches; dev is evaluated after the step's evaluation,
    logging and checkpoint, under no_grad, and changes nothing the training sees."""
    dev = Path(argv[argv.index("--dev") + 1])
    every = int(argv[argv.index("--dev-every") + 1])
    for flag in ("--dev", "--dev-every"):
        at = argv.index(flag)
        del argv[at : at + 2]
    from lrx import cli
    from lrx.data import build_datasets
    from lrx.models import load_tokenizer
    from lrx.trainer import EvalShard, MetricsLog

    state: dict = {}

    def evaluate_dev(trainer) -> None:
        if trainer.step % every and trainer.step != trainer.total_steps:
            return
        if not state:
            if not trainer.resumed:
                (trainer.run_dir / DEV_METRICS).unlink(missing_ok=True)  # --overwrite keeps files lrx did not write
            cfg = trainer.cfg
            mc = cfg.model
            tok = load_tokenizer(mc.tokenizer or mc.name_or_path, None if mc.tokenizer else mc.gguf_file)
            data = build_datasets(dataclasses.replace(cfg.data, train_path=str(dev), eval_path=str(dev),
                                                      max_train_samples=None), tok)
            shard = EvalShard(len(data.eval), cfg.train.eval_batch_size, trainer.backend.rank,
                              trainer.backend.world_size)
            loader = torch_loader(data.eval, shard, data.collate_fn)
            log = MetricsLog(trainer.run_dir, tensorboard=False, enabled=trainer.is_main)
            log.path = trainer.run_dir / DEV_METRICS
            state.update(loader=loader, shard=shard, log=log)
        own = trainer.eval_loader, trainer.eval_shard, trainer.metrics
        trainer.eval_loader, trainer.eval_shard, trainer.metrics = state["loader"], state["shard"], state["log"]
        try:
            trainer.evaluate()
        finally:
            trainer.eval_loader, trainer.eval_shard, trainer.metrics = own
            trainer.model.train()

    return cli.train_main(argv, callbacks=[evaluate_dev])


def torch_loader(dataset, sampler, collate_fn):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn)


# ---- CLI --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="launch/train.py ARGS with dev evaluated beside the run's own evaluation: "
                                 "train --dev DEV_TSV --dev-every N ARGS...", add_help=False)
    r = sub.add_parser("run", help="train what is not in --results yet")
    r.add_argument("--glue-dir", required=True)
    r.add_argument("--work", default="runs/glue-study")
    r.add_argument("--results", default="runs/glue-study-runs.jsonl")
    r.add_argument("--mirror", default=None, help="also keep a full copy of the results here")
    r.add_argument("--config", default="configs/minilm/rte.yaml")
    r.add_argument("--tasks", nargs="+", default=STUDY_TASKS, choices=STUDY_TASKS)
    r.add_argument("--methods", nargs="+", default=["lora", "pissa", "srlora"])
    r.add_argument("--sweep-lrs", nargs="+", type=float, default=[1e-4, 2e-4, 5e-4, 1e-3])
    r.add_argument("--srlora-settings", nargs="+", default=["24:0.5", "16:0.25"], help="r_target:gamma")
    r.add_argument("--sweep-seeds", nargs="+", type=int, default=[0])
    r.add_argument("--final-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    add_eigen_and_launch_arguments(r)
    p = sub.add_parser("report", help="JSON, markdown tables and plot from --results")
    p.add_argument("--results", nargs="+", default=["runs/glue-study-runs.jsonl"],
                   help="results JSONL files of run, or a report JSON written before (its runs are read)")
    p.add_argument("--bases", default=None, help="bases.json written by run")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--meta", default=None, help="JSON merged into the report's 'setup'")
    return parser


def add_eigen_and_launch_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--eigen-configs", nargs="*", default=["official:32:32:8:5e-3:0.1", "small:24:6:2:1e-2:0.1"],
                   help="name:K:P:r:lr:weight_decay; none = no EigenLoRAx part")
    r.add_argument("--eigen-seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--eigen-epoch-factor", type=float, default=3.0)
    r.add_argument("--eigen-train", nargs="*", default=["train.schedule=plateau", "train.plateau_factor=0.5",
                                                         "train.plateau_patience=3"],
                   help="train.* overrides of the EigenLoRAx runs; with train.schedule=plateau the plateau watches "
                        "the task's metric on the validation split")
    r.add_argument("--eigen-val", action=argparse.BooleanOptionalAction, default=True,
                   help="EigenLoRAx runs evaluate on the validation split (what a plateau schedule watches) and on "
                        "dev beside it (the reported numbers, never seen by training)")
    r.add_argument("--val-points", type=int, default=30, help="validation evaluations per EigenLoRAx run")
    r.add_argument("--bracket", action=argparse.BooleanOptionalAction, default=True,
                   help="extend a method's sweep along --lr-ladder until its best lr is not the edge of those tried")
    r.add_argument("--lr-ladder", nargs="+", type=float, default=LADDER)
    r.add_argument("--source-seeds", nargs="+", type=int, default=None,
                   help="seeds of the lora finals that are basis sources (default: every final seed)")
    r.add_argument("--source-ranks", nargs="*", type=int, default=[4, 16], help="extra LoRA ranks per task (seed 0)")
    r.add_argument("--wnli-ranks", nargs="*", type=int, default=[4, 16], help="extra LoRA ranks on WNLI (seed 0)")
    r.add_argument("--wnli-sources", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--wnli-seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--val-fraction", type=float, default=0.1)
    r.add_argument("--split-seed", type=int, default=0)
    r.add_argument("--eval-points", type=int, default=20, help="dev evaluations per final/eigen run")
    r.add_argument("--epochs", type=float, default=None, help="override every task's epochs (smoke runs)")
    r.add_argument("--max-train", type=int, default=None, help="first N train/eval rows only (smoke runs)")
    r.add_argument("--only", nargs="*", default=None, help="fnmatch patterns of run keys to consider")
    r.add_argument("--jobs", type=int, default=4)
    r.add_argument("--deadline", type=float, default=0, help="seconds; 0 = none")
    r.add_argument("--rate", type=float, default=20.0, help="first guess of steps/s per run (deadline planning)")
    r.add_argument("--startup", type=float, default=20.0, help="seconds a run takes before its first step")
    r.add_argument("--safety", type=float, default=1.1, help="launch a run only if safety x its estimate fits")
    r.add_argument("--dry-run", action="store_true", help="print the plan (runs and steps) and exit")
    r.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE for every run")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return train_with_dev(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "report":
        return report_main(args)
    if not Path(args.glue_dir).is_dir():
        parser.error(f"--glue-dir {args.glue_dir} is not a folder")
    return run_main(args)


def report_main(args: argparse.Namespace) -> int:
    results: dict[str, dict] = {}
    bases, setup = None, None
    for f in args.results:
        if f.endswith(".json"):  # a report written before (benchmarks/glue-study.json): its runs
            old = json.loads(Path(f).read_text())
            bases, setup = old.get("bases"), old.get("setup")
            results.update({rec["key"]: rec for rec in old["runs"]})
            continue
        for line in Path(f).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                results[rec["key"]] = rec
    if args.bases:
        bases = json.loads(Path(args.bases).read_text())
    report = build_report(list(results.values()), bases)
    if args.meta:
        setup = json.loads(Path(args.meta).read_text())
    if setup:
        report = {"setup": setup, **report}
    text = markdown(report)
    print(text)
    report["tables_markdown"] = text
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, Path(args.plot))
    return 0


def run_main(args: argparse.Namespace) -> int:
    study = Study(args)
    all_tasks = list(args.tasks) + ([SOURCE_TASK] if args.eigen_configs and args.wnli_sources else [])
    study.split_info = write_splits(Path(args.glue_dir), study.splits, args.tasks, args.val_fraction, args.split_seed)
    if SOURCE_TASK in all_tasks:
        n = len((Path(args.glue_dir) / TASKS[SOURCE_TASK][0] / "train.tsv").read_text().splitlines()) - 1
        study.split_info[SOURCE_TASK] = {"train_rows": n, "val_rows": 0}
    (study.work / "splits.json").write_text(json.dumps(study.split_info, indent=1))
    study.build_plan()
    if args.dry_run:
        study.load_results(Path(args.results))
        study.extend_sweeps()
        todo = study.pending()
        for run in (r for r in study.runs if r.key in study.allowed):
            print(f"{run.key}  steps {run.steps(study)}{'' if study.done(run.key) else '  (to run)'}")
        print(f"{len(study.allowed)} runs, {sum(r.steps(study) for r in study.runs if r.key in study.allowed):,} steps; "
              f"not done yet: {len(todo)} runs, {sum(r.steps(study) for r in todo):,} steps")
        return 0
    return study.execute()


if __name__ == "__main__":
    sys.exit(main())
