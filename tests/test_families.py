"""The family conformance table (README, ``benchmarks/families.json``) is what the code does:
every cell of ``tools/family_table.py`` is run again here, one test per family, and must give
the status recorded in the JSON; an ``ok`` cell must train with a falling loss, keep the output
through SRLoRA's events, and merge into a plain transformers model with the trained logits; a
refused cell must refuse in one line, with the recorded reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tools import family_table

TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "families.json"
RECORDED = json.loads(TABLE.read_text())["families"]


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


@pytest.mark.parametrize("family", family_table.families())
def test_family_row_is_what_the_table_says(family, basis_dir):
    assert family in RECORDED, f"{family} is not in {TABLE}; run tools/family_table.py --write {TABLE}"
    row = family_table.run_family(family, basis_dir)
    assert set(row) == set(RECORDED[family])
    for key, cell in row.items():
        assert cell["status"] == RECORDED[family][key]["status"], (key, cell)
        if cell["status"] == "refused":
            assert "\n" not in cell["why"] and cell["why"] == RECORDED[family][key]["why"], (key, cell["why"])
            continue
        method, base = key.split("/")
        assert cell["loss_last"] < cell["loss_first"], (key, cell)
        if method == "srlora":  # bf16: see tools/family_table.py
            assert cell["events"] == len(family_table.EVENT_STEPS), (key, cell)
            assert cell["event_change"] <= (1e-3 if base == "bf16" else 1e-5), (key, cell)
        assert cell["merged_vs_trained"] <= 1e-5, (key, cell)


def test_every_family_of_this_transformers_is_in_the_table():
    missing = [f for f in family_table.FAMILIES if f not in RECORDED and f in family_table.families()]
    assert not missing, f"rerun tools/family_table.py --write {TABLE}"
