"""Two-process CPU runs (gloo) through the real launcher: FSDP2 against a single process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.test_conformance import eigenbasis_for

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Run a script as users do: plain python, torchrun, or the deepspeed launcher (CPU: --num_gpus)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, *args]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
               f"--master_port={free_port()}", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


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


def losses(run_dir) -> list[float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("method", ["lora", "pissa", "eigenlorax"])
def test_sharded_run_matches_single_process(tmp_path, method, backend):
    data = table(tmp_path / "t.tsv")
    extra = [f"method.basis={eigenbasis_for('bert')}"] if method == "eigenlorax" else \
        ["method.target_modules=[query,value,intermediate.dense]"]
    common = [str(REPO / "launch" / "train.py"), "--method", method, "model.name_or_path=tiny-bert",
              "data.format=table", f"data.train_path={data}", f"data.eval_path={data}", "method.r=4",
              "train.max_steps=8", "train.lr=1e-2", "train.log_every=1", "train.eval_at_start=false",
              "logging.progress=false", "logging.tensorboard=false", *extra]
    single = launch([*common, "train.batch_size=8", f"logging.output_dir={tmp_path / 'single'}"], 1)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher, sharded_log = BACKENDS[backend]
    sharded = launch([*common, "train.batch_size=4", f"logging.output_dir={tmp_path / backend}"], 2, launcher)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    assert sharded_log in sharded.stderr + sharded.stdout
    assert losses(tmp_path / backend) == pytest.approx(losses(tmp_path / "single"), abs=1e-4)
    a = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / backend / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    summary = json.loads((tmp_path / backend / "summary.json").read_text())
    assert summary["world_size"] == 2


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_method_buffers_stay_whole_and_identical_on_every_rank(tmp_path, backend):
    out = tmp_path / "report.json"
    run = launch([str(REPO / "tests" / "dist_buffers.py"), eigenbasis_for("bert"), str(out), backend], 2)
    assert run.returncode == 0, "\n".join(x for x in run.stderr.splitlines() if "elastic" not in x and not x.startswith(" "))[-6000:]
    report = json.loads(out.read_text())
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


def test_unsupported_method_is_refused_when_sharded(tmp_path):
    data = table(tmp_path / "t.tsv")
    run = launch([str(REPO / "launch" / "train.py"), "--method", "srlora", "model.name_or_path=tiny-bert",
                  "data.format=table", f"data.train_path={data}", "method.target_modules=[query,value]",
                  "train.max_steps=8", f"logging.output_dir={tmp_path / 'run'}"], 2)
    assert run.returncode != 0
    assert "method srlora does not run sharded yet" in run.stderr
