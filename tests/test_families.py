"""The family conformance table (README, ``benchmarks/families.json``) is what the code does:
every one-process cell of ``tools/family_table.py`` is run again here, one test per family, and
must give the status recorded in the JSON; an ``ok`` cell must train with a falling loss, keep
the output through SRLoRA's events, and merge into a plain transformers model with the trained
logits; a refused cell must refuse in one line, with the recorded reason. The FSDP2 and ZeRO-3
columns (2 processes): a few cells in every suite run (``FAMILY_JOB``, in the launch of
tests/dist_srlora.py's jobs), every cell nightly (one launch per backend); README's table is
the tool's rendering of the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import FAMILY_JOB
from tools import family_table

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "benchmarks" / "families.json"
DATA = json.loads(TABLE.read_text())
RECORDED = DATA["families"]


@pytest.fixture(scope="module")
def basis_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bases")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (as the tool runs them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check(where: str, key: str, cell: dict, recorded: dict) -> None:
    """A cell made now against the JSON's: the same status (and refusal); an ``ok`` cell's promises."""
    assert cell["status"] == recorded["status"], (where, key, cell)
    if cell["status"] != "ok":
        assert "\n" not in cell["why"] and cell["why"] == recorded["why"], (where, key, cell["why"])
        return
    method, base = key.split("/")
    assert cell["loss_last"] < cell["loss_first"], (where, key, cell)
    if method == "srlora":  # bf16: see tools/family_table.py
        assert cell["events"] == len(family_table.EVENT_STEPS), (where, key, cell)
        assert cell["event_change"] <= (family_table.BF16_EVENT if base == "bf16" else 1e-5), (where, key, cell)
    assert cell["merged_vs_trained"] <= 1e-5, (where, key, cell)
    assert cell.get("reloaded_vs_trained", 0.0) <= 1e-5, (where, key, cell)  # sharded: the saved adapter


@pytest.mark.parametrize("family", family_table.families())
def test_family_row_is_what_the_table_says(family, basis_dir):
    assert family in RECORDED, f"{family} is not in {TABLE}; run tools/family_table.py --write {TABLE}"
    row = family_table.run_family(family, basis_dir)
    assert set(row) == set(RECORDED[family])
    for key, cell in row.items():
        check(family, key, cell, RECORDED[family][key])


def test_every_family_of_this_transformers_is_in_the_table():
    missing = [f for f in family_table.FAMILIES if f not in RECORDED and f in family_table.families()]
    assert not missing, f"rerun tools/family_table.py --write {TABLE}"


def sharded_recorded(backend: str) -> dict:
    assert backend in DATA.get("sharded", {}), f"{TABLE} has no {backend} column; run tools/family_table.py --write {TABLE}"
    return DATA["sharded"][backend]


def check_sharded(backend: str, table: dict) -> None:
    """Sharded cells against the JSON's, and an ``ok`` cell's first loss against the one-process
    cell's: the same data, model and adapters (each process computes its half of the batch; a
    bf16 loss is rounded to bf16 on each process before the mean)."""
    recorded = sharded_recorded(backend)
    for family, cells in table.items():
        for key, cell in cells.items():
            check(f"{backend} {family}", key, cell, recorded[family][key])
            single = RECORDED[family][key]
            if cell["status"] == "ok" and single["status"] == "ok":
                # nf4 experts stored quantized over 2 processes as on one (all 4 of a MoE cell)
                assert cell["quantized_experts"] == single["quantized_experts"], (backend, family, key, cell)
                # bf16 (nf4 experts are quantized over several processes as on one: as exact as fp32)
                loose = key.endswith("bf16")
                near = pytest.approx(single["loss_first"], rel=2**-7) if loose else \
                    pytest.approx(single["loss_first"], abs=1e-4)  # recorded to 4 decimals
                assert cell["loss_first"] == near, (backend, family, key, cell["loss_first"], single["loss_first"])


@pytest.mark.distributed
@pytest.mark.parametrize("backend", family_table.SHARDED)
def test_sharded_cells_are_what_the_table_says(srlora_reports, backend):
    """``FAMILY_JOB``'s cells, made in the 2-process launch of tests/dist_srlora.py's jobs."""
    table = srlora_reports(backend, 2, *FAMILY_JOB)
    assert sorted((f, k) for f, cells in table.items() for k in cells) == \
        sorted((c.split("/")[0], c.split("/", 1)[1]) for c in FAMILY_JOB[1:])
    check_sharded(backend, table)


@pytest.mark.nightly
@pytest.mark.distributed
@pytest.mark.parametrize("backend", family_table.SHARDED)
def test_every_sharded_cell_is_what_the_table_says(backend, tmp_path):
    """Every cell under ``backend``, in one launch of 2 processes (minutes on 2 CPU cores)."""
    check_sharded(backend, family_table.launch_sharded(backend, tmp_path))


def test_the_sharded_columns_hold_every_cell_and_no_traceback():
    """The JSON's FSDP2 and ZeRO-3 columns: the one-process column's cells, each ``ok`` or refused in
    one line (a cell that breaks with another exception is a bug, not a table entry); a cell
    refused on one process is refused on several."""
    for backend in family_table.SHARDED:
        recorded = sharded_recorded(backend)
        assert {(f, k) for f, c in recorded.items() for k in c} == {(f, k) for f, c in RECORDED.items() for k in c}
        for family, cells in recorded.items():
            for key, cell in cells.items():
                assert cell["status"] in ("ok", "refused"), (backend, family, key, cell)
                assert cell["status"] == "ok" or "\n" not in cell["why"], (backend, family, key)
                assert RECORDED[family][key]["status"] == "ok" or cell["status"] == "refused", (backend, family, key)


def test_readme_table_is_the_tools_rendering_of_the_json():
    readme = (REPO / "README.md").read_text()
    assert family_table.with_table(readme, family_table.markdown(DATA)) == readme, \
        f"run python tools/family_table.py --markdown {TABLE} --readme README.md"
