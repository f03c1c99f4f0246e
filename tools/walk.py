"""Walk one config value and one SRLoRA event through a tiny run (issue 24, "Measure and report").

    python tools/walk.py [--json FILE] [--show]

Runs one single-process training run in this process, as ``launch/train.py`` would
(``lrx.cli.train_main``): tiny-llama, the quick-start data, SRLoRA with r=4, r_target=6,
gamma=0.5 (one recomposition event), 6 steps, a checkpoint every 3 steps, on the CPU, into a
temporary folder. A profiler (``sys.setprofile``) watches every Python call while it runs and
prints two walks:

**config**: from ``lrx.runner.run(config)`` on, the calls of functions defined in ``lrx/``
that receive the run's ``RunConfig`` object, or one of its sections (``config.model``,
``config.data``, ``config.method``, ``config.train``, ``config.distributed``,
``config.logging``: the very objects, by identity), or a dict ``RunConfig.to_dict`` returned
(the config as data, e.g. for the checkpoint's comparison), as an argument (positional,
keyword, ``*args`` or ``**kwargs``). The objects' own methods (the value only as ``self``:
properties such as ``SRLoRAConfig.swap``, ``to_dict``) are not stops.

**event**: from the first call of ``SRLoRA.recompose`` (the event's entry point, called by
``after_optimizer_step``) until it returns, every call of a function defined in ``lrx/``.

For each walk:

- *stops*: the calls counted (comprehensions, generator expressions and lambdas not counted;
  a generator counts once per resume);
- *places*: distinct functions among the stops (module and qualified name);
- *returns*: stops that hand a value back to their caller (return something other than None):
  a result the reader has to carry back up;
- *climbs*: stops called from a module of ``lrx`` that lies below the callee's module in the
  import direction (``tests/test_layering.py``, docs/ARCHITECTURE.md "Layers"): the callee's
  module imports the caller's module, directly or through others, and not the other way
  round (any ``import`` statement in the file counts, also those inside functions; modules
  that import each other are one layer). A call against the import direction is a callback:
  a backend calling ``build.py``'s ``LayerSetup``, a method calling the trainer back;
- *entries per file*: stops whose nearest enclosing stop (the walk's previous step down) is
  in another file, or that have none; the walk's first stop enters its file once.

Numbers vary with the code, not between runs of the same code (one process, fixed seed).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import lrx
from lrx import cli
from lrx.config import QUICKSTART, SECTIONS, RunConfig
from lrx.methods.srlora import SRLoRA
from lrx.runner import run as runner_run

LRX = Path(lrx.__file__).resolve().parent
SETTINGS = [
    "--method", "srlora", "model.name_or_path=tiny-llama", "data.format=instruct",
    f"data.train_path={QUICKSTART / 'train.jsonl'}", f"data.eval_path={QUICKSTART / 'eval.jsonl'}",
    "data.max_train_samples=24", "data.max_eval_samples=8", "data.max_length=64",
    "method.r=4", "method.r_target=6", "method.gamma=0.5",
    "train.max_steps=6", "train.save_every=3", "train.batch_size=4", "train.log_every=2", "train.lr=1e-3",
    "train.device=cpu", "logging.progress=false", "logging.tensorboard=false",
]


def module_name(path: Path) -> str:
    parts = list(path.resolve().relative_to(LRX.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_closure() -> dict[str, set[str]]:
    """For every module of lrx: the lrx modules it imports, directly or through others."""
    paths = {module_name(p): p for p in LRX.rglob("*.py")}
    direct: dict[str, set[str]] = {}
    for mod, path in paths.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                names.add(base)
                names.update(f"{base}.{a.name}" for a in node.names)
        direct[mod] = {n for n in names if n in paths and n != mod}
    closure = {}
    for mod in direct:
        seen, todo = set(), list(direct[mod])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(direct[m])
        closure[mod] = seen - {mod}
    return closure


class Walk:
    """The stops of one walk: who called whom, what came back."""

    def __init__(self, name: str, imports: dict[str, set[str]]):
        self.name, self.imports = name, imports
        self.stops: list[dict] = []
        self.open: list[tuple[object, dict]] = []  # (frame, stop) of the stops not returned yet

    def enter(self, frame, module: str, caller: str | None) -> None:
        parent = self.open[-1][1] if self.open else None
        stop = {"place": f"{module}:{frame.f_code.co_qualname}", "file": frame.f_code.co_filename,
                "entered": parent is None or parent["file"] != frame.f_code.co_filename,
                "climb": caller is not None and caller in self.imports.get(module, ())
                and module not in self.imports.get(caller, ()),
                "caller": caller, "returned": False}
        self.stops.append(stop)
        self.open.append((frame, stop))

    def leave(self, frame, value) -> bool:
        """Close the stop of ``frame`` (if it is one); True when it was the walk's first stop."""
        if not self.open or self.open[-1][0] is not frame:
            return False
        _, stop = self.open.pop()
        stop["returned"] = value is not None
        return not self.open

    def summary(self) -> dict:
        entries = Counter(Path(s["file"]).relative_to(LRX.parent).as_posix() for s in self.stops if s["entered"])
        return {"stops": len(self.stops), "places": len({s["place"] for s in self.stops}),
                "returns": sum(s["returned"] for s in self.stops), "climbs": sum(s["climb"] for s in self.stops),
                "climbs_from_to": sorted({f"{s['caller']} -> {s['place']}" for s in self.stops if s["climb"]}),
                "calls_between_modules": dict(Counter(f"{s['caller']} -> {s['place'].partition(':')[0]}" for s in self.stops
                                                      if s["caller"] and s["caller"] != s["place"].partition(":")[0])),
                "entries_per_file": dict(entries.most_common()),
                "max_entries": max(entries.values(), default=0),
                "places_list": sorted(Counter(s["place"] for s in self.stops).items())}


