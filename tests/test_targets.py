"""What ``target_modules`` adapts, and what a run says it adapted: MoE experts are adapted
(as linear modules, or as fused weights), never skipped in silence."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig

from lrx.cli import main
from lrx.config import load_config
from lrx.methods import build_method
from tests.conftest import QUICKSTART


def tiny_mixtral(vocab: int = 128) -> nn.Module:
    """Two layers of 4 experts (2 per token), built from the config as transformers stores them."""
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)


def expert_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".experts." in n]


def test_all_linear_adapts_moe_experts_or_names_what_it_leaves(caplog):
    model = tiny_mixtral()
    fused = {n: p for n, p in model.named_parameters() if p.ndim >= 3}
    method = build_method(load_config(None, ["method.target_modules=[all-linear]"]).method)
    with caplog.at_level(logging.WARNING, logger="lrx.methods"):
        method.wrap(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    experts = expert_linears(model)
    if experts:  # experts as nn.Linear modules (transformers < 5): every one is adapted
        assert all(n.rsplit(".", 1)[0] in method.layers for n in experts)
    else:  # fused 3-D parameters: each is adapted (lrx.methods.experts), no warning
        assert fused, "no expert linears and no fused expert weights: what does this transformers store?"
        assert sorted(n for n in method.layers if n in fused) == sorted(fused) and not warnings, warnings
    assert sum(n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for n in method.layers) == 8


def test_no_warning_where_every_linear_map_is_a_linear_layer(caplog):
    from lrx.methods import layer_counts
    from tests.conftest import tiny_model

    method = build_method(load_config(None, ["method.target_modules=[all-linear]"]).method)
    with caplog.at_level(logging.WARNING, logger="lrx.methods"):
        method.wrap(tiny_model("llama"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert layer_counts(method.layers) == "q_proj 2, k_proj 2, v_proj 2, o_proj 2, gate_proj 2, up_proj 2, down_proj 2"


def test_a_run_logs_adapted_layers_per_module_type(tmp_path, caplog):
    """A Mixtral folder trained with all-linear: the run's log counts the layers per type, the
    fused experts weights among them (loaded from the folder through ``file_key``)."""
    folder = tmp_path / "mixtral"
    tiny_mixtral(vocab=30522).save_pretrained(folder)
    with caplog.at_level(logging.INFO):
        code = main(["--method", "lora", f"model.name_or_path={folder}", "model.tokenizer=minilm-l6",
                     "data.format=instruct", f"data.train_path={QUICKSTART / 'train.jsonl'}",
                     "data.max_train_samples=8", "data.max_length=32", "method.target_modules=[all-linear]",
                     "train.max_steps=1", "train.batch_size=4", "train.eval_at_start=false",
                     "logging.progress=false", "logging.tensorboard=false", f"logging.output_dir={tmp_path / 'run'}"])
    assert code == 0
    text = caplog.text
    if not expert_linears(tiny_mixtral()):  # fused experts: adapted as one layer per fused weight
        assert "lora: adapted 12 linear layers: q_proj 2, k_proj 2, v_proj 2, o_proj 2, gate_up_proj 2, down_proj 2;" in text
        assert "all-linear: " not in text


def test_all_linear_adapts_experts_and_names_other_3d_weights(caplog):
    """A weight of 3 dims in a module that counts its experts is adapted; one in a module that
    does not is left alone, and one warning names it (and only it)."""
    class Mixer(nn.Module):
        def __init__(self, num_experts=None):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, 4, 4))
            if num_experts:
                self.num_experts = num_experts

    model = nn.Sequential(nn.Linear(4, 4), Mixer(), Mixer(num_experts=3))
    method = build_method(load_config(None, ["method.target_modules=[all-linear]"]).method)
    with caplog.at_level(logging.WARNING, logger="lrx.methods"):
        method.wrap(model)
    assert list(method.layers) == ["0", "2.w"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1.w (Mixer, 3x4x4)" in warnings[0] and "2.w" not in warnings[0], warnings
