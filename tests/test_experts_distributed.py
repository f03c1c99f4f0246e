"""Fused MoE experts adapted under FSDP2 and ZeRO-3 (2 processes, gloo): PiSSA (an SVD per
expert, folded into the base) and SRLoRA (a pool, scores and events per expert, each process on
its own experts' pieces) on a tiny Mixtral folder train as one process does."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.conftest import QUICKSTART, REPO, sharded_runs
from tests.test_distributed import BACKENDS, launch, losses
from tests.test_targets import tiny_mixtral

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder and the one-process run (8 examples a step) the sharded runs are compared with."""
    root = tmp_path_factory.mktemp("moe")
    tiny_mixtral(vocab=30522).save_pretrained(root / "mixtral")
    for name, method in (("single", "pissa"), ("single-srlora", "srlora")):
        single = launch([*args(root, name, method), "train.batch_size=8"], 1)
        assert single.returncode == 0, single.stderr[-2000:]
    return root


# SRLoRA: 3 events (r_target = r + 3 r'), after steps 1, 2 and 3 of 4; a checkpoint at step 2.
SRLORA = ["method.r_target=10", "method.interval=1", "train.max_steps=4", "train.save_every=2"]


def args(root, name: str, method: str = "pissa") -> list[str]:
    # sharded_load=off: transformers 5 saves Mixtral's experts per expert (w1/w2/w3) and fuses them
    # when it loads the folder, which lrx's tensor-by-tensor loader does not do.
    return [str(REPO / "launch" / "train.py"), "--method", method, f"model.name_or_path={root / 'mixtral'}",
            "model.tokenizer=minilm-l6", "model.sharded_load=off", "data.format=instruct",
            f"data.train_path={QUICKSTART / 'train.jsonl'}", "data.max_train_samples=64", "data.max_length=64",
            "method.target_modules=[all-linear]", "method.r=4", "train.max_steps=3", "train.lr=1e-3",
            "train.log_every=1", "train.eval_at_start=false", "logging.progress=false", "logging.tensorboard=false",
            f"logging.output_dir={root / name}", *(SRLORA if method == "srlora" else [])]


