"""Two-process CPU runs (gloo) through the real launcher: FSDP2 against a single process."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lrx.cli import main
from tests.conftest import REPO, sharded_runs
from tests.test_conformance import eigenbasis_for

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, launcher: str = "torchrun", timeout: float = 300,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a script as users do: plain python, torchrun, or the deepspeed launcher (CPU: --num_gpus).
    ``launch/train.py`` in one process runs here (``train_here``). ``env``: the environment to
    start from (default ``os.environ`` now; a launch in a background thread passes the one it was
    started with, not what a test running meanwhile has set)."""
    if nproc == 1 and args[0] == str(REPO / "launch" / "train.py"):
        return train_here(args[1:])
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, *args]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
               f"--master_port={free_port()}", *args]
    else:
        # --standalone: torchrun takes a free port itself (no window for another run to take it)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    before = shm_files()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    leaked = shm_files() - before
    assert not leaked, f"the run left shared memory behind: {sorted(leaked)}"
    return run


def train_here(argv: list[str]) -> subprocess.CompletedProcess:
    """``launch/train.py argv`` in this process (what the script runs, ``lrx.cli.main``, without a
    new interpreter's ~7 s of imports): its exit status, its stdout and its stderr with the log."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def launch_runs(folder: Path, runs: list, nproc: int, launcher: str, **how) -> list[subprocess.CompletedProcess]:
    """Several ``launch/train.py`` runs (their arguments, or (arguments, options of this run);
    ``how``, options of every run: ``bf16_engine=True``) in one launch (``tests/train_many.py``):
    per run its exit status and the stdout and stderr of all its processes; a run the launch did
    not finish has the launch's exit status and stderr."""
    command, specs = write_runs(folder, runs, **how)
    return run_results(folder, specs, launch(command, nproc, launcher, timeout=max(300, 40 * len(specs))))


def write_runs(folder: Path, runs: list, **how) -> tuple[list[str], list]:
    """``launch_runs``'s first part: ``folder / "runs.json"``; the command to launch and the specs."""
    specs = [(run, {}) if isinstance(run, list) else run for run in runs]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runs.json").write_text(json.dumps([{"argv": argv[1:], **how, **own} for argv, own in specs]))
    return [str(REPO / "tests" / "train_many.py"), str(folder / "runs.json")], specs


def run_results(folder: Path, specs: list, launched: subprocess.CompletedProcess) -> list[subprocess.CompletedProcess]:
    """``launch_runs``'s last part: each run's result from the files the launch wrote into ``folder``."""
    results = []
    for i, (argv, _) in enumerate(specs):
        out, err = ("".join(p.read_text() for p in sorted(folder.glob(f"{i}.rank*.{x}"))) for x in ("out", "err"))
        code = folder / f"{i}.code"
        if code.is_file():
            results.append(subprocess.CompletedProcess(argv, int(code.read_text()), out, err))
        else:
            results.append(subprocess.CompletedProcess(argv, launched.returncode or 1, out, err + launched.stderr))
    return results


def shm_files() -> set[str]:
    """DeepSpeed's shared-memory files; a run that leaves them fills /dev/shm run after run."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed*")} if shm.is_dir() else set()


# backend: (launcher, what its log says once the model is sharded)
BACKENDS = {
    "fsdp2": ("torchrun", "fsdp2: 3 blocks + root sharded over 2 processes"),  # embeddings + 2 layers
    "zero3": ("deepspeed", "zero3: parameters partitioned over 2 processes"),
}


def table(path, rows=64):
    lines = ["sentence\tlabel"] + [f"this is {'good' if i % 2 else 'bad'} item {i}\t{'pos' if i % 2 else 'neg'}"
                                   for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process reference runs, each made once per module and shared by the tests that
    compare a sharded run with it: ``reference(key, make)`` calls ``make(folder)`` (which
    returns a ``launch`` result) the first time a key is asked for, and returns the folder."""
    root, done = tmp_path_factory.mktemp("reference"), {}

    def get(key: str, make) -> Path:
        if key not in done:
            folder = root / key
            folder.mkdir()
            result = make(folder)
            assert result.returncode == 0, result.stderr[-3000:]
            done[key] = folder
        return done[key]

    return get


