"""GLUE study, the runs (``tools/glue_study.py``): what is done, what each run's command is,
the EigenLoRAx bases built in the background, and the launcher that keeps ``--jobs`` running."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__:  # imported as tools.glue_study_runs (by its tests, from the repository root)
    from tools.glue_bench import TASKS
    from tools.glue_study_plan import DEV_METRICS, REPO, SOURCE_TASK, EigenConfig, Run, bracket_step, fmt_lr, parse_eigen, plan_runs, split_label
else:  # python tools/glue_study.py: this folder is the first on sys.path
    from glue_bench import TASKS
    from glue_study_plan import DEV_METRICS, REPO, SOURCE_TASK, EigenConfig, Run, bracket_step, fmt_lr, parse_eigen, plan_runs, split_label


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
        self.runs, self.allowed = plan_runs(self.args)
        self.by_key = {r.key: r for r in self.runs}
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
        """Launch what is pending as dependencies, ``--jobs`` and ``--deadline`` allow, until
        nothing is left to launch; 1 if a run failed."""
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
        self.rates: list[float] = []
        self.failures = 0
        while True:
            self.collect(running, results_path, t_start)
            self.try_bases()
            if time.time() > deadline:
                self.kill_all(running)
                break
            todo = [r for r in self.pending() if r.key not in running and "error" not in self.results.get(r.key, {})]
            launched = self.launch(todo, running, deadline)
            if not running and not launched and not self.basis_jobs:
                if todo:
                    left = [r.key for r in todo]
                    print(f"{len(left)} runs not run (deadline or unmet dependencies): {left[:6]}...", flush=True)
                break
            time.sleep(1.0)
        self.write_bases()
        done = sum(self.done(r.key) for r in self.runs)
        rate = statistics.median(self.rates) if self.rates else float("nan")
        print(f"{done}/{len(self.runs)} runs done; {self.failures} failed; wall {time.time() - t_start:.0f} s; "
              f"median rate {rate:.1f} steps/s per run", flush=True)
        return 1 if self.failures else 0

    def collect(self, running: dict, results_path: Path, t_start: float) -> None:
        """Record the runs that ended (a failure's last log lines; a success's record, appended
        to ``--results``)."""
        a = self.args
        for key, (proc, run, cmd, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            wall = time.time() - t0
            del running[key]
            if proc.returncode != 0:
                self.failures += 1
                tail = "\n".join(Path(log.name).read_text().strip().splitlines()[-8:])
                print(f"[{key}] FAILED ({wall:.0f} s):\n{tail}", flush=True)
                self.results[key] = {"key": key, "error": tail}
                continue
            rec = self.record(run, cmd, wall)
            self.rates.append(rec["steps"] / max(wall - a.startup, 1.0))
            self.results[key] = rec
            with results_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if a.mirror:
                Path(a.mirror).write_text(results_path.read_text())
            print(f"[{key}] {rec['metric']} {rec['value']:.2f} steps {rec['steps']} ({wall:.0f} s, "
                  f"{len(running)} running, t={time.time() - t_start:.0f} s)", flush=True)
            for added in self.extend_sweeps():
                print(f"[bracket] {added}", flush=True)

    def kill_all(self, running: dict) -> None:
        for key, (proc, *_) in running.items():
            proc.kill()
            print(f"[{key}] killed at the deadline", flush=True)
        for out, (proc, *_) in self.basis_jobs.items():
            proc.kill()
            print(f"[basis] {Path(out).name} killed at the deadline", flush=True)

    def launch(self, todo: list[Run], running: dict, deadline: float) -> bool:
        """Start the ready runs (priority, then longest first) that fit ``--jobs`` and the deadline."""
        a = self.args
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        rate = statistics.median(self.rates) if self.rates else a.rate
        ready = sorted((r for r in todo if r.ready(self)), key=lambda r: (r.priority, -r.steps(self), r.key))
        launched = False
        for run in ready:
            if len(running) >= a.jobs:
                break
            if time.time() + (a.startup + run.steps(self) / rate) * a.safety > deadline:
                continue
            cmd = self.command(run)
            log = (logs / (self.run_dir(run).name + ".log")).open("w")
            running[run.key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                                run, cmd, time.time(), log)
            launched = True
        return launched

    def write_bases(self) -> None:
        if self.basis_meta:
            bases = self.work / "bases.json"
            old = json.loads(bases.read_text()) if bases.is_file() else {}
            old.update(self.basis_meta)
            bases.write_text(json.dumps(old, indent=1))
            if self.args.mirror:
                (Path(self.args.mirror).parent / "bases.json").write_text(json.dumps(old, indent=1))


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
