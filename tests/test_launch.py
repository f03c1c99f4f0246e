"""Launch paths: SLURM templates (syntax, and a two-node run on this machine through the very
same commands, with srun/scontrol stand-ins), and --dry-run on an 8B-shaped config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_cli import write_table
from tests.test_distributed import free_port, train_here

TEMPLATES = sorted((REPO / "launch" / "slurm").glob("*.sbatch"))

SRUN = """#!/bin/bash
# stand-in for SLURM's srun: drop srun's own options, run the command here
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
# stand-in for "scontrol show hostnames": two nodes
printf 'node0\\nnode1\\n'
"""


def test_templates_parse():
    assert {t.name for t in TEMPLATES} == {"deepspeed.sbatch", "torchrun.sbatch"}
    for template in TEMPLATES:
        subprocess.run(["bash", "-n", str(template)], check=True)


@pytest.mark.distributed
@pytest.mark.nightly  # 34 s together; each template also runs (one node, fake srun) in every test_faults run
@pytest.mark.parametrize("template", ["torchrun", "deepspeed"])
def test_two_nodes_train_together_through_the_template(tmp_path, template):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    data = write_table(tmp_path / "t.tsv")
    out = tmp_path / "run"
    args = ["model.name_or_path=tiny-bert", "data.format=table", f"data.train_path={data}",
            "method.target_modules=[query,value]", "train.max_steps=4", "train.batch_size=4",
            "logging.progress=false", f"logging.output_dir={out}"]
    port = str(free_port())
    nodes = []
    for node in (0, 1):
        # torchrun and deepspeed come from this interpreter's environment, as on a cluster node.
        path = f"{stubs}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
        env = {**os.environ, "PATH": path, "SLURM_JOB_NODELIST": "node[0-1]",
               "SLURM_NNODES": "2", "SLURM_NODEID": str(node), "SLURM_JOB_ID": "7", "GPUS_PER_NODE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
        nodes.append(subprocess.Popen(["bash", str(REPO / "launch" / "slurm" / f"{template}.sbatch"), *args],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(log[-1500:] for log in logs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    if template == "torchrun":  # several nodes: shard within a node, replicate across nodes
        assert "HSDP: 2 replicas x 1 shards" in logs[0], logs[0][-2000:]


def test_dry_run_of_an_8b_shaped_config_is_quick():
    """``launch/train.py --dry-run`` (in this process, ``train_here``): no 8B model is built."""
    start = time.monotonic()
    run = train_here(["--config", str(REPO / "configs" / "llama3-8b" / "srlora.yaml"), "--dry-run", "--world-size", "8"])
    assert time.monotonic() - start < 120
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "world size 8" in out and "backend fsdp2" in out
    # r=16 on the 7 projections of 32 layers: 32 * 16 * (8192 + 5120 + 5120 + 8192 + 3 * 18432).
    assert "trainable 41,943,040" in out and "adapted linear layers 224" in out
    assert "base weights (frozen)" in out and "GiB" in out
    # FSDP2 over 8 processes: the exact fp32 edit log (rank 2 r_target - r = 80) is split by rows
    # on the devices, nothing of it in host memory.
    assert "host memory per process: none (the exact fp32 edit log is in method state, its rows split over the 8 " \
        "processes" in out


def test_the_plan_splits_the_edit_log_over_fsdp2_processes():
    """Per process, method state (pool, statistics, edit log) falls with FSDP2's shard count and
    no pinned host memory is planned; one process keeps the log in host memory (bf16 on the GPU)."""
    from lrx.config import load_config
    from lrx.plan import plan

    config = load_config(REPO / "configs" / "llama3-8b" / "srlora.yaml", [])
    text = {n: plan(config, world_size=n) for n in (1, 2, 8)}
    state = {n: float(t.split("method state (peak, est.)")[1].split("GiB")[0]) for n, t in text.items()}
    assert f"exact fp32 edit log {4 * 80 * 2_621_440 / 2**30:.2f} GiB (pinned" in text[1]
    for n in (2, 8):
        assert f"host memory per process: none (the exact fp32 edit log is in method state, its rows split over the " \
            f"{n} processes" in text[n]
    # 8 shards: the log is 4 B x 80 x (out/8 + in/8) per layer = 0.10 GiB, the pool's whole V 0.16 GiB.
    assert state[8] < state[2] / 2 and state[8] == pytest.approx(0.31, abs=0.005)
