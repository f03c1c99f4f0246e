"""Shared fixtures: tiny random models, the GLUE folder beside the repo."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lrx.models import tiny_config

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
QUICKSTART = REPO / "configs" / "data" / "quickstart"


def tiny_model(kind: str, vocab: int = 128, seed: int = 0, dtype=torch.float32):
    """A tiny random Llama (causal LM) or BERT (2-label classifier) in eval mode."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = AutoModelForCausalLM.from_config(tiny_config("tiny-llama", vocab))
    else:
        config = tiny_config("tiny-bert", vocab)
        config.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(config)
    return model.to(dtype).eval()


@pytest.fixture
def glue_dir() -> Path:
    if not GLUE.is_dir():
        pytest.skip(f"GLUE files not found at {GLUE} (../shared/data/glue beside the repo)")
    return GLUE


@pytest.fixture
def clone():
    return copy.deepcopy


# tests/dist_srlora.py's jobs by (backend, processes): the options of each job. The one-process
# jobs run in the test process, the 2-process ones in the ``sharded`` launch of their backend, the
# others one after another in one launch (a launch costs each process ~7 s of imports).
# The cells of tools/family_table.py's sharded columns that every suite run makes again (tests/test_families.py;
# the nightly test makes all of them), as a job of these launches: "families" and FAMILY/METHOD/BASE each.
FAMILY_JOB = ("families", "Llama/srlora/fp32", "BERT/srlora/fp32", "Qwen3-MoE/srlora/fp32", "BERT/lora/bf16",
              "GPT-OSS/lora/nf4")
SRLORA_JOBS = {
    ("single", 1): [(), ("log",), ("log", "nf4"), ("moe",), ("moe", "log", "nf4")],
    ("fsdp2", 2): [(), ("log", "nf4"), ("buffers",), ("moe",), ("moe", "log", "nf4"), FAMILY_JOB],
    ("zero3", 2): [(), ("no-persist", "log"), ("log", "nf4"), ("buffers",), ("moe",), ("moe", "log", "nf4"), FAMILY_JOB],
    ("fsdp2", 4): [("log",), ("hsdp",)],
}


def srlora_options(root: Path, job: tuple[str, ...]) -> list[str]:
    """tests/dist_srlora.py's arguments of one job of ``SRLORA_JOBS`` after its output file."""
    if job == ("buffers",):  # tests/dist_buffers.py on EigenLoRAx with a basis from 3 tiny BERT adapters
        from tests.test_conformance import eigenbasis_for

        return ["buffers", eigenbasis_for("bert")]
    if "no-persist" not in job:
        return list(job)
    config = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = 0
    (root / "ds.json").write_text(json.dumps(config))
    return [*(x for x in job if x != "no-persist"), str(root / "ds.json")]


@pytest.fixture(scope="session")
def srlora_reports(request, tmp_path_factory):
    """``get(backend, processes, *options)``: the report of tests/dist_srlora.py for one job of
    ``SRLORA_JOBS`` (``no-persist``: ZeRO-3 keeps no parameter gathered between steps;
    ``buffers``: tests/dist_buffers.py's report; ``families``: the cells of tools/family_table.py named
    after it), made when a test first asks: the one-process jobs in this process, the 2-process ones
    in the ``sharded`` launch (``srlora_runs``), the jobs of another entry in one launch."""
    from tests.test_distributed import BACKENDS, launch

    done = {}
    sharded = request.getfixturevalue("sharded")  # not a parameter: its other runs are not this test's

    def get(backend: str, nproc: int, *job: str) -> dict:
        if (backend, nproc) not in done:
            root, jobs = tmp_path_factory.mktemp(f"srlora-{backend}-{nproc}"), SRLORA_JOBS[backend, nproc]
            if nproc == 1:  # in this process (no new interpreter's ~7 s of imports), on one thread as launched
                from tests import dist_srlora

                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    for i, each in enumerate(jobs):
                        dist_srlora.job(backend, str(root / f"{i}.json"), srlora_options(root, each))
                finally:
                    torch.set_num_threads(threads)
            elif nproc == 2:
                for i, _ in enumerate(jobs):
                    run, root = sharded(backend, f"srlora-{i}")
                    assert run.returncode == 0, run.stderr[-6000:]
                root = root.parent
            else:
                args = [str(REPO / "tests" / "dist_srlora.py"), backend]
                for i, each in enumerate(jobs):
                    args += [*(["+"] if i else []), str(root / f"{i}.json"), *srlora_options(root, each)]
                run = launch(args, nproc, BACKENDS[backend][0])
                assert run.returncode == 0, "\n".join(x for x in run.stderr.splitlines() if "elastic" not in x)[-6000:]
            done[backend, nproc] = {each: json.loads((root / f"{i}.json").read_text()) for i, each in enumerate(jobs)}
        return done[backend, nproc][job]

    return get


def srlora_runs(root: Path, backend: str) -> dict:
    """The 2-process jobs of ``SRLORA_JOBS`` on ``backend`` as runs of the ``sharded`` launch
    (``tests/train_many.py`` option ``"job"``), made when a selected test uses ``srlora_reports``;
    each writes its report to ``root / f"{i}.json"``."""
    return {f"srlora-{i}": ([], {"job": [backend, str(root / f"{i}.json"), *srlora_options(root, each)]})
            for i, each in enumerate(SRLORA_JOBS.get((backend, 2), []))}


