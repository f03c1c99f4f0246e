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
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__:  # imported as tools.glue_study (by its tests, from the repository root)
    from tools.glue_bench import TASKS
else:  # python tools/glue_study.py: this folder is the first on sys.path
    from glue_bench import TASKS

REPO = Path(__file__).resolve().parents[1]
DEV_METRICS = "dev_metrics.jsonl"  # what `train --dev` writes into the run folder

STUDY_TASKS = ["rte", "mrpc", "stsb", "cola"]
HAS_HEADER = {"rte": True, "mrpc": True, "stsb": True, "cola": False, "wnli": True}
BATCH = 32  # configs/minilm/rte.yaml's train.batch_size
SOURCE_TASK = "wnli"  # extra source data for the EigenLoRAx bases (never a held-out task)
SOURCE_LR = 5e-4  # LoRA lr of the WNLI sources (no sweep there)


# ---- validation split -------------------------------------------------------------------------


def split_lines(text: str, header: bool, fraction: float, seed: int) -> tuple[str, str, int, int]:
    """(train text, val text, n train, n val): a seeded share ``fraction`` of the data lines
    goes to val; both keep the header line (if any) and the original line order."""
    lines = text.splitlines(keepends=True)
    head, rows = (lines[:1], lines[1:]) if header else ([], lines)
    rows = [r if r.endswith("\n") else r + "\n" for r in rows if r.strip()]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = round(fraction * len(rows))
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    val = [r for i, r in enumerate(rows) if i in val_idx]
    return "".join(head + train), "".join(head + val), len(train), len(val)


def write_splits(glue_dir: Path, out: Path, tasks: list[str], fraction: float, seed: int) -> dict[str, dict]:
    """Write ``out/<FOLDER>/{train,val}.tsv`` for every task; returns sizes and sha256."""
    import hashlib

    info = {}
    for task in tasks:
        folder = TASKS[task][0]
        src = glue_dir / folder / "train.tsv"
        train, val, n_train, n_val = split_lines(src.read_text(encoding="utf-8"), HAS_HEADER[task], fraction, seed)
        (out / folder).mkdir(parents=True, exist_ok=True)
        for name, text in (("train", train), ("val", val)):
            (out / folder / f"{name}.tsv").write_text(text, encoding="utf-8")
        info[task] = {"train_rows": n_train, "val_rows": n_val,
                      "train_sha256": hashlib.sha256(train.encode()).hexdigest(),
                      "val_sha256": hashlib.sha256(val.encode()).hexdigest()}
    return info


# ---- the plan ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    key: str
    phase: str  # sweep | final | source | eigen
    task: str
    method: str
    label: str  # the setting, e.g. lr=5e-4 or rt=24,g=0.5,lr=5e-4
    seed: int
    split: str  # what it is evaluated on: val | dev
    epochs: float
    overrides: Callable[[Study], list[str]] | list[str]
    ready: Callable[[Study], bool] = lambda s: True
    keep: bool = False  # its adapter_peft may be a basis source
    priority: int = 0  # lower first

    def steps(self, study: Study) -> int:
        n = study.train_rows(self.task)
        return math.ceil(math.ceil(n / BATCH) * self.epochs)

    def resolved(self, study: Study) -> list[str] | None:
        """What this run's command sets that depends on the results so far (the picked setting),
        with its epochs; None while that is not known (the sweep it needs is not done)."""
        if not isinstance(self.overrides, list) and not self.ready(study) and self.phase in ("final", "source"):
            return None
        over = self.overrides if isinstance(self.overrides, list) else self.overrides(study)
        return [f"train.epochs={self.epochs}", *over]


def fmt_lr(lr: float) -> str:
    return f"{lr:g}"


LADDER = [2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2]


def split_label(label: str) -> tuple[str, float]:
    """(the setting without its lr, the lr): 'rt=16,g=0.25,lr=0.001' -> ('rt=16,g=0.25', 0.001)."""
    head, _, lr = label.rpartition("lr=")
    return head.rstrip(","), float(lr)


def bracket_step(tried: list[float], best: float, ladder: list[float]) -> float | None:
    """The next lr to try so that ``best`` has a tried neighbour on both sides: the ladder's
    value below (above) the lowest (highest) tried lr when ``best`` is that edge; None when it
    is bracketed already or the ladder ends there."""
    if best == min(tried):
        lower = [x for x in ladder if x < best * (1 - 1e-9)]
        if lower:
            return max(lower)
    if best == max(tried):
        higher = [x for x in ladder if x > best * (1 + 1e-9)]
        if higher:
            return min(higher)
    return None


def sweep_settings(method: str, lrs: list[float], srlora: list[tuple[int, float]]) -> list[tuple[str, list[str]]]:
    out = []
    for lr in lrs:
        if method == "srlora":
            for rt, g in srlora:
                out.append((f"rt={rt},g={g:g},lr={fmt_lr(lr)}",
                            [f"method.r_target={rt}", f"method.gamma={g:g}", f"train.lr={lr!r}"]))
        else:
            out.append((f"lr={fmt_lr(lr)}", [f"train.lr={lr!r}"]))
    return out


