"""GLUE study, the plan (``tools/glue_study.py``): the validation split, the runs and their
settings, the lr ladder and the EigenLoRAx recipes."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if __package__:  # imported as tools.glue_study_plan (by its tests, from the repository root)
    from tools.glue_bench import TASKS
else:  # python tools/glue_study.py: this folder is the first on sys.path
    from glue_bench import TASKS

if TYPE_CHECKING:
    from tools.glue_study_runs import Study

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


def plan_runs(a) -> tuple[list[Run], set[str]]:
    """Every run of the study (``run``'s arguments ``a``) and the keys ``--only`` lets launch
    (the plan keeps every run for the dependencies)."""
    runs = sweep_and_final_runs(a)
    if a.eigen_configs:
        runs += source_runs(a) + eigen_runs(a)
    allowed = {r.key for r in runs if not a.only or any(fnmatch.fnmatch(r.key, p) for p in a.only)}
    return runs, allowed


def sweep_and_final_runs(a) -> list[Run]:
    srl = [(int(x.split(":")[0]), float(x.split(":")[1])) for x in a.srlora_settings]
    runs: list[Run] = []
    for task in a.tasks:
        epochs = a.epochs or TASKS[task][1]
        for method in a.methods:
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
    return runs


def source_runs(a) -> list[Run]:
    """The extra LoRA adapters the EigenLoRAx bases are built from (per task, and on WNLI)."""
    runs: list[Run] = []
    for task in a.tasks:
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
    return runs


def eigen_runs(a) -> list[Run]:
    runs: list[Run] = []
    for index, cfg in enumerate(map(parse_eigen, a.eigen_configs)):
        for held in a.tasks:
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
    return runs