# The 2-process launch/train.py runs of several modules: module -> make(folder, backend) ->
# {name: train.py arguments, or (arguments, tests/train_many.py options such as {"bf16_engine": True})}.
# A run with {"kill_at_step": N} (rank 0 killed after step N: at most one per launch) is made last;
# its result has the launch's exit status.
SHARDED_RUNS: dict[str, Callable[[Path, str], dict]] = {"srlora_reports": srlora_runs}


def sharded_runs(make: Callable[[Path, str], dict]) -> Callable[[Path, str], dict]:
    """Register a module's 2-process runs for the ``sharded`` fixture (a decorator)."""
    SHARDED_RUNS[make.__module__] = make
    return make


@pytest.fixture(scope="session")
def sharded(request, tmp_path_factory):
    """``sharded(backend, name)``: the result (exit status, output) and the folder of one run of
    ``SHARDED_RUNS``. The runs of one backend of every module (or fixture: ``srlora_reports``)
    whose selected tests use this fixture are made in one launch through the backend's launcher
    (``tests/train_many.py``): a launch costs each process ~7 s of imports, a tiny run a second or
    two. ``sharded.start()`` (``launches_beside_the_others``) starts both launches, one after the
    other, in a background thread; otherwise a launch starts when a test first asks."""
    from tests.test_distributed import BACKENDS, launch, run_results, write_runs

    users = set(launch_users(request.session.items))
    pool, launches = concurrent.futures.ThreadPoolExecutor(max_workers=1), {}

    def start(backend: str) -> None:
        if backend in launches:
            return
        root, runs = tmp_path_factory.mktemp(f"sharded-{backend}"), {}
        for module, make in list(SHARDED_RUNS.items()):  # a maker may import a module that registers one
            if module in users:
                (root / module.rpartition(".")[2]).mkdir()
                made = make(root / module.rpartition(".")[2], backend)
                assert not made.keys() & runs.keys(), f"{module}: run names {sorted(made.keys() & runs.keys())} taken"
                runs.update(made)
        order = sorted(runs.items(), key=killed)  # a run that kills the launch last
        assert sum(map(killed, order)) <= 1, f"more than one run killed: {[x[0] for x in order if killed(x)]}"
        # Only the launch runs in the thread: its files are written and read here, and its
        # environment is this one, not what a test running meanwhile patches (Path.open, LRX_FAULT).
        command, specs = write_runs(root / "launch", [spec for _, spec in order])
        future = pool.submit(launch, command, 2, BACKENDS[backend][0], timeout=max(300, 40 * len(specs)),
                             env=dict(os.environ)) if order else None
        launches[backend] = [root / "launch", order, specs, future, None]

    def get(backend: str, name: str):
        start(backend)
        folder, order, specs, future, results = launches[backend]
        if results is None:
            results = launches[backend][4] = run_results(folder, specs, future.result()) if future is not None else []
        return {key: (result, output_dir(spec)) for (key, spec), result in zip(order, results)}[name]

    get.start = lambda: [start(backend) for backend in BACKENDS]
    yield get
    pool.shutdown(cancel_futures=True)


def launch_users(items) -> dict[str, None]:
    """The modules of ``items`` whose tests use the ``sharded`` fixture, and the fixtures with runs
    (``SHARDED_RUNS``: ``srlora_reports``) they use, in order."""
    users = {}
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "sharded" in names:
            users[module_name(item)] = None
        users.update((name, None) for name in names if name in SHARDED_RUNS)
    return users


@pytest.fixture(scope="session", autouse=True)
def launches_beside_the_others(request):
    """The shared 2-process launches (``sharded``) start with the session, in the background, when
    a selected test uses them: their processes (~7 s of imports each, one launch at a time) run
    beside the one-process tests, which leave one of CI's 2 cores idle, and
    ``pytest_collection_modifyitems`` puts the modules that use them last. This process then
    computes on one thread, as the launched ones do: torch's OpenMP threads spin at every op while
    the launch's processes hold the cores (a 1.5 s test took 24 s beside a launch on 2 threads)."""
    if not launch_users(request.session.items):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # before the start: the makers' one-process runs (test_checkpoint's) run beside the first launch
    request.getfixturevalue("sharded").start()
    yield
    torch.set_num_threads(threads)


def module_name(item) -> str | None:
    return getattr(item, "module", None) and item.module.__name__


def killed(item: tuple) -> bool:
    """Whether a ``SHARDED_RUNS`` entry (name, spec) is killed after a step (``"kill_at_step"``)."""
    return isinstance(item[1], tuple) and "kill_at_step" in item[1][1]


def output_dir(spec) -> Path:
    """A run's output folder (a ``"job"``'s report file)."""
    argv, options = (spec, {}) if isinstance(spec, list) else spec
    if "job" in options:
        return Path(options["job"][1])
    return Path(next(a for a in argv if a.startswith("logging.output_dir=")).split("=", 1)[1])


def pytest_collection_modifyitems(config, items):
    """The modules whose tests use the shared launches (``sharded``) run last, each whole (its
    module fixtures made once), so the launches started with the session run beside the others;
    GPU-marked tests are skipped (with the reason) where no CUDA device is visible."""
    late = {module_name(item) for item in items if launch_users([item])}
    items[:] = [x for x in items if module_name(x) not in late] + [x for x in items if module_name(x) in late]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