def losses(run_dir) -> list[float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def parity_args(method: str, folder: Path) -> list[str]:
    """train.py arguments of the parity runs (tiny BERT classifier, a table in ``folder``)."""
    extra = [f"method.basis={eigenbasis_for('bert')}"] if method == "eigenlorax" else \
        ["method.target_modules=[query,value,intermediate.dense]"]
    data = table(folder / "t.tsv")
    return [str(REPO / "launch" / "train.py"), "--method", method, "model.name_or_path=tiny-bert",
            "data.format=table", f"data.train_path={data}", f"data.eval_path={data}", "method.r=4",
            f"train.max_steps={12 if method == 'srlora' else 8}", "train.lr=1e-2", "train.log_every=1",
            "train.eval_at_start=false", "logging.progress=false", "logging.tensorboard=false", *extra]


def single_reference(reference, method: str) -> Path:
    return reference(f"parity-{method}", lambda d: launch(
        [*parity_args(method, d), "train.batch_size=8", f"logging.output_dir={d / 'single'}"], 1)) / "single"


@sharded_runs
def sharded_args(root: Path, backend: str) -> dict[str, list[str]]:
    """The train.py arguments of every 2-process run of this module on ``backend``, by name, in
    the order one launch runs them (fixture ``sharded``); each run writes into its own folder under ``root``. ZeRO-3's
    whole-model runs after its streamed ones also check that a streamed build leaves nothing
    behind in the process (its HfDeepSpeedConfig made transformers build every later model under
    zero.Init)."""
    runs = {}
    for method in ("lora", "eigenlorax", "srlora"):
        (root / method).mkdir()
        runs[f"parity-{method}"] = [*parity_args(method, root / method), "train.batch_size=4",
                                    f"logging.output_dir={root / method / 'run'}"]
    (root / "straight").mkdir()
    runs["straight-srlora"] = [*straight_args("srlora", root / "straight"), "train.batch_size=4",
                               f"logging.output_dir={root / 'straight' / 'run'}"]
    runs["tied"] = tied_args(root / "tied", root / "tied-base", "train.batch_size=4")
    if backend == "fsdp2":  # resumed from the tied run's step-2 checkpoint, in the same launch after it
        runs["tied-resumed"] = tied_args(root / "tied-resumed", root / "tied-base", "train.batch_size=4", "--resume",
                                         str(root / "tied" / "checkpoints" / "step-00000002"))
        return runs
    (root / "ds").mkdir()
    config = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    config["optimizer"] = {"type": "AdamW", "params": {"torch_adam": True, "lr": 1.0}}  # lr: lrx's wins
    (root / "ds.json").write_text(json.dumps(config))
    runs["ds-optimizer"] = [*parity_args("srlora", root / "ds"), "train.batch_size=4",
                            f"logging.output_dir={root / 'ds' / 'run'}", f"distributed.deepspeed_config={root / 'ds.json'}"]
    config.pop("optimizer")
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (root / "off.json").write_text(json.dumps(config))
    runs["ds-offload"] = [*parity_args("srlora", root / "ds"), "train.batch_size=4",
                          f"logging.output_dir={root / 'ds' / 'off'}", f"distributed.deepspeed_config={root / 'off.json'}"]
    return runs


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("method", ["lora", "eigenlorax", "srlora"])  # srlora's init is PiSSA's
def test_sharded_run_matches_single_process(reference, sharded, method, backend):
    single = single_reference(reference, method)
    sharded_log = BACKENDS[backend][1]
    run, folder = sharded(backend, f"parity-{method}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert sharded_log in run.stderr + run.stdout
    assert losses(folder) == pytest.approx(losses(single), abs=1e-4)
    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # srlora's pool comes from a randomized SVD computed per block of rows: the same algorithm
    # with sums in another order, so its rounding (~1e-7) grows a little over 12 steps.
    atol = 1e-4 if method == "srlora" else 1e-5
    for key in a:
        diff = (b[key] - a[key]).abs().max().item() if a[key].numel() else 0.0
        assert diff <= atol, (key, diff)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Evaluation is split (each process its half) and reduces to the one-process metrics.
    assert "(32 of 64 examples on each of 2 processes)" in run.stderr + run.stdout
    reference_eval = json.loads((single / "summary.json").read_text())["eval"]
    assert summary["eval"]["eval_loss"] == pytest.approx(reference_eval["eval_loss"], abs=1e-5)
    assert summary["eval"]["accuracy"] == reference_eval["accuracy"]
    if method == "srlora":  # 4 events at steps 2, 4, 6, 8; the same pairs chosen
        events = [(d / "method_events.jsonl").read_text().splitlines() for d in (single, folder)]
        assert len(events[0]) == 4 * 6  # 6 adapted layers
        for x, y in zip(*events):
            x, y = json.loads(x), json.loads(y)
            assert (x["step"], x["layer"], x["fused_pairs"]) == (y["step"], y["layer"], y["fused_pairs"])
            assert y["fusion_error"] < 1e-5

def test_zero3_trains_with_the_optimizer_its_deepspeed_config_names(reference, sharded):
    """An "optimizer" block in the DeepSpeed config: DeepSpeed builds that optimizer (here torch's
    AdamW) with lrx's learning rate, betas, weight decay and schedule, and SRLoRA resets its
    moments at events: the losses of lrx's own AdamW in one process."""
    single = single_reference(reference, "srlora")
    run, folder = sharded("zero3", "ds-optimizer")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "zero3: optimizer AdamW built by DeepSpeed" in run.stderr + run.stdout
    assert losses(folder) == pytest.approx(losses(single), abs=1e-4)
    # Optimizer offload with lrx's own optimizer: refused in one line, before any training.
    refused, _ = sharded("zero3", "ds-offload")
    assert refused.returncode != 0 and "error: zero_optimization.offload_optimizer needs an \"optimizer\" block" in refused.stderr



def test_an_arch_list_deepspeed_cannot_build_for_is_refused_in_one_line(monkeypatch):
    from lrx.distributed.zero3 import check_arch_list
    from lrx.errors import ConfigError

    for ok in ("", "9.0", "8.0;9.0+PTX", "8.0 9.0"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", ok)
        check_arch_list({"type": "AdamW"})
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    with pytest.raises(ConfigError, match=r"cannot build its AdamW for 9\.0a; set TORCH_CUDA_ARCH_LIST=\"8\.0;9\.0\""):
        check_arch_list({"type": "AdamW"})
    check_arch_list({"type": "AdamW", "params": {"torch_adam": True}})  # nothing to compile


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_method_buffers_stay_whole_and_identical_on_every_rank(srlora_reports, backend):
    report = srlora_reports(backend, 2, "buffers")  # tests/dist_buffers.py, in the launch of dist_srlora.py's jobs
    bases = {k: v for k, v in report.items() if k.endswith((".C_A", ".C_B"))}
    assert bases
    for key, entry in bases.items():
        assert entry["type"] == "Tensor", key  # a plain tensor, not a sharded DTensor
        first = entry["per_rank"][0]
        assert first[2] == entry["shape"][0] * entry["shape"][1]
        assert all(r == first for r in entry["per_rank"]), key
    # The loadings are sharded: a DTensor (FSDP2), or an empty local tensor with a partition (ZeRO-3).
    sharded = {"fsdp2": "DTensor", "zero3": "partitioned"}[backend]
    assert all(v == sharded for k, v in report.items() if k.endswith(".alpha_A.type"))


@pytest.mark.parametrize("backend, nproc, extra", [
    ("fsdp2", 2, ()), ("zero3", 2, ()), ("zero3", 2, ("no-persist", "log")), ("fsdp2", 4, ("log",)),
    ("fsdp2", 4, ("hsdp",)),
], ids=["fsdp2", "zero3", "zero3-partitioned-adapters-log", "fsdp2-4proc-log", "hsdp-2x2"])
def test_sharded_srlora_events_are_shard_local_and_identical_everywhere(srlora_reports, backend, nproc, extra):
    """Uneven shapes (255 MLP rows, ZeRO-3 ranges splitting rows): sharded SRLoRA equals one
    process, keeps the function at each event, and all ranks agree bit for bit; with edits
    folded into the fp32 base, or (log) applied from the edit log beside the adapter, whose
    rows FSDP2 splits over the processes (ZeRO-3: replicated); no-persist: every parameter
    partitioned (no gathered copies kept between steps)."""
    log = ("log",) if "log" in extra else ()
    single = srlora_reports("single", 1, *log)
    sharded = srlora_reports(backend, nproc, *extra)
    if "hsdp" in extra:  # 2 replicas, each sharded over 2 processes: pieces are summed per replica
        assert sharded["mesh"] == [2, 2]
    assert len(sharded["events"]) == 3  # events at steps 3, 6, 9
    assert sharded["events"] == single["events"]
    assert max(sharded["invariance"]) < 1e-6 and max(single["invariance"]) < 1e-6
    assert sharded["losses"] == pytest.approx(single["losses"], abs=1e-4)
    first, *others = sharded["per_rank"]
    assert len(others) == nproc - 1
    for other in others:  # pool S/V, scores, chosen pairs, edit log: bit-identical on every rank
        assert other == first
    # Pool, statistics and the edit log (gathered whole) agree with one process's up to the
    # rounding of the per-block SVD (the random test matrices have close singular values, which
    # that rounding mixes a little).
    for key, value in single["state"].items():
        assert sharded["state"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    logs = [k for k in single["per_rank"][0] if ".edit_" in k]
    assert len(logs) == 2 * 14  # U and V of 14 layers
    for key in logs:
        assert first[key] == pytest.approx(single["per_rank"][0][key], rel=1e-3, abs=1e-4), key
    held, whole = sharded["log_bytes_held"], sharded["log_bytes_at_capacity"]
    if backend == "fsdp2":
        # Each process keeps its block of the log's rows (U's, and V's columns), each row once per
        # replica: the log's memory per process falls with the shard count.
        shard = nproc // (2 if "hsdp" in extra else 1)
        assert sum(held) == nproc // shard * whole
        assert max(held) <= sharded["log_bytes_bound"][str(shard)] < whole
        # Every process has its own rows of B, the pool's U and the log: an event all-reduces only
        # the fused rows of A, besides the pair scores and (folded) the fusion errors.
        n = sharded["n_layers"]
        expected = n * sharded["r"] + sharded["fused_A_numbers"] + (0 if log else 2 * n)
        assert sharded["event_all_reduce"] == [expected] * 3
    else:  # ZeRO-3 keeps the log whole on every process
        assert len(set(held)) == 1


def straight_args(method: str, folder: Path) -> list[str]:
    """train.py arguments of a run on a tiny BERT saved as safetensors in ``folder``."""
    from tests.conftest import tiny_model

    base, data = folder / "base", table(folder / "t.tsv")
    if not base.is_dir():
        tiny_model("bert", vocab=30522).save_pretrained(base)
    return [str(REPO / "launch" / "train.py"), "--method", method, f"model.name_or_path={base}",
            "model.tokenizer=minilm-l6", "data.format=table", f"data.train_path={data}", "method.r=4",
            "method.target_modules=[query,value,intermediate.dense]", f"train.max_steps={12 if method == 'srlora' else 6}",
            "train.lr=1e-2", "train.log_every=1", "train.eval_at_start=false", "logging.progress=false",
            "logging.tensorboard=false"]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_safetensors_base_is_loaded_straight_into_shards(tmp_path, reference, sharded, backend):
    """A base saved as safetensors is never whole on a process (model.sharded_load=auto): FSDP2
    builds it on the meta device and loads one block at a time, ZeRO-3 builds it under
    zero.Init; training matches one process loading it whole."""
    single = reference("straight-srlora", lambda d: launch(
        [*straight_args("srlora", d), "train.batch_size=8", f"logging.output_dir={d / 'single'}"], 1)) / "single"
    run, folder = sharded(backend, "straight-srlora")
    assert run.returncode == 0, run.stderr[-3000:]
    expected = {"fsdp2": "loaded block by block from 1 safetensors files", "zero3": "parameters were built partitioned"}
    assert expected[backend] in run.stderr + run.stdout
    assert losses(folder) == pytest.approx(losses(single), abs=1e-4)
    if backend != "fsdp2":
        return
    refused = launch([*straight_args("srlora", tmp_path), "train.batch_size=4", "model.task=causal_lm", "data.format=instruct",
                      f"data.train_path={REPO / 'configs' / 'data' / 'quickstart' / 'train.jsonl'}",
                      "model.sharded_load=on", "distributed.backend=single", f"logging.output_dir={tmp_path / 'x'}"], 1)
    assert refused.returncode == 2 and "model.sharded_load=on needs distributed.backend=fsdp2 or zero3" in refused.stderr


def tied_args(folder: Path, base: Path, *extra: str) -> list[str]:
    """train.py arguments of a tiny Llama with tied embeddings saved (in ``base``) as transformers
    saves it (only ``model.embed_tokens.weight`` in the file), trained on prompt-masked
    instruction data without packing: the global batches split into processes with unequal
    label tokens."""
    from tests.conftest import QUICKSTART, tiny_model

    if not base.is_dir():
        model = tiny_model("llama", vocab=30522)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        model.save_pretrained(base)
    return [str(REPO / "launch" / "train.py"), "--method", "lora", f"model.name_or_path={base}",
            "model.tokenizer=minilm-l6", "data.format=instruct", f"data.train_path={QUICKSTART / 'train.jsonl'}",
            "data.max_train_samples=32", "data.max_length=48", "method.r=4", "train.max_steps=4", "train.lr=1e-2",
            "train.log_every=1", "train.eval_at_start=false", "train.save_every=2", "logging.progress=false",
            "logging.tensorboard=false", f"logging.output_dir={folder}", *extra]


@pytest.fixture(scope="module")
def tied_single(tmp_path_factory) -> Path:
    """The tied model trained once per module by one process, 4 steps with checkpoints at 2 and 4
    (the 2-process runs: ``sharded(backend, "tied")``); its run folder."""
    root = tmp_path_factory.mktemp("tied")
    run = launch(tied_args(root / "single", root / "tied-base", "train.batch_size=8"), 1)
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "single"


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_tied_model_streams_into_shards(tied_single, sharded, backend):
    """Tied embeddings (Llama-3.2 1B/3B, Qwen2.5 <= 3B, Gemma): the model built on the meta device
    is tied as from_pretrained ties it, so lm_head.weight is filled from the embeddings and stays
    the same parameter once sharded; training matches one process loading it whole."""
    run, folder = sharded(backend, "tied")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stderr + run.stdout
    expected = {"fsdp2": "loaded block by block from 1 safetensors files and sharded over 2 processes (cpu); "
                         "tied: model.embed_tokens.weight = lm_head.weight",
                "zero3": "parameters were built partitioned"}
    assert expected[backend] in out
    assert losses(folder) == pytest.approx(losses(tied_single), abs=1e-4)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_the_loss_is_the_token_mean_over_processes(tied_single, sharded, backend):
    """Prompt masking without packing: the 2 processes' halves of each global batch hold different
    numbers of label tokens; the loss (and so the gradient) is still the token mean over the whole
    global batch, as one process computes it (a mean of per-process means differs by ~4e-4)."""
    run, folder = sharded(backend, "tied")
    assert run.returncode == 0, run.stderr[-3000:]
    assert losses(folder) == pytest.approx(losses(tied_single), abs=1e-5)


def test_a_tied_model_resumes_streamed_into_shards(sharded):
    """The FSDP2 run resumed from its step-2 checkpoint into a new folder: the tied base streams
    into shards again, the adapters are restored while each block is whole, and steps 3-4 give
    the uninterrupted run's losses."""
    run, folder = sharded("fsdp2", "tied")
    assert run.returncode == 0, run.stderr[-3000:]
    resumed, resumed_folder = sharded("fsdp2", "tied-resumed")  # the same launch, after the run
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stderr + resumed.stdout
    assert "resumed from" in out and "tied: model.embed_tokens.weight = lm_head.weight" in out
    assert losses(resumed_folder) == pytest.approx(losses(folder)[2:], abs=1e-6)
