"""GLUE study, the report (``tools/glue_study.py report``): picks, finals over seeds, steps to
LoRA's final, the EigenLoRAx ratios; the markdown tables and the convergence plot."""

from __future__ import annotations

import statistics
from pathlib import Path

if __package__:  # imported as tools.glue_study_report (by its tests, from the repository root)
    from tools.glue_bench import TASKS
    from tools.glue_study_plan import STUDY_TASKS, fmt_lr, split_label
else:  # python tools/glue_study.py: this folder is the first on sys.path
    from glue_bench import TASKS
    from glue_study_plan import STUDY_TASKS, fmt_lr, split_label


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
        report["tasks"][task] = entry = task_entry(task, ok)
        eig = eigen_entry(task, ok, entry)
        if eig:
            report["eigenlorax"][task] = eig
    report["runs"] = sorted(results, key=lambda r: r["key"])
    return report


def task_entry(task: str, ok: list[dict]) -> dict:
    """One task's sweep, picks and the finals trained at the current pick."""
    entry: dict = {"metric": TASKS[task][2], "sweep": {}, "final": {}}
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
        entry["final"][method] = final_item(recs, picked.get(method), lora_final)
    return entry


def final_item(recs: list[dict], setting: str | None, lora_final: float | None) -> dict:
    recs.sort(key=lambda r: r["seed"])
    values = [r["value"] for r in recs]
    mean, sd = _mean_sd(values)
    steps, dev = mean_curve(recs, 1)
    _, dev_loss = mean_curve(recs, 2)
    tsteps, tloss = mean_train_loss(recs)
    item = {
        "setting": setting, "seeds": [r["seed"] for r in recs], "dev": values,
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
    return item


def eigen_entry(task: str, ok: list[dict], entry: dict) -> dict:
    """The EigenLoRAx runs held out on ``task``, per recipe, against the task's lora final."""
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
    return eig


NAMES = {"rte": "RTE (accuracy)", "mrpc": "MRPC (F1)", "stsb": "STS-B (Pearson)", "cola": "CoLA (Matthews)"}


def _method_header(methods: list[str]) -> list[str]:
    """The head of a markdown table with a row per task and a column per method."""
    return ["| task | " + " | ".join(f"`{m}`" for m in methods) + " |", "|---|" + "---|" * len(methods)]


def markdown(report: dict) -> str:
    out = []
    tasks = report["tasks"]
    order = ["lora", "pissa", "srlora"]
    methods = sorted({m for t in tasks.values() for m in [*t["final"], *t["sweep"]]},
                     key=lambda m: order.index(m) if m in order else len(order))
    out.append("Picked settings (best mean validation metric), validation metric at the pick:\n")
    out.extend(_method_header(methods))
    for task, e in tasks.items():
        cells = []
        for m in methods:
            lab = e["picked"].get(m)
            cells.append(f"{lab} ({statistics.mean(e['sweep'][m][lab]):.1f})" if lab else "-")
        out.append(f"| {NAMES[task]} | " + " | ".join(cells) + " |")
    out.append("\nDev at the picked settings (mean +- sd over seeds, seeds in brackets):\n")
    out.extend(_method_header(methods))
    for task, e in tasks.items():
        cells = [f"{e['final'][m]['mean']:.1f} +- {e['final'][m]['sd']:.1f} [{len(e['final'][m]['seeds'])}]"
                 if m in e["final"] else "-" for m in methods]
        out.append(f"| {NAMES[task]} | " + " | ".join(cells) + " |")
    out.append("\nSteps to reach LoRA's final dev metric (mean curve over seeds; total steps in brackets; "
               "per seed after the slash, - = never):\n")
    out.extend(_method_header(methods))
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
