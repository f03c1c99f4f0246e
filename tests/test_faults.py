"""Long jobs on shared clusters (issue 28): stopping on signals, SLURM requeue, hangs, full
disks and torchrun restarts. Faults are injected through ``LRX_FAULT`` (``lrx/faults.py``),
runs go through ``launch/train.py``, torchrun and the SLURM template as users start them.

One FSDP2 run (3 processes) and one ZeRO-3 run (2) are each interrupted in a row and must end
with the uninterrupted run's losses, events and adapter: a rank that hangs (another fails within
distributed.timeout_s naming it; torchrun restarts them, and they resume on their own), signals to
one rank during an SRLoRA event's step and to every rank during a checkpoint's write, the SLURM
template's USR1 (stop file, requeue) and the template's second start.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrx import checkpoint, faults
from lrx.cli import main
from lrx.stop import EXIT_STOPPED
from tests.conftest import REPO, sharded_runs
from tests.test_checkpoint import adapter, args, assert_same_adapter, copy_run, resume_cli, run, saved  # noqa: F401
from tests.test_distributed import losses, table
from tests.test_launch import SRUN

pytestmark = pytest.mark.distributed

SCONTROL = """#!/bin/bash
# stand-in for scontrol: "show hostnames" gives one node; "requeue JOB" is logged
if [ "$1" = requeue ]; then echo "requeue $2" >> "$LRX_TEST_REQUEUED"; else echo node0; fi
"""


def events(run_dir) -> list:
    return [json.loads(x)["fused_pairs"] for x in (run_dir / "method_events.jsonl").read_text().splitlines()]


def event_steps(run_dir) -> list[int]:
    return sorted({json.loads(x)["step"] for x in (run_dir / "method_events.jsonl").read_text().splitlines()})


def steps(run_dir) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def done(run_dir) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint.checkpoint_dirs(run_dir)]


def sbatch(tmp_path, template: str, nproc: int, argv: list[str], env: dict[str, str],
           signal_at_step: int | None = None):
    """``launch/slurm/TEMPLATE.sbatch`` on this machine (one node, ``nproc`` processes) under a
    fake srun and scontrol; with ``signal_at_step``, USR1 goes to the batch shell (as
    ``--signal=B:USR1@...`` sends it) once the run has logged that step."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_ID": "28",
           "SLURM_SUBMIT_DIR": str(tmp_path), "GPUS_PER_NODE": str(nproc), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "LRX_TEST_REQUEUED": str(tmp_path / "requeued"),
           "TMPDIR": str(tmp_path), **env}
    job = subprocess.Popen(["bash", str(REPO / "launch" / "slurm" / f"{template}.sbatch"), *argv], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if signal_at_step is not None:
        metrics = Path(next(a for a in argv if a.startswith("logging.output_dir=")).split("=", 1)[1]) / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while signal_at_step not in (json.loads(x)["step"] for x in metrics.read_text().splitlines()):
            assert time.monotonic() < deadline and job.poll() is None, "the run never reached the step"
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
    out = job.communicate(timeout=600)[0]
    return job.returncode, out


def free_port() -> int:
    from tests.test_distributed import free_port as port

    return port()


# backend: (processes, SLURM template, what the resumed log says once the safetensors base is loaded
# straight into shards). 3 FSDP2 processes shard A (r = 4 rows) unevenly; ZeRO-3 runs under torchrun
# (its restarts) and under the deepspeed launcher (the template).
PLANS = {"fsdp2": (3, "torchrun", "loaded block by block from 1 safetensors files"),
         "zero3": (2, "deepspeed", "parameters were built partitioned")}


def fault_args(folder: Path, name: str, backend: str, *extra: str) -> list[str]:
    """train.py arguments of the run of ``test_one_run_survives...`` on ``backend`` into
    ``folder / name``, on the tiny BERT saved as safetensors in ``folder / "base"``."""
    from tests.conftest import tiny_model

    if not (folder / "base").is_dir():
        tiny_model("bert", vocab=30522).save_pretrained(folder / "base")
    return args(table(folder / "t.tsv"), folder / name, "train.save_every=2", f"distributed.backend={backend}",
                *extra, batch=8 // PLANS[backend][0], base=folder / "base")


@sharded_runs
def uninterrupted(root: Path, backend: str) -> dict:
    """The uninterrupted ZeRO-3 run (2 processes, as the ``sharded`` launch has) that the
    interrupted one must equal, made in that launch; FSDP2's (3 processes) is launched by the test."""
    return {"faults-uninterrupted": fault_args(root, "full", backend)} if PLANS[backend][0] == 2 else {}


@pytest.mark.parametrize("backend", list(PLANS))
def test_one_run_survives_a_hang_restarts_signals_and_a_requeue(tmp_path, sharded, backend):
    """An SRLoRA run (events at steps 2, 4, 6, 8) interrupted in a row by: a rank that hangs in a random step (rank 0 names it within the timeout;
    torchrun restarts the workers, which resume from the newest checkpoint on their own); SIGUSR1
    to rank 1 in step 6 (an event's step) and SIGTERM to every rank while checkpoint 6 is written (they
    finish the event and the checkpoint, and stop); the template's USR1 (stop file, requeue) and
    its second start. It ends with the uninterrupted run's losses, events and adapter, each step
    logged once. The base is a safetensors folder, loaded straight into shards by every start."""
    nproc, template, straight = PLANS[backend]
    if nproc == 2:
        full, full_dir = sharded(backend, "faults-uninterrupted")
    else:
        full, full_dir = run(fault_args(tmp_path, "full", backend), nproc, backend), tmp_path / "full"
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "run"
    resume = fault_args(tmp_path, "run", backend, "distributed.timeout_s=5", "train.stop_grace_s=5", "--resume", "auto")

    hang = random.Random().randint(3, 5)  # resumes from checkpoint 2 or 4
    fault = f"hang@step:{hang}@rank=1@attempt=0,sigusr1@step:6@rank=1@attempt=1,sigterm@checkpoint:6@attempt=1"
    restarted = elastic(resume, nproc, {"LRX_FAULT": fault})
    log = restarted.stderr + restarted.stdout
    assert f"rank 0, step {hang - 1}: a collective failed" in log and "not answering: rank 1;" in log, log[-4000:]
    assert "distributed.timeout_s=5" in log
    assert f"resumed from {out / 'checkpoints' / f'step-{hang - 1 - (hang - 1) % 2:08d}'}" in log
    assert "LRX_FAULT: sigusr1 at step:6 on rank 1" in log and "SIGUSR1: stopping after this optimizer step" in log
    assert "stopped at step 6 (SIGTERM)" in log, log[-3000:]  # every rank's signal, during checkpoint 6's write
    assert f"exitcode  : {EXIT_STOPPED}" in log
    assert done(out) == [4, 6] and event_steps(out) == [2, 4, 6]  # the event of step 6 ran before the stop

    # The SLURM template: USR1 to the batch shell at step 7; the workers stop after step 8 (rank 0
    # pauses in it), the job is requeued once; its second start resumes and finishes.
    status, text = sbatch(tmp_path, template, nproc, resume[1:], {"LRX_FAULT": "pause@step:8@rank=0"}, signal_at_step=7)
    assert status == 0 and "stopped at step 8" in text and "requeueing job 28" in text, text[-3000:]
    assert (tmp_path / "requeued").read_text() == "requeue 28\n" and not (tmp_path / ".lrx-stop-28").exists()
    status, text = sbatch(tmp_path, template, nproc, resume[1:], {"SLURM_RESTART_COUNT": "1"})
    assert status == 0 and "resumed from" in text and "step-00000008" in text, text[-3000:]
    assert straight in text and (tmp_path / "requeued").read_text() == "requeue 28\n"

    assert losses(out) == pytest.approx(losses(full_dir), abs=1e-6)
    assert steps(out) == list(range(1, 13))  # the logs show one continuous run
    assert events(out) == events(full_dir)
    assert_same_adapter(adapter(out), adapter(full_dir), atol=1e-6)


def elastic(argv: list[str], nproc: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``torchrun --max-restarts 1`` over ``nproc`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", "1",
           "--nproc_per_node", str(nproc), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_only_lost_peers_and_timeouts_of_collectives_count_as_a_failed_collective():
    """Errors that merely say "timed out" are raised as they are; gloo's and the store's timeouts
    and lost peers (the texts torch 2.13 raises) name the processes that stopped answering."""
    import torch.distributed as dist

    from lrx.distributed import MultiProcess, lost_peer

    backend = object.__new__(MultiProcess)  # no process group: failure() must not reach it
    assert backend.failure(RuntimeError("reading https://example.org/data timed out"), 3) is None
    assert backend.failure(RuntimeError("CUDA error: the launch timed out and was terminated"), 3) is None
    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/"
    for error in (RuntimeError(f"{gloo}unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"),
                  RuntimeError(f"{gloo}pair.cc:553] Connection closed by peer [127.0.0.1]:38630. This is typically"),
                  RuntimeError(f"{gloo}pair.cc:598] Read error [127.0.0.1]:1234: Connection reset by peer"),
                  dist.DistStoreError("wait timeout after 5000ms, keys: /lrx/attempt-1/0"),
                  dist.DistBackendError("NCCL communicator was aborted on rank 1")):
        assert lost_peer(error), error


# ---- one process ------------------------------------------------------------------------------

WATCH = """
import os, signal, sys, time
from lrx.stop import StopRequest
stop = StopRequest(["TERM", "USR1"], grace_s=float(sys.argv[1])).install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGUSR1)  # a repeat at once (torchrun forwarding what the worker got): one request
time.sleep(0.3)
print(stop.reason(), flush=True)
if sys.argv[2] == "again":
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)  # the main thread is busy: the watching thread exits anyway
"""


@pytest.mark.parametrize("grace, then", [(0, "again"), (0.5, "wait")], ids=["second-signal", "deadline"])
def test_a_second_signal_or_the_deadline_exits_at_once(grace, then):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", WATCH, str(grace), then], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - t0 < 10, proc.stderr
    assert proc.stdout == "SIGTERM\n"  # the first signal only asked for a stop
    why = "a second signal (SIGTERM)" if then == "again" else "train.stop_grace_s=0.5 s passed since SIGTERM"
    assert f"error: {why}: exiting at once; the newest complete checkpoint is intact" in proc.stderr


@pytest.mark.parametrize("key, message", [
    ("train.stop_signals=[TERM,KILL]", "train.stop_signals must be signal names such as [TERM, INT, USR1]"),
    ("train.stop_grace_s=-1", "train.stop_grace_s must be >= 0"),
    ("distributed.timeout_s=0", "distributed.timeout_s must be > 0 seconds"),
])
def test_bad_fault_settings_are_one_line(tmp_path, capsys, key, message):
    assert main(args(table(tmp_path / "t.tsv"), tmp_path / "run", key)[1:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-3:]
    assert not (tmp_path / "run").exists()


def test_a_run_that_stopped_before_its_first_checkpoint_starts_again(tmp_path, capsys, caplog, monkeypatch):
    """Nothing of a run that ended before its first checkpoint (here a full disk at checkpoint 3)
    is lost by starting it again: --resume auto does so from step 0, saying so, and logs each step
    once; a finished run without checkpoints is still refused."""
    data, out = table(tmp_path / "t.tsv"), tmp_path / "run"
    argv = args(data, out, "train.save_every=3", "train.max_steps=6", "--resume", "auto")[1:]
    monkeypatch.setenv("LRX_FAULT", "enospc@checkpoint:3")
    faults.reset()
    assert main(argv) == 2 and "No space left on device" in capsys.readouterr().err
    assert steps(out) == [1, 2, 3] and done(out) == []
    monkeypatch.delenv("LRX_FAULT")
    faults.reset()
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert f"the run in {out} stopped before its first checkpoint; starting it again from step 0" in caplog.text
    assert steps(out) == [1, 2, 3, 4, 5, 6] and done(out) == [3, 6]
    shutil.rmtree(out / "checkpoints")  # finished (adapter, summary.json): refused, as without --resume
    assert main(argv) == 2
    assert f"{out} already holds a run; pass --overwrite" in capsys.readouterr().err


def test_a_full_disk_keeps_the_last_checkpoint_and_says_what_it_needs(saved, tmp_path, capsys, caplog,  # noqa: F811
                                                                      monkeypatch):
    """ENOSPC in the middle of checkpoint 8 (some of its files written): checkpoint 6 intact and
    resumable, the partial folder gone, one line with the folder, the bytes needed and free; the
    run warned before it started, as the disk looked too small for a checkpoint and the adapter."""
    run_dir, data = copy_run(saved, tmp_path)
    monkeypatch.setenv("LRX_FAULT", "enospc@checkpoint:8")
    faults.reset()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=999))
    assert resume_cli(data, run_dir, "auto") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {run_dir / 'checkpoints'}: No space left on device: the write needs about "
                   f"{err.split('needs about ')[1].split(' and ')[0]} and 999 bytes are free; its partial files "
                   "were removed and earlier checkpoints are intact; free space (or raise the quota) or write "
                   "elsewhere, then run again")
    assert " KB" in err or " MB" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert "less than one checkpoint plus the adapter" in caplog.text
    monkeypatch.setenv("LRX_FAULT", "enospc@write:run/adapter")  # the end of the run: the adapter's write
    faults.reset()
    before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert resume_cli(data, run_dir, "auto") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {run_dir}: No space left on device: the write needs about ")
    assert f"{run_dir / 'adapter'} is as it was" in err
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".adapter")]
    assert checkpoint.resolve_resume("auto", run_dir).name == "step-00000008"  # training went on to the end
    faults.reset()
