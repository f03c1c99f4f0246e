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


# ---- tools and tests use the library as users do (issue 24) --------------------------------------

TOOLS = REPO / "tools"
# A tool's own tests may import it; nothing else in tests/ imports tools/ (what tests need of a
# benchmark, such as lrx.fidelity's fusion measurement, is library code).
TOOL_TESTS = {"tests/test_glue_study.py": {"tools", "tools.glue_study", "tools.minilm_pack"},
              "tests/test_families.py": {"tools", "tools.family_table"}}  # the table the tool writes is true


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
    found = [f"{path} calls {step}" for path, text in files.items() if path not in allowed
             for step in steps if step in text]
    assert found == []
    method = ast.parse((REPO / "lrx" / "methods" / "base.py").read_text())
    cls = next(c for c in method.body if isinstance(c, ast.ClassDef) and c.name == "Method")
    assert not {"apply", "locate"} & {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