@dataclasses.dataclass
class EigenConfig:
    name: str
    k: int
    augment: int
    r: int
    lr: float
    weight_decay: float


def parse_eigen(spec: str) -> EigenConfig:
    """name:K:P:r:lr:wd, e.g. official:32:32:8:5e-3:0.1."""
    name, k, p, r, lr, wd = spec.split(":")
    return EigenConfig(name, int(k), int(p), int(r), float(lr), float(wd))


class Study:
    def __init__(self, args):
        self.extended: set[str] = set()
        self.args = args
        self.work = Path(args.work)
        self.splits = self.work / "splits"
        self.results: dict[str, dict] = {}
        self.split_info: dict[str, dict] = {}
        self.bases_built: set[str] = set()
        self.bases_failed: set[str] = set()
        self.basis_jobs: dict[str, tuple] = {}  # basis folder -> (build process, config, held-out task, sources)
        self.runs: list[Run] = []

    # data
    def train_rows(self, task: str) -> int:
        n = self.split_info[task]["train_rows"]
        return min(n, self.args.max_train) if self.args.max_train else n

    def train_path(self, task: str) -> Path:
        if task == SOURCE_TASK:
            return Path(self.args.glue_dir) / TASKS[task][0] / "train.tsv"
        return self.splits / TASKS[task][0] / "train.tsv"

    def eval_path(self, task: str, split: str) -> Path:
        if split == "val":
            return self.splits / TASKS[task][0] / "val.tsv"
        return Path(self.args.glue_dir) / TASKS[task][0] / "dev.tsv"

    def run_dir(self, run: Run) -> Path:
        return self.work / "runs" / re.sub(r"[^A-Za-z0-9_.=,-]", "_", run.key.replace("/", "__"))

    # results
    def done(self, key: str) -> bool:
        """A record of this run with its current settings (a final recorded at another pick, or
        an EigenLoRAx run of another recipe, is not done)."""
        rec = self.results.get(key)
        if rec is None or "value" not in rec:
            return False
        run = self.by_key.get(key)
        if run is None:
            return True
        want = run.resolved(self)
        return want is not None and set(want) <= set(rec.get("overrides", []))

    def sweep_done(self, task: str, method: str) -> bool:
        """Every sweep run of ``method`` on ``task`` done, and its pick bracketed (or at the
        ladder's end)."""
        runs = [r for r in self.runs if r.phase == "sweep" and r.task == task and r.method == method]
        return all(self.done(r.key) for r in runs) and not self.bracket_runs(task, method)

    def bracket_runs(self, task: str, method: str) -> list[Run]:
        """Sweep runs to add for ``method`` on ``task``: once its sweep so far is done, the next
        lr beyond its best setting's lr where that is the edge of the lrs tried with that
        setting (``--bracket``)."""
        if not self.args.bracket:
            return []
        runs = [r for r in self.runs if r.phase == "sweep" and r.task == task and r.method == method]
        if not runs or not all(self.done(r.key) for r in runs):
            return []
        best, _ = self.picked(task, method)
        head, lr = split_label(best)
        tried = sorted({split_label(r.label)[1] for r in runs if split_label(r.label)[0] == head})
        nxt = bracket_step(tried, lr, self.args.lr_ladder)
        if nxt is None:
            return []
        template = next(r for r in runs if r.label == best)
        label = f"{head},lr={fmt_lr(nxt)}" if head else f"lr={fmt_lr(nxt)}"
        over = [o for o in template.overrides if not o.startswith("train.lr=")] + [f"train.lr={nxt!r}"]
        return [dataclasses.replace(template, key=f"sweep/{task}/{method}/{label}/s{seed}", label=label, seed=seed,
                                    overrides=over) for seed in self.args.sweep_seeds]

    def extend_sweeps(self) -> list[str]:
        """Add the bracketing sweep runs that the results so far call for, to a fixed point
        (results of earlier calls add theirs at once); returns the keys added."""
        added = []
        while True:
            new = [r for task in self.args.tasks for method in self.args.methods
                   for r in self.bracket_runs(task, method) if r.key not in self.by_key]
            if not new:
                return added
            for r in new:
                self.runs.append(r)
                self.by_key[r.key] = r
                if not self.args.only or any(fnmatch.fnmatch(r.key, p) for p in self.args.only):
                    self.allowed.add(r.key)
                added.append(r.key)

    def picked(self, task: str, method: str) -> tuple[str, list[str]]:
        """(label, overrides) of the sweep setting with the best mean validation metric."""
        by_label: dict[str, list[float]] = {}
        over: dict[str, list[str]] = {}
        for r in self.runs:
            if r.phase == "sweep" and r.task == task and r.method == method and self.done(r.key):
                by_label.setdefault(r.label, []).append(self.results[r.key]["value"])
                over[r.label] = r.overrides if isinstance(r.overrides, list) else r.overrides(self)
        best = max(by_label, key=lambda lab: statistics.mean(by_label[lab]))
        return best, over[best]

    def picked_lr(self, task: str) -> str:
        label, _ = self.picked(task, "lora")
        return label.split("lr=")[1]

    def setting(self, run: Run) -> str:
        """The setting a run trained with: a final's pick, a source's lr and rank, else its label."""
        if run.phase == "final":
            return self.picked(run.task, run.method)[0]
        if run.phase == "source" and run.task != SOURCE_TASK:
            return f"{run.label},lr={self.picked_lr(run.task)}"
        return run.label

    def adapter(self, key: str) -> Path:
        run = self.by_key[key]
        return self.run_dir(run) / "adapter_peft"

    def has_adapter(self, key: str) -> bool:
        return (self.adapter(key) / "adapter_model.safetensors").is_file()

    def sources(self, held: str) -> list[str]:
        return [r.key for r in self.runs if r.keep and r.task != held]

    def basis_dir(self, held: str, cfg: EigenConfig) -> Path:
        return self.work / "bases" / f"{cfg.name}-no-{held}"

    # ---- plan
    def build_plan(self) -> None:
        a = self.args
        tasks = a.tasks
        methods = a.methods
        srl = [(int(x.split(":")[0]), float(x.split(":")[1])) for x in a.srlora_settings]
        runs: list[Run] = []
        for task in tasks:
            epochs = a.epochs or TASKS[task][1]
            for method in methods:
                for label, over in sweep_settings(method, a.sweep_lrs, srl):
                    for seed in a.sweep_seeds:
                        runs.append(Run(f"sweep/{task}/{method}/{label}/s{seed}", "sweep", task, method, label, seed,
                                        "val", epochs, over, priority=0))
                for seed in a.final_seeds:
                    def over(s, task=task, method=method):
                        return s.picked(task, method)[1]

                    def ready(s, task=task, method=method):
                        return s.sweep_done(task, method)

                    runs.append(Run(f"final/{task}/{method}/s{seed}", "final", task, method, "picked", seed, "dev",
                                    epochs, over, ready, keep=(method == "lora" and bool(a.eigen_configs) and
                                                               (a.source_seeds is None or seed in a.source_seeds)),
                                    priority=0 if method == "lora" and a.eigen_configs else 1))
        if a.eigen_configs:
            for task in tasks:
                epochs = a.epochs or TASKS[task][1]
                for r in a.source_ranks:
                    def over(s, task=task, r=r):
                        return [f"train.lr={s.picked_lr(task)}", f"method.r={r}"]

                    def ready(s, task=task):
                        return s.sweep_done(task, "lora")

                    runs.append(Run(f"source/{task}/lora/r={r}/s0", "source", task, "lora", f"r={r}", 0, "val",
                                    epochs, over, ready, keep=True, priority=0))
            if a.wnli_sources:
                epochs = a.epochs or TASKS[SOURCE_TASK][1]
                for r, seed in [(8, s) for s in a.wnli_seeds] + [(r, 0) for r in a.wnli_ranks]:
                    runs.append(Run(f"source/{SOURCE_TASK}/lora/r={r}/s{seed}", "source", SOURCE_TASK, "lora",
                                    f"r={r}", seed, "dev", epochs, [f"train.lr={SOURCE_LR!r}", f"method.r={r}"],
                                    keep=True, priority=0))
            for index, cfg in enumerate(map(parse_eigen, a.eigen_configs)):
                for held in tasks:
                    epochs = (a.epochs or TASKS[held][1]) * a.eigen_epoch_factor
                    for seed in a.eigen_seeds:
                        def over(s, held=held, cfg=cfg):
                            plateau = [f"train.plateau_metric={TASKS[held][2]}", *s.args.eigen_train] \
                                if any(o == "train.schedule=plateau" for o in s.args.eigen_train) else s.args.eigen_train
                            return [f"method.basis={s.basis_dir(held, cfg)}", f"method.r={cfg.r}",
                                    f"train.lr={cfg.lr!r}", f"train.weight_decay={cfg.weight_decay!r}", *plateau]

                        def ready(s, held=held, cfg=cfg):
                            return str(s.basis_dir(held, cfg)) in s.bases_built

                        runs.append(Run(f"eigen/{held}/eigenlorax/{cfg.name}/s{seed}", "eigen", held, "eigenlorax",
                                        f"{cfg.name}:K={cfg.k},P={cfg.augment},r={cfg.r},lr={fmt_lr(cfg.lr)},"
                                        f"wd={cfg.weight_decay:g}", seed, "val+dev" if a.eigen_val else "dev", epochs,
                                        over, ready, priority=1 if seed == a.eigen_seeds[0] else 2 + index))
        # --only limits what is launched; the plan keeps every run for the dependencies.
        self.allowed = {r.key for r in runs if not a.only or any(fnmatch.fnmatch(r.key, p) for p in a.only)}
        self.runs = runs
        self.by_key = {r.key: r for r in runs}
        self.extend_sweeps()

    def command(self, run: Run) -> list[str]:
        a = self.args
        overrides = run.overrides if isinstance(run.overrides, list) else run.overrides(self)
        total = run.steps(self)
        eval_every = max(1, math.ceil(total / a.eval_points)) if run.split == "dev" else 0
        entry = [sys.executable, str(REPO / "launch" / "train.py")]
        if run.split == "val+dev":  # plateau on val; dev evaluated beside it, never seen by training
            eval_every = max(1, math.ceil(total / a.val_points))
            entry = [sys.executable, str(REPO / "tools" / "glue_study.py"), "train", "--dev",
                     str(self.eval_path(run.task, "dev")), "--dev-every", str(max(1, math.ceil(total / a.eval_points)))]
        if run.phase == "source":
            eval_every = 10**9  # only at the end
        data = []
        if a.max_train:
            data = [f"data.max_train_samples={a.max_train}", f"data.max_eval_samples={a.max_train}"]
        return [
            *entry, "--config", str(REPO / a.config),
            "--method", run.method, "--overwrite",
            f"data.glue_task={run.task}", f"data.train_path={self.train_path(run.task)}",
            f"data.eval_path={self.eval_path(run.task, 'val' if run.split == 'val+dev' else run.split)}",
            f"train.epochs={run.epochs}", f"train.seed={run.seed}", f"train.eval_every={eval_every}",
            "train.eval_at_start=false", "logging.progress=false", "logging.tensorboard=false",
            f"logging.output_dir={self.run_dir(run)}", *data, *a.overrides, *overrides,
        ]

    # ---- results
    def load_results(self, path: Path) -> None:
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.results[rec["key"]] = rec

    def record(self, run: Run, cmd: list[str], wall: float) -> dict:
        out = self.run_dir(run)
        summary = json.loads((out / "summary.json").read_text())
        metric = TASKS[run.task][2]
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        train = [[r["step"], round(r["loss"], 5)] for r in lines if r["split"] == "train"]
        evals = [r for r in lines if r["split"] == "eval"]
        last = summary["eval"]
        extra = {}
        if run.split == "val+dev":
            extra["val_value"] = 100 * last[metric]
            extra["val_history"] = [[e["step"], round(100 * e[metric], 3), round(e["eval_loss"], 5)] for e in evals]
            extra["lr"] = [[r["step"], r["lr"]] for r in lines if r["split"] == "train"]
            evals = [json.loads(x) for x in (out / DEV_METRICS).read_text().splitlines()]
            last = evals[-1]
        rec = {
            "key": run.key, "phase": run.phase, "task": run.task, "method": run.method, "label": run.label,
            "setting": self.setting(run), "seed": run.seed, "split": run.split, "metric": metric,
            "value": 100 * last[metric],
            "eval_loss": last["eval_loss"], **extra,
            "overrides": [c for c in cmd[cmd.index("--overwrite") + 1:] if not c.startswith(("logging.", "data."))],
            "steps": summary["steps"], "trainable_parameters": summary["trainable_parameters"],
            "adapter_parameters": adapter_parameters(out / "adapter" / "adapter_model.safetensors"),
            "final_train_loss": summary["final_train_loss"], "wall_s": round(wall, 1),
            "history": [[e["step"], round(100 * e[metric], 3), round(e["eval_loss"], 5)] for e in evals],
        }
        if run.phase != "sweep":
            rec["train_loss"] = train
        events = out / "method_events.jsonl"
        if events.is_file():
            rec["events"] = len({json.loads(x)["step"] for x in events.read_text().splitlines()})
        return rec

    # ---- scheduler
    def needed_sources(self) -> set[str]:
        """Source runs whose adapters a basis still to be built needs."""
        need = set()
        for cfg in map(parse_eigen, self.args.eigen_configs):
            for held in self.args.tasks:
                pending = [r for r in self.runs if r.phase == "eigen" and r.task == held and r.key in self.allowed
                           and r.key.split("/")[3] == cfg.name and not self.done(r.key)]
                if pending and str(self.basis_dir(held, cfg)) not in self.bases_built:
                    need.update(k for k in self.sources(held) if k in self.by_key)
        return need

    def pending(self) -> list[Run]:
        need = self.needed_sources()
        return [r for r in self.runs if r.key in self.allowed
                and (not self.done(r.key) or (r.key in need and not self.has_adapter(r.key)))]

    def try_bases(self) -> None:
        """Start the basis builds whose sources are ready, in the background (a build over 17
        adapters takes tens of seconds of CPU; the scheduler keeps polling meanwhile), and
        collect the finished ones."""
        for out, (proc, cfg, held, srcs) in list(self.basis_jobs.items()):
            if proc.poll() is None:
                continue
            del self.basis_jobs[out]
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                print(f"[basis] {Path(out).name} FAILED:\n{stderr[-2000:]}", flush=True)
                self.bases_failed.add(out)
                continue
            meta = json.loads((Path(out) / "eigenbasis.json").read_text())
            self.basis_meta[out] = {"held_out": held, "config": cfg.name, "k": cfg.k, "augment": cfg.augment,
                                    "sources": srcs, "explained_variance_kept": meta["explained_variance_kept"]}
            print(f"[basis] {Path(out).name}: {len(srcs)} sources; {stdout.splitlines()[0]}", flush=True)
            self.bases_built.add(out)
        for cfg in map(parse_eigen, self.args.eigen_configs):
            for held in self.args.tasks:
                out = self.basis_dir(held, cfg)
                if str(out) in self.bases_built or str(out) in self.bases_failed or str(out) in self.basis_jobs:
                    continue
                if not any(r.phase == "eigen" and r.task == held and r.key.split("/")[3] == cfg.name
                           and not self.done(r.key) and r.key in self.allowed for r in self.runs):
                    continue
                srcs = [k for k in self.sources(held) if k in self.by_key]
                if not srcs or not all(self.done(k) and self.has_adapter(k) for k in srcs):
                    continue
                earlier = self.bases_on_disk.get(str(out))
                if earlier and earlier.get("sources") == srcs and earlier.get("k") == cfg.k and \
                        earlier.get("augment") == cfg.augment and (out / "eigenbasis.json").is_file() and \
                        all(self.adapter(k).stat().st_mtime < (out / "eigenbasis.json").stat().st_mtime for k in srcs):
                    self.basis_meta[str(out)] = earlier  # built by an earlier call from these very adapters
                    self.bases_built.add(str(out))
                    print(f"[basis] {out.name}: kept from an earlier call", flush=True)
                    continue
                cmd = [sys.executable, str(REPO / "tools" / "build_eigenbasis.py"), str(out),
                       *[str(self.adapter(k)) for k in srcs], "--k", str(cfg.k), "--augment", str(cfg.augment)]
                self.basis_jobs[str(out)] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                              text=True), cfg, held, srcs)

    def execute(self) -> int:
        a = self.args
        t_start = time.time()
        deadline = t_start + a.deadline if a.deadline else float("inf")
        results_path = Path(a.results)
        self.load_results(results_path)
        for added in self.extend_sweeps():
            print(f"[bracket] {added}", flush=True)
        self.basis_meta: dict[str, dict] = {}
        bases = self.work / "bases.json"
        self.bases_on_disk = json.loads(bases.read_text()) if bases.is_file() else {}
        running: dict[str, tuple[subprocess.Popen, Run, list[str], float, object]] = {}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        rates: list[float] = []
        failures = 0
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)

        def est(run: Run) -> float:
            rate = statistics.median(rates) if rates else a.rate
            return a.startup + run.steps(self) / rate

        while True:
            for key, (proc, run, cmd, t0, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                wall = time.time() - t0
                del running[key]
                if proc.returncode != 0:
                    failures += 1
                    tail = "\n".join(Path(log.name).read_text().strip().splitlines()[-8:])
                    print(f"[{key}] FAILED ({wall:.0f} s):\n{tail}", flush=True)
                    self.results[key] = {"key": key, "error": tail}
                    continue
                rec = self.record(run, cmd, wall)
                rates.append(rec["steps"] / max(wall - a.startup, 1.0))
                self.results[key] = rec
                with results_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if a.mirror:
                    Path(a.mirror).write_text(results_path.read_text())
                print(f"[{key}] {rec['metric']} {rec['value']:.2f} steps {rec['steps']} ({wall:.0f} s, "
                      f"{len(running)} running, t={time.time() - t_start:.0f} s)", flush=True)
                for added in self.extend_sweeps():
                    print(f"[bracket] {added}", flush=True)
            self.try_bases()
            if time.time() > deadline:
                for key, (proc, *_) in running.items():
                    proc.kill()
                    print(f"[{key}] killed at the deadline", flush=True)
                for out, (proc, *_) in self.basis_jobs.items():
                    proc.kill()
                    print(f"[basis] {Path(out).name} killed at the deadline", flush=True)
                break
            todo = [r for r in self.pending() if r.key not in running and "error" not in self.results.get(r.key, {})]
            ready = sorted((r for r in todo if r.ready(self)), key=lambda r: (r.priority, -r.steps(self), r.key))
            launched = False
            for run in ready:
                if len(running) >= a.jobs:
                    break
                if time.time() + est(run) * a.safety > deadline:
                    continue
                cmd = self.command(run)
                log = (logs / (self.run_dir(run).name + ".log")).open("w")
                running[run.key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                                    run, cmd, time.time(), log)
                launched = True
            if not running and not launched and not self.basis_jobs:
                if todo:
                    left = [r.key for r in todo]
                    print(f"{len(left)} runs not run (deadline or unmet dependencies): {left[:6]}...", flush=True)
                break
            time.sleep(1.0)
        if self.basis_meta:
            bases = self.work / "bases.json"
            old = json.loads(bases.read_text()) if bases.is_file() else {}
            old.update(self.basis_meta)
            bases.write_text(json.dumps(old, indent=1))
            if a.mirror:
                (Path(a.mirror).parent / "bases.json").write_text(json.dumps(old, indent=1))
        done = sum(self.done(r.key) for r in self.runs)
        print(f"{done}/{len(self.runs)} runs done; {failures} failed; wall {time.time() - t_start:.0f} s; "
              f"median rate {statistics.median(rates) if rates else float('nan'):.1f} steps/s per run", flush=True)
        return 1 if failures else 0


def adapter_parameters(file: Path) -> int:
    """Trained adapter tensors in an lrx adapter file, classification head excluded."""
    from safetensors import safe_open

    n = 0
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
            if "classifier" in key or ".edit_" in key or "score" in key:
                continue
            count = 1
            for d in f.get_slice(key).get_shape():
                count *= d
            n += count
    return n


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


# ---- report -----------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_curve(recs: list[dict], index: int) -> tuple[list[int], list[float]]:
    """Mean over runs of history column ``index`` at the steps every run evaluated."""
    steps = sorted(set.intersection(*[{h[0] for h in r["history"]} for r in recs]))
    table = [{h[0]: h[index] for h in r["history"]} for r in recs]
    return steps, [statistics.mean(t[s] for t in table) for s in steps]


def mean_train_loss(recs: list[dict]) -> tuple[list[int], list[float]]:
    steps = sorted(set.intersection(*[{h[0] for h in r["train_loss"]} for r in recs]))
    table = [dict(map(tuple, r["train_loss"])) for r in recs]
    return steps, [statistics.mean(t[s] for t in table) for s in steps]


def first_reaching(steps: list[int], values: list[float], target: float) -> int | None:
    return next((s for s, v in zip(steps, values) if v >= target), None)


def record_setting(rec: dict) -> str:
    """The setting a final trained with (records before ``setting`` was kept: from its overrides)."""
    if "setting" in rec:
        return rec["setting"]
    over = dict(o.split("=", 1) for o in rec.get("overrides", []) if "=" in o)
    lr = f"lr={fmt_lr(float(over['train.lr']))}"
    if rec["method"] == "srlora":
        return f"rt={over['method.r_target']},g={float(over['method.gamma']):g},{lr}"
    return lr


def bracketed(labels: dict[str, list[float]], best: str) -> bool:
    """Whether ``best``'s lr has a tried lr below and above it with the same other settings."""
    head, lr = split_label(best)
    tried = [split_label(lab)[1] for lab in labels if split_label(lab)[0] == head]
    return min(tried) < lr < max(tried)


def build_report(results: list[dict], bases: dict | None = None) -> dict:
    ok = [r for r in results if "value" in r]
    tasks = [t for t in STUDY_TASKS if any(r["task"] == t for r in ok)]
    report: dict = {"tasks": {}, "eigenlorax": {}, "bases": bases or {}}
    for task in tasks:
        metric = TASKS[task][2]
        entry: dict = {"metric": metric, "sweep": {}, "final": {}}
        for r in ok:
            if r["task"] == task and r["phase"] == "sweep":
                entry["sweep"].setdefault(r["method"], {}).setdefault(r["label"], []).append(r["value"])
        picked = {}
        for method, labels in entry["sweep"].items():
            picked[method] = max(labels, key=lambda lab: statistics.mean(labels[lab]))
        entry["picked"] = picked
        entry["bracketed"] = {m: bracketed(entry["sweep"][m], lab) for m, lab in picked.items()}
        finals = {}
        for r in ok:  # only the finals trained at the current pick
            if r["task"] == task and r["phase"] == "final" and record_setting(r) == picked.get(r["method"]):
                finals.setdefault(r["method"], []).append(r)
        lora_final = None
        if "lora" in finals:
            lora_final = statistics.mean(r["value"] for r in finals["lora"])
        for method, recs in sorted(finals.items()):
            recs.sort(key=lambda r: r["seed"])
            values = [r["value"] for r in recs]
            mean, sd = _mean_sd(values)
            steps, dev = mean_curve(recs, 1)
            _, dev_loss = mean_curve(recs, 2)
            tsteps, tloss = mean_train_loss(recs)
            item = {
                "setting": picked.get(method), "seeds": [r["seed"] for r in recs], "dev": values,
                "mean": mean, "sd": sd, "dev_loss": statistics.mean(r["eval_loss"] for r in recs),
                "trainable_parameters": recs[0]["trainable_parameters"],
                "adapter_parameters": recs[0]["adapter_parameters"], "total_steps": recs[0]["steps"],
                "curve": {"steps": steps, "dev_mean": dev, "dev_loss_mean": dev_loss,
                          "train_steps": tsteps, "train_loss_mean": tloss},
                "best_dev_mean_over_curve": max(dev) if dev else None,
            }
            if lora_final is not None:
                item["target"] = lora_final
                item["steps_to_lora_final"] = first_reaching(steps, dev, lora_final)
                item["steps_to_lora_final_per_seed"] = [
                    first_reaching([h[0] for h in r["history"]], [h[1] for h in r["history"]], lora_final)
                    for r in recs
                ]
            entry["final"][method] = item
        report["tasks"][task] = entry
        eig: dict = {}
        for r in ok:
            if r["task"] == task and r["phase"] == "eigen":
                eig.setdefault(r["key"].split("/")[3], []).append(r)
        for cfg, recs in sorted(eig.items()):
            recs.sort(key=lambda r: r["seed"])
            values = [r["value"] for r in recs]
            mean, sd = _mean_sd(values)
            steps, dev = mean_curve(recs, 1)
            item = {"setting": recs[0]["label"], "seeds": [r["seed"] for r in recs], "dev": values, "mean": mean,
                    "sd": sd, "adapter_parameters": recs[0]["adapter_parameters"],
                    "trainable_parameters": recs[0]["trainable_parameters"], "total_steps": recs[0]["steps"],
                    "schedule": next((o.split("=", 1)[1] for o in recs[0].get("overrides", [])
                                      if o.startswith("train.schedule=")), "linear"),
                    "curve": {"steps": steps, "dev_mean": dev}}
            if all("val_value" in r for r in recs):
                item["val"] = [r["val_value"] for r in recs]
                item["lr_reductions"] = [sum(b[1] < a[1] * (1 - 1e-9) for a, b in zip(r["lr"], r["lr"][1:]))
                                         for r in recs]  # the warm-up only raises it
                item["final_lr"] = [r["lr"][-1][1] for r in recs]
            if "lora" in entry["final"]:
                lf = entry["final"]["lora"]
                item["lora_mean"] = lf["mean"]
                item["ratio"] = mean / lf["mean"] if lf["mean"] else None
                item["parameter_share"] = recs[0]["adapter_parameters"] / lf["adapter_parameters"]
                item["steps_to_lora_final"] = first_reaching(steps, dev, lf["mean"])
            eig[cfg] = item
        if eig:
            report["eigenlorax"][task] = eig
    report["runs"] = sorted(results, key=lambda r: r["key"])
    return report


NAMES = {"rte": "RTE (accuracy)", "mrpc": "MRPC (F1)", "stsb": "STS-B (Pearson)", "cola": "CoLA (Matthews)"}


def markdown(report: dict) -> str:
    out = []
    tasks = report["tasks"]
    order = ["lora", "pissa", "srlora"]
    methods = sorted({m for t in tasks.values() for m in [*t["final"], *t["sweep"]]},
                     key=lambda m: order.index(m) if m in order else len(order))
    out.append("Picked settings (best mean validation metric), validation metric at the pick:\n")
    out.append("| task | " + " | ".join(f"`{m}`" for m in methods) + " |")
    out.append("|---|" + "---|" * len(methods))
    for task, e in tasks.items():
        cells = []
        for m in methods:
            lab = e["picked"].get(m)
            cells.append(f"{lab} ({statistics.mean(e['sweep'][m][lab]):.1f})" if lab else "-")
        out.append(f"| {NAMES[task]} | " + " | ".join(cells) + " |")
    out.append("\nDev at the picked settings (mean +- sd over seeds, seeds in brackets):\n")
    out.append("| task | " + " | ".join(f"`{m}`" for m in methods) + " |")
    out.append("|---|" + "---|" * len(methods))
    for task, e in tasks.items():
        cells = [f"{e['final'][m]['mean']:.1f} +- {e['final'][m]['sd']:.1f} [{len(e['final'][m]['seeds'])}]"
                 if m in e["final"] else "-" for m in methods]
        out.append(f"| {NAMES[task]} | " + " | ".join(cells) + " |")
    out.append("\nSteps to reach LoRA's final dev metric (mean curve over seeds; total steps in brackets; "
               "per seed after the slash, - = never):\n")
    out.append("| task | " + " | ".join(f"`{m}`" for m in methods) + " |")
    out.append("|---|" + "---|" * len(methods))
    for task, e in tasks.items():
        cells = []
        for m in methods:
            f = e["final"].get(m)
            if not f or "steps_to_lora_final" not in f:
                cells.append("-")
                continue
            s = f["steps_to_lora_final"]
            per = ", ".join("-" if x is None else str(x) for x in f["steps_to_lora_final_per_seed"])
            cells.append(f"{'never' if s is None else s} [{f['total_steps']}] / {per}")
        out.append(f"| {NAMES[task]} | " + " | ".join(cells) + " |")
    if report["eigenlorax"]:
        cfgs = sorted({c for t in report["eigenlorax"].values() for c in t})
        for cfg in cfgs:
            rows = [(t, e[cfg]) for t, e in report["eigenlorax"].items() if cfg in e]
            out.append(f"\nEigenLoRAx `{cfg}` ({rows[0][1]['setting'].split(':', 1)[1]}), leave-one-out:\n")
            out.append("| held-out task | LoRA (mean over its seeds) | EigenLoRAx (seeds) | ratio | "
                       "adapter params (share of LoRA's) | steps to LoRA final [total] |")
            out.append("|---|---|---|---|---|---|")
            for task, item in rows:
                ratio = f"{item['ratio']:.3f}" if item.get("ratio") is not None else "-"
                share = f"{item['adapter_parameters']:,} ({item.get('parameter_share', float('nan')):.2%})"
                s = item.get("steps_to_lora_final")
                spread = f" +- {item['sd']:.1f}" if len(item["seeds"]) > 1 else ""
                out.append(f"| {NAMES[task]} | {item.get('lora_mean', float('nan')):.1f} | {item['mean']:.1f}{spread} "
                           f"[{len(item['seeds'])}] | {ratio} | {share} | {'never' if s is None else s} "
                           f"[{item['total_steps']}] |")
    return "\n".join(out)


COLORS = {"lora": "C0", "pissa": "C1", "srlora": "C2", "eigenlorax": "C3"}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    fig, axes = plt.subplots(3, len(tasks), figsize=(4.2 * len(tasks), 9.5), squeeze=False)
    for col, task in enumerate(tasks):
        e = report["tasks"][task]
        horizon = max((f["total_steps"] for f in e["final"].values()), default=0)
        for method, f in e["final"].items():
            c = f["curve"]
            axes[0][col].plot(c["steps"], c["dev_mean"], "o-", ms=2.5, color=COLORS[method],
                              label=f"{method} ({f['setting']})")
            axes[1][col].plot(c["steps"], c["dev_loss_mean"], "o-", ms=2.5, color=COLORS[method], label=method)
            axes[2][col].plot(c["train_steps"], c["train_loss_mean"], "-", lw=1, color=COLORS[method], label=method)
        for cfg, item in report["eigenlorax"].get(task, {}).items():
            c = item["curve"]
            keep = [(s, v) for s, v in zip(c["steps"], c["dev_mean"]) if s <= 3 * horizon]
            if keep:
                axes[0][col].plot(*zip(*keep), "--", lw=1, color=COLORS["eigenlorax"] if cfg == "official" else "C4",
                                  label=f"eigenlorax {cfg}")
        if "lora" in e["final"]:
            axes[0][col].axhline(e["final"]["lora"]["mean"], color="0.5", lw=0.8, ls=":")
        # Zoom past the first steps (STS-B starts far below where the methods differ).
        late = [v for f in e["final"].values() for st, v in zip(f["curve"]["steps"], f["curve"]["dev_mean"])
                if st >= 0.25 * horizon]
        if late:
            axes[0][col].set_ylim(bottom=min(late) - 0.1 * (max(late) - min(late) + 1))
        for row, key, steps_key in ((1, "dev_loss_mean", "steps"), (2, "train_loss_mean", "train_steps")):
            late = [v for f in e["final"].values() for st, v in zip(f["curve"][steps_key], f["curve"][key])
                    if st >= 0.1 * horizon]
            if late:
                axes[row][col].set_ylim(top=max(late) + 0.1 * (max(late) - min(late) + 1e-3))
        axes[0][col].set_title(f"{NAMES[task]}")
        axes[0][col].set_ylabel("dev metric (x100, mean over seeds)")
        axes[1][col].set_ylabel("dev loss")
        axes[2][col].set_ylabel("train loss")
        axes[2][col].set_xlabel("optimizer step")
        axes[0][col].legend(fontsize=7)
    fig.suptitle("MiniLM-L6, r=8 on query/value, lr picked per method on a 10 % validation split; "
                 "dotted: LoRA's final dev mean")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- CLI --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
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
    p = sub.add_parser("report", help="JSON, markdown tables and plot from --results")
    p.add_argument("--results", nargs="+", default=["runs/glue-study-runs.jsonl"],
                   help="results JSONL files of run, or a report JSON written before (its runs are read)")
    p.add_argument("--bases", default=None, help="bases.json written by run")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--meta", default=None, help="JSON merged into the report's 'setup'")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return train_with_dev(argv[1:])
    args = parser.parse_args(argv)

    if args.cmd == "report":
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

    if not Path(args.glue_dir).is_dir():
        parser.error(f"--glue-dir {args.glue_dir} is not a folder")
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