@sharded_runs
def sharded_args(root, backend: str) -> dict[str, list[str]]:
    """The 2-process runs on ``backend`` (made in the ``sharded`` launch), on their own copy of the
    folder (``tiny_mixtral`` is seeded: the same weights as the one-process runs'): PiSSA, SRLoRA
    and (FSDP2) SRLoRA resumed from its step-2 checkpoint, after it in the same launch."""
    tiny_mixtral(vocab=30522).save_pretrained(root / "mixtral")
    runs = {"experts": [*args(root, backend), "train.batch_size=4"],
            "experts-srlora": [*args(root, f"{backend}-srlora", "srlora"), "train.batch_size=4"]}
    if backend == "fsdp2":
        runs["experts-srlora-resumed"] = [*args(root, "fsdp2-srlora-resumed", "srlora"), "train.batch_size=4",
                                          "--resume", str(root / "fsdp2-srlora" / "checkpoints" / "step-00000002")]
    return runs


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sharded_experts_train_as_one_process(runs, sharded, backend):
    run, folder = sharded(backend, "experts")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "gate_up_proj 2, down_proj 2" in run.stderr + run.stdout
    assert losses(folder) == pytest.approx(losses(runs / "single"), abs=1e-4)
    a = load_file(str(runs / "single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(".experts.gate_up_proj.lora_A" in k for k in a)
    # 1e-4: Adam takes a step of about lr on any gradient, so an element whose gradient is near 0
    # (an expert few tokens reach) can differ by up to lr when the sums' order differs (measured after
    # this session's merges: 1.2e-4 at lr 1e-2; at lr 1e-3 within 1e-4 but not 1e-5).
    for key in a:
        assert a[key].shape == b[key].shape and (b[key] - a[key]).abs().max().item() <= 1e-4, key


def events(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "method_events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sharded_srlora_experts_events_match_one_process(runs, sharded, backend):
    """SRLoRA on the experts over 2 processes (refused before): each process scores and edits its
    own pieces (FSDP2: whole experts; ZeRO-3: flat ranges), and the runs pick the pairs one process
    picks for every expert, fold them as exactly (fusion error per expert, measured on each piece),
    and give its losses and adapter (edit logs included)."""
    run, folder = sharded(backend, "experts-srlora")
    assert run.returncode == 0, run.stderr[-2000:]
    single = runs / "single-srlora"
    got, want = events(folder), events(single)
    experts = [e for e in got if ".experts." in e["layer"]]
    assert len(experts) == 3 * 4 and all(len(e["expert_fusion_errors"]) == 4 for e in experts)  # 3 events x 4 layers
    assert [(e["step"], e["layer"], e["fused_pairs"]) for e in got] == [(e["step"], e["layer"], e["fused_pairs"]) for e in want]
    assert max(max(e["expert_fusion_errors"]) for e in experts) < 1e-6
    assert losses(folder) == pytest.approx(losses(single), abs=1e-4)
    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(".experts.gate_up_proj.edit_U" in k for k in a)
    for key in a:
        assert a[key].shape == b[key].shape and max_diff(a[key], b[key]) <= 1e-5, key


def test_sharded_srlora_experts_resume_exactly(sharded):
    """The FSDP2 SRLoRA run resumed from its step-2 checkpoint (pool of each process's experts,
    statistics and edit logs restored) makes the event at step 3 and the steps after it as the
    uninterrupted run did."""
    run, folder = sharded("fsdp2", "experts-srlora")
    resumed, resumed_folder = sharded("fsdp2", "experts-srlora-resumed")  # the same launch, after the run
    assert run.returncode == 0 and resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert losses(resumed_folder) == pytest.approx(losses(folder)[2:], abs=1e-6)
    assert [e["fused_pairs"] for e in events(resumed_folder)] == [e["fused_pairs"] for e in events(folder) if e["step"] == 3]
    a = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed_folder / "adapter" / "adapter_model.safetensors"))
    for key in a:
        assert max_diff(a[key], b[key]) <= 1e-6, key


def max_diff(a, b) -> float:
    return (b - a).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sharded_srlora_experts_keep_the_output_and_agree_on_every_rank(srlora_reports, backend):
    """SRLoRA on the fused experts alone of a tiny Qwen3-MoE of 3 experts (tests/dist_srlora.py's
    ``moe`` job, in the launch of its other jobs): FSDP2 gives the processes blocks of 2 and 1
    experts, ZeRO-3 flat ranges (under ZeRO-3 this failed in its first backward until the
    embeddings' output was made to need a gradient: ``ZeRO3.setup``). Every event keeps the model's output (fp32), the
    processes pick the pairs one process picks, agree bit for bit on the scores and the (whole)
    edit logs, and each keeps the pool of its own experts only."""
    single, sharded = srlora_reports("single", 1, "moe"), srlora_reports(backend, 2, "moe")
    assert len(sharded["events"]) == 3 and sharded["events"] == single["events"]  # events at steps 3, 6, 9
    assert all(len(event) == 4 for event in sharded["events"])  # 4 experts weights
    assert all(len(pairs) == 3 for event in sharded["events"] for _, pairs in event)  # each expert's own pairs
    assert max(sharded["invariance"]) <= 1e-5 and max(single["invariance"]) <= 1e-5
    assert sharded["losses"] == pytest.approx(single["losses"], abs=1e-4)
    first, other = sharded["per_rank"]
    shared = [k for k in first if ".pool_" not in k]
    assert any(".edit_U" in k for k in shared) and {k: first[k] for k in shared} == {k: other[k] for k in shared}
    assert all(first[k] != other[k] for k in first if ".pool_S" in k)  # a pool per process: its own experts
    for key, value in single["state"].items():  # the pools summed whole, the statistics
        assert sharded["state"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
