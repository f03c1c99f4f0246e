"""Import direction (docs/ARCHITECTURE.md, "Layers"): methods are pure torch, distributed knows no method names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from lrx.methods import available_methods
from tests.conftest import REPO


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def offending(folder: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((REPO / "lrx" / folder).rglob("*.py")):
        for name in imports(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


def test_methods_import_no_distribution_or_trainer():
    banned = ("torch.distributed", "deepspeed", "lrx.distributed", "lrx.trainer", "lrx.runner", "accelerate")
    assert offending("methods", banned) == []


def test_distributed_knows_no_method_names():
    banned = tuple(f"lrx.methods.{m}" for m in available_methods())
    assert offending("distributed", banned) == []


def test_trainer_and_runner_never_branch_on_method_names():
    for module in ("trainer.py", "runner.py", "cli.py", "adapter.py"):
        source = (REPO / "lrx" / module).read_text()
        for name in available_methods():
            assert f'"{name}"' not in source and f"'{name}'" not in source, f"{module} mentions {name!r}"


def sources(folder: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "lrx" / folder).rglob("*.py"))
            if p.name not in skip}


def mentions(files: dict[str, str], names: tuple[str, ...]) -> list[str]:
    return [f"{path} mentions {name}" for path, text in files.items() for name in names if name in text]


def test_methods_do_not_know_where_backends_keep_things():
    """Methods say what to change through the seam (lrx/methods/seam.py); DTensors, ZeRO-3's
    partitions and masters, and the row arithmetic of one backend stay behind it."""
    layouts = ("ds_shape", "ds_tensor", "ds_numel", "DTensor", "to_local", "full_tensor", "_z3_optimizer",
               "fsdp_row_range", "zero3_flat_range", ".pieces(", ".replicas(")
    assert mentions(sources("methods", skip=("seam.py",)), layouts) == []
    assert mentions({"lrx/adapter.py": (REPO / "lrx" / "adapter.py").read_text()}, layouts) == []


def test_backends_do_not_know_method_internals():
    """Backends build models through LayerSetup callbacks, not by inspecting adapted layers."""
    internals = ("AdaptedLinear", "restore_buffers", "adapter_params", "init_layer", "_lrx_initialised",
                 '".base"', "'base'", '"base"', "lora_A", "lora_B")
    assert mentions(sources("distributed"), internals) == []


def test_nothing_probes_a_backend_or_reads_test_switches():
    files = {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "lrx").rglob("*.py"))}
    assert mentions(files, ("hasattr(backend", "LRX_KILL_AT_STEP", "LOG_PRODUCT =", "supports_sharding")) == []


# ---- the edit log is a part of its own (issue 24) ------------------------------------------------


def test_the_adapted_layer_leaves_its_edit_log_to_the_log():
    """Where the log lives (device, pinned host memory, rows under FSDP2) is decided once
    (``log_storage``, which the dry run's plan uses too) and known only to
    ``lrx/methods/editlog.py``: the adapted layers do not branch on it, nothing outside the log
    reads its tensors by the layer's old names, and no storage deletes or renames a layer's
    tensors."""
    from lrx.methods.layer import AdaptedLinear

    public = sorted(n for n in vars(AdaptedLinear) if not n.startswith("_"))
    assert len(public) <= 16, public
    storages = ("row_log", "host_log", "RowLog", "HostLog", "edit_U", "edit_V", "_pending", '"rows"', '"host"',
                "storage ==", "storage !=")
    layers = {p: (REPO / p).read_text() for p in ("lrx/methods/layer.py", "lrx/methods/experts.py")}
    assert mentions(layers, storages) == []
    library = {p: t for p, t in sources("").items() if not p.endswith("methods/editlog.py")}
    old = ("hold_log_rows", "offload_edit_log", "edit_log_storage", ".row_log", ".host_log", "edit_Vt", "edit_factors(")
    assert mentions(library, old) == []
    # The layer's log tensors by their old names (files keep the keys ``{name}.edit_U``: no word before the dot).
    reads = re.compile(r"(?<=\w)(?<!edit_log)\.(edit_U|edit_V|edit_rank|edit_sizes|baked|live_rank)\b")
    assert [f"{p}: {m.group(0)}" for p, t in library.items() for m in reads.finditer(t)] == []
    # Nor do the test scripts and tools (those launched in subprocesses fail only when they run).
    scripts = {str(p.relative_to(REPO)): p.read_text() for folder in ("tests", "tools")
               for p in sorted((REPO / folder).glob("*.py")) if p.name != "test_layering.py"}
    assert mentions(scripts, ("hold_log_rows(", "offload_edit_log(", "edit_factors(", ".live_rank", ".edit_log_storage")) == []
    editlog = (REPO / "lrx" / "methods" / "editlog.py").read_text()
    assert mentions({"lrx/methods/editlog.py": editlog}, ("_buffers[", "_parameters[", "del ")) == []
    assert "log_storage(" in (REPO / "lrx" / "plan.py").read_text()
    plan = (REPO / "lrx" / "plan.py").read_text()
    assert mentions({"lrx/plan.py": plan}, ("row_log = backend", "offload = not row_log")) == []


# ---- tools and tests use the library as users do (issue 24) --------------------------------------

TOOLS = REPO / "tools"
# A tool's own tests may import it; nothing else in tests/ imports tools/ (what tests need of a
# benchmark, such as lrx.fidelity's fusion measurement, is library code).
TOOL_TESTS = {"tests/test_glue_study.py": {"tools", "tools.glue_study", "tools.minilm_pack"},
              "tests/test_families.py": {"tools", "tools.family_table"},  # the table the tool writes is true
              "tests/dist_srlora.py": {"tools", "tools.family_table"}}  # its sharded cells, in a shared launch


def test_tools_put_nothing_on_sys_path():
    """tools/setup.sh installs lrx; a script that puts the repository on sys.path would run
    another lrx than the installed one, and hide a missing install."""
    shim = re.compile(r"sys\.path\s*(\.(insert|append|extend)\b|\[|\+?=)")
    found = [f"{p.relative_to(REPO)}:{n}" for p in sorted(TOOLS.iterdir()) if p.suffix in (".py", ".sh")
             for n, line in enumerate(p.read_text().splitlines(), 1) if shim.search(line)]
    assert found == []
    ignores = (REPO / "pyproject.toml").read_text()
    assert not re.search(r'"tools/[^"]*"\s*=\s*\[[^\]]*"E402"', ignores), "tools need no import-order exemption"


def test_tests_and_the_library_import_no_tool():
    bad = [f"{p.relative_to(REPO)} imports {name}" for p in sorted((REPO / "tests").glob("*.py"))
           for name in sorted(imports(p)) if (name == "tools" or name.startswith("tools."))
           and name not in TOOL_TESTS.get(str(p.relative_to(REPO)), ())]
    assert bad == []
    assert offending(".", ("tools", "tests")) == []


def test_tools_replace_no_class_of_the_library():
    """A tool adds to a run through arguments (``cli.train_main(argv, callbacks=...)``), not by
    swapping the library's classes (``runner.Trainer = ...``)."""
    swap = re.compile(r"\b(lrx|cli|runner|trainer|checkpoint|zero3|fsdp2)\.[A-Z]\w*\s*=(?!=)")
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in sorted(TOOLS.glob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if swap.search(line)]
    assert found == []


# ---- one save path (issue 24, item 2) ---------------------------------------------------------


def attribute_root(node: ast.AST) -> str | None:
    """The name an attribute chain starts from (``trainer`` for ``trainer.sampler.start``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_the_checkpoint_manager_only_saves_and_loads_parts():
    """``CheckpointManager`` hands the trainer its state (``Trainer.load_state_dict``); it writes
    none of the trainer's attributes itself."""
    tree = ast.parse((REPO / "lrx" / "checkpoint.py").read_text())
    written = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(t, (ast.Attribute, ast.Subscript)) and attribute_root(t) in ("trainer", "t"):
                    written.append(f"line {t.lineno}: {ast.unparse(t)}")
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr":
            written.append(f"line {node.lineno}: setattr")
    assert written == []


def calls(path: Path, function: str | None = None) -> list[str]:
    """The called names (``checkpoints.load``, ``save_adapter``) in a file, or in one of its functions."""
    tree = ast.parse(path.read_text())
    if function is not None:
        tree = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    return [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_a_run_resumes_from_one_place_and_saves_through_the_manager():
    """``runner._run`` resumes with one call (the manager's ``load``; the build restores the
    adapter it is handed) and saves the final adapter as the manager's final mode; the runner,
    the Python API and the manager write adapters through one function."""
    runner = calls(REPO / "lrx" / "runner.py")
    resume = re.compile(r"(restore|rewind|confirm|load_state_dict|load_optimizer_state|set_rng_state)")
    assert [c for c in runner if resume.search(c)] == []
    assert calls(REPO / "lrx" / "runner.py", "_run").count("checkpoints.load") == 1
    assert "checkpoints.save" in calls(REPO / "lrx" / "runner.py", "_run")
    for module in ("runner.py", "api.py", "hf.py", "trainer.py"):
        found = [c for c in calls(REPO / "lrx" / module) if c in ("save_adapter", "edit_logs", "export_peft_from_adapter")]
        assert found == [], f"{module} writes an adapter itself: {found}"
    manager = calls(REPO / "lrx" / "checkpoint.py")
    assert manager.count("save_adapter") == 1 and manager.count("edit_logs") == 1


def test_the_loop_and_its_checkpoints_stay_in_bounds():
    """Every file of the library: at most 450 lines a file, 60 a function (the trainer, the
    checkpoint manager and the runner were the first to pass them)."""
    for path in sorted((REPO / "lrx").rglob("*.py")):
        module = str(path.relative_to(REPO))
        assert len(path.read_text().splitlines()) <= 450, module
        long = [f"{n.name}: {n.end_lineno - n.lineno + 1}" for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
        assert long == [], f"{module}: {long}"


def _module_imports() -> dict[str, set[str]]:
    """lrx's top-level modules (``lrx/x.py`` or the package ``lrx/x/``) and the others each imports,
    at any depth of its files and inside functions too; imports under ``if TYPE_CHECKING:`` are
    annotations only and do not count."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "lrx").rglob("*.py")):
        me = path.relative_to(REPO / "lrx").parts[0].removesuffix(".py")
        if me in ("__init__", "__main__"):
            continue
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and ast.unparse(node.test).endswith("TYPE_CHECKING") for n in ast.walk(node)}
        found = graph.setdefault(me, set())
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lrx":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lrx."))
        found.discard(me)
    return {m: {t for t in deps if t in graph or (REPO / "lrx" / f"{t}.py").exists()} for m, deps in graph.items()}


def test_imports_between_modules_point_one_way():
    """No two top-level modules of lrx import each other, directly or through others (the
    architecture's layers are a strict order): the Python API sits above the merged export
    that uses it, so the merge both need lives below both (``lrx.merge``)."""
    import graphlib

    graph = _module_imports()
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f"modules importing each other: {' -> '.join(e.args[1])}") from None


# ---- backends report facts; one build path (issue 24, item 3) ------------------------------------

BACKEND_NAMES = ("single", "fsdp2", "zero3")
ROLE_MEMBERS = 9  # the most members one role of the Backend protocol may have


def _members(cls: ast.ClassDef) -> list[str]:
    """Public members a protocol class declares: annotated attributes and methods."""
    names = [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    names += [n.name for n in cls.body if isinstance(n, ast.FunctionDef)]
    return [n for n in names if not n.startswith("_")]


def test_the_backend_protocol_is_a_few_small_roles():
    """``Backend`` is its roles (placement, step, collectives, state I/O) and declares nothing of
    its own; no role grows past ROLE_MEMBERS members (the protocol had 22 in one class)."""
    tree = ast.parse((REPO / "lrx" / "distributed" / "protocol.py").read_text())
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    backend = classes["Backend"]
    roles = [b.id for b in backend.bases if isinstance(b, ast.Name) and b.id != "Protocol"]
    assert sorted(roles) == ["Collectives", "ModelPlacement", "StateIO", "TrainStep"]
    assert _members(backend) == []
    sizes = {role: len(_members(classes[role])) for role in roles}
    assert all(0 < n <= ROLE_MEMBERS for n in sizes.values()), sizes


def test_plans_and_files_ask_backends_for_facts_not_names():
    """What a plan, the build and the adapter files need of a backend comes from its ``Layout``
    (shard size, rows held, whether rows split); none of them compares backend names."""
    for module in ("plan.py", "export.py", "adapter.py", "build.py", "api.py"):
        source = (REPO / "lrx" / module).read_text()
        found = [n for n in BACKEND_NAMES if f'"{n}"' in source or f"'{n}'" in source]
        assert found == [], f"{module} names backends {found}"
        assert "backend_name" not in source, f"{module} resolves backend names itself"


def test_models_are_built_in_one_place():
    """The order "initialise or restore, quantize, place the log" is written once, in
    ``lrx.build.Adapters`` (which every backend's build and every one-process build calls)."""
    steps = (".init_layer(", ".restore_layer(", ".place_log(", ".quantize_base(", "quantizer.apply(")
    files = {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "lrx").rglob("*.py"))}
    allowed = {"lrx/build.py", "lrx/quant.py"}  # the Quantizer reaches a layer through quantize_base
    # (a method placing one layer's log calls the layer's own ``layer.place_log``: the log part's switch)
    found = [f"{path} calls {step}" for path, text in files.items() if path not in allowed
             for step in steps if step in text.replace("layer.place_log(", "")]
    assert found == []
    method = ast.parse((REPO / "lrx" / "methods" / "base.py").read_text())
    cls = next(c for c in method.body if isinstance(c, ast.ClassDef) and c.name == "Method")
    assert not {"apply", "locate"} & {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def test_importing_lrx_loads_the_api_on_first_use():
    """``import lrx`` (and light modules such as ``lrx.stop``) load no transformers: the public API
    comes from ``lrx.api`` when first used (every launched process pays ~3 s of CPU otherwise)."""
    import subprocess
    import sys

    import lrx
    from lrx import api

    assert (lrx.Adapter, lrx.load, lrx.method_config, lrx.wrap) == (api.Adapter, api.load, api.method_config, api.wrap)
    code = ("import sys, lrx, lrx.stop, lrx.faults; assert 'transformers' not in sys.modules, 'eager'; "
            "assert set(lrx.__all__) <= set(dir(lrx)); print(lrx.__version__)")  # lrx.wrap itself: tests/test_hf.py
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "0.1.0", proc.stderr[-2000:]