class Tracer:
    """The profile function: starts the config walk at ``runner.run``, the event walk at the
    first ``SRLoRA.recompose``."""

    def __init__(self):
        self.imports = import_closure()
        self.config = Walk("config", self.imports)
        self.event = Walk("event", self.imports)
        self.watched: set[int] = set()  # ids of the RunConfig and its sections
        self.keep: list = []  # the watched objects, so that their ids stay theirs
        self.in_event = False
        self.event_done = False
        self.modules: dict[object, str | None] = {}  # code object -> lrx module (None: not lrx)

    def module_of(self, code) -> str | None:
        if code not in self.modules:
            path = Path(code.co_filename)
            inside = code.co_filename.startswith(str(LRX)) and not code.co_name.startswith("<")
            self.modules[code] = module_name(path) if inside else None
        return self.modules[code]

    def takes_config(self, frame) -> bool:
        code = frame.f_code
        n = code.co_argcount + code.co_kwonlyargcount
        names = list(code.co_varnames[: n + bool(code.co_flags & 4) + bool(code.co_flags & 8)])
        local = frame.f_locals
        for name in names:
            if name == "self":  # the value's own methods are its definition, not a place it is passed to
                continue
            value = local.get(name)
            values = [value, *(value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else ())]
            if any(id(v) in self.watched for v in values):  # the value itself, or one of *args / **kwargs
                return True
        return False

    def __call__(self, frame, event: str, arg) -> None:
        if event == "call":
            self.on_call(frame)
        elif event == "return":
            if frame.f_code is TO_DICT and id(frame.f_locals.get("self")) in self.watched and isinstance(arg, dict):
                self.keep.append(arg)
                self.watched.add(id(arg))
            self.config.leave(frame, arg)
            if self.in_event and self.event.leave(frame, arg):
                self.in_event, self.event_done = False, True

    def on_call(self, frame) -> None:
        module = self.module_of(frame.f_code)
        if module is None:
            return
        if frame.f_code is runner_run.__code__ and not self.watched:
            config = frame.f_locals["config"]
            self.keep = [config, *(getattr(config, s) for s in SECTIONS)]
            self.watched = {id(o) for o in self.keep}
        if frame.f_code is RECOMPOSE and not self.event_done:
            self.in_event = True
        caller = self.module_of(frame.f_back.f_code) if frame.f_back is not None else None
        if self.in_event:
            self.event.enter(frame, module, caller)
        if self.watched and self.takes_config(frame):
            self.config.enter(frame, module, caller)


TO_DICT = RunConfig.to_dict.__code__
RECOMPOSE = getattr(SRLoRA.recompose, "__wrapped__", SRLoRA.recompose).__code__  # under @torch.no_grad()


def walk(extra: list[str]) -> dict:
    """Run the tiny training run under the tracer; the two walks' summaries."""
    tracer = Tracer()
    with tempfile.TemporaryDirectory() as tmp:
        sys.setprofile(tracer)
        try:
            code = cli.train_main([*SETTINGS, f"logging.output_dir={tmp}/run", *extra])
        finally:
            sys.setprofile(None)
    if code != 0:
        raise SystemExit(f"the traced run failed (exit status {code}); see its output above")
    if not tracer.event.stops:
        raise SystemExit("the traced run had no SRLoRA event; its settings must allow one (method.r_target > method.r)")
    return {"config": tracer.config.summary(), "event": tracer.event.summary()}


def show(name: str, s: dict, details: bool) -> None:
    print(f"{name}: {s['stops']} stops in {s['places']} places, {s['climbs']} climbs back up, {s['returns']} returns; "
          f"most entries of one file: {s['max_entries']}")
    print("  entries per file: " + ", ".join(f"{f} {n}" for f, n in s["entries_per_file"].items()))
    if details:
        for item in s["climbs_from_to"]:
            print(f"  climb: {item}")
        for place, n in s["places_list"]:
            print(f"  {n:3d} x {place}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write both walks here")
    parser.add_argument("--show", action="store_true", help="list the climbs and every place with its stops")
    parser.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE added to the run's settings")
    args = parser.parse_args(argv)
    result = walk(args.overrides)
    for name in ("config", "event"):
        show(name, result[name], args.show)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
