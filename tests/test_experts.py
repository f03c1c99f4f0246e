"""Fused MoE experts as adapted layers (``lrx.methods.experts``): a token routed to expert e
sees ``W_e x + scale * B_e A_e x`` in every layout transformers stores experts in; LoRA and
PiSSA train them, save, resume and export them (merged, and peft ``target_parameters``);
EigenLoRAx builds a basis per expert from such exports and trains loadings per expert; what
cannot adapt experts refuses in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig

from lrx.adapter import export_peft, export_peft_from_adapter, load_adapter, save_adapter
from lrx.build import Adapters
from lrx.config import load_config
from lrx.eigenbasis import SourceAdapter, build_basis
from lrx.errors import ConfigError
from lrx.export import merge_into_linears
from lrx.methods import LocalShards, build_method
from lrx.methods.experts import AdaptedExperts
from lrx.methods.seam import PieceShards

SMALL = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4, **SMALL),
    "mixtral": lambda: MixtralConfig(intermediate_size=16, num_local_experts=4, **SMALL),
    "gpt_oss": lambda: GptOssConfig(intermediate_size=16, num_local_experts=4, layer_types=["full_attention"] * 2,
                                    **SMALL),
}


def tiny_moe(family: str, dtype=torch.float32) -> nn.Module:
    """fp32 runs transformers' default experts forward (grouped_mm); float64, which grouped_mm
    does not take, the model's own loop over the experts hit ("eager")."""
    torch.manual_seed(0)
    kwargs = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    return AutoModelForCausalLM.from_config(CONFIGS[family](), **kwargs).to(dtype).eval()


def adapted(family: str, method_name: str = "lora", targets: str = "all-linear", dtype=torch.float32, **extra):
    model = tiny_moe(family, dtype)
    original = copy.deepcopy(model)
    overrides = [f"method.target_modules=[{targets}]", "method.r=4", *(f"method.{k}={v}" for k, v in extra.items())]
    method = build_method(load_config(None, overrides, method=method_name).method)
    torch.manual_seed(1)
    Adapters(method).adapt(model)
    method.attach(model, LocalShards())
    return original, model, method


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def perturb(method, size: float = 0.3, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in method.layers.values():
            for p in layer.adapter_params().values():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * size)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_a_routed_token_sees_its_experts_adapter(family):
    """Against the plain model whose expert e holds ``W_e + scale B_e A_e``, summed expert by
    expert in float64 in the model's own layout (gpt-oss: experts x in x out, x @ W)."""
    original, model, method = adapted(family, targets="experts", dtype=torch.float64)
    experts = {n: lay for n, lay in method.layers.items() if isinstance(lay, AdaptedExperts)}
    assert len(experts) == 4 and len(method.layers) == 4, list(method.layers)  # two weights x two layers
    perturb(method)
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in experts.items():
            W = reference.get_parameter(name)
            for e in range(W.shape[0]):
                delta = layer.scale * layer.lora_B[e] @ layer.lora_A[e]
                W[e] += delta.t() if layer.base.transposed else delta
    assert experts[next(iter(experts))].base.transposed == (family == "gpt_oss")
    ids = batch()
    assert (logits(model, ids) - logits(original, ids)).abs().max() > 1e-3  # the adapters change the output
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-10)


def train(model, method, steps: int = 12, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.Adam([p for _, p in method.trainable_parameters(model)], lr=lr)
    ids, losses = batch(5), []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("method_name", ["lora", "pissa"])
def test_experts_train_resume_and_export(method_name, tmp_path):
    peft = pytest.importorskip("peft")
    original, model, method = adapted("qwen3_moe", method_name, targets="q_proj,v_proj,experts")
    ids = batch()
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=1e-5)  # output at init
    losses = train(model, method)
    assert losses[-1] < losses[0] - 0.2, losses
    trained = logits(model, ids)
    experts = [lay for lay in method.layers.values() if isinstance(lay, AdaptedExperts)]
    assert experts and all(lay.lora_B.grad is None and lay.lora_B.abs().sum() > 0 for lay in experts)

    save_adapter(tmp_path / "adapter", model, method, {"base_model": "tiny"})
    resumed = copy.deepcopy(original)
    load_adapter(tmp_path / "adapter", resumed)
    torch.testing.assert_close(logits(resumed, ids), trained, rtol=0, atol=0)

    export_peft(tmp_path / "peft", model, method, base_model_name="tiny")
    export_peft_from_adapter(tmp_path / "adapter", tmp_path / "peft_from_file")  # one layer at a time, no model
    for folder in ("peft", "peft_from_file"):
        restored = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / folder)).eval()
        torch.testing.assert_close(logits(restored, ids), trained, rtol=0, atol=1e-5)

    merge_into_linears(resumed)
    resumed.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, AdaptedExperts) for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids), trained, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method_name,extra,says", [
    ("lora", {"dropout": 0.1}, "fused experts take no adapter dropout"),
])
def test_what_cannot_adapt_experts_refuses_in_one_line(method_name, extra, says):
    world = extra.pop("world", 1)
    with pytest.raises(ConfigError, match=says) as err:
        _, model, method = adapted("qwen3_moe", method_name, targets="experts.gate_up_proj", **extra)
        method.attach(model, PieceShards(0, world))  # as a backend of `world` processes would
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rank", [0, 1])
def test_srlora_experts_over_processes_keep_their_experts_pool(rank):
    """Attached as process ``rank`` of 2 would be (SRLoRA on experts was refused over several
    processes before), a pool built whole keeps U, S and V of that process's experts only (FSDP2's
    split of the experts dim), and its state gives them back whole (zeros for the other experts)."""
    _, model, method = adapted("qwen3_moe", "srlora", targets="experts.gate_up_proj")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    whole = {k: t.clone() for k, t in method.pool[name].items()}
    method.attach(model, PieceShards(rank, 2))
    own = slice(2 * rank, 2 * rank + 2)  # 4 experts: 2 per process
    for key, t in method.pool[name].items():
        assert torch.equal(t, whole[key][own]), key
    state = method.state_dict()  # one process here: the all-reduce is the identity
    for key in "USV":
        assert torch.equal(state[f"pool.{name}.{key}"][own], whole[key][own])
        assert not state[f"pool.{name}.{key}"][2 - 2 * rank : 4 - 2 * rank].any()


# ---- SRLoRA: a pool, scores and events per expert ---------------------------------------------


def srlora_experts(**extra):
    return adapted("qwen3_moe", "srlora", targets="q_proj,v_proj,experts", interval=3, r_target=8, **extra)


def srlora_train(model, method, steps: int, start: int = 0, opt=None) -> tuple[list[float], list[dict]]:
    """Steps as the trainer runs them: statistics after backward, an event every ``interval``."""
    opt = opt or torch.optim.Adam([p for _, p in method.trainable_parameters(model)], lr=1e-2)
    ids, losses, records = batch(5), [], []
    model.train()
    for step in range(start + 1, start + steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        method.after_backward(model, step)
        opt.step()
        opt.zero_grad()
        records += method.after_optimizer_step(model, opt, step) or []
        losses.append(loss.item())
    model.eval()
    return losses, records


def test_srlora_event_on_experts_is_per_expert_and_keeps_the_output():
    """Each expert fuses its own lowest-scoring pairs and takes its own next pool directions (one
    SVD per expert); the model's output is unchanged by the event (fp32, <= 1e-5)."""
    original, model, method = srlora_experts()
    ids = batch()
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=1e-5)  # output at init
    name = "model.layers.0.mlp.experts.gate_up_proj"
    layer, pool = method.layers[name], method.pool[name]
    E, r = layer.num_experts, layer.r
    W = original.get_parameter(name).detach()
    for e in range(E):  # the pairs and the pool are expert e's top singular directions
        S = torch.linalg.svdvals(W[e].double())
        got = torch.cat([torch.linalg.vector_norm(layer.lora_B[e], dim=0) ** 2 * layer.scale, pool["S"][e]])
        torch.testing.assert_close(got.double(), S[: got.numel()], rtol=1e-4, atol=1e-5)
    srlora_train(model, method, 2)
    # Expert e's pair (e + 1) % r scores lowest, then pair (e + 2) % r: choices differ per expert.
    scores = torch.rand(E, r, generator=torch.Generator().manual_seed(0)) + 1
    scores[torch.arange(E), (torch.arange(E) + 1) % r] = 0.1
    scores[torch.arange(E), (torch.arange(E) + 2) % r] = 0.2
    method.importance.pieces[name]["B_ibar"].zero_()
    method.importance.pieces[name]["A_ibar"].view(E, r, -1).copy_(scores[:, :, None])
    method.importance.pieces[name]["A_ubar"].fill_(1.0)
    A, B, S_next = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), pool["S"][:, :2].clone()
    before = logits(model, ids)
    records = {rec["layer"]: rec for rec in method.recompose(None, 3)}
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)
    expected = [[(e + 1) % r, (e + 2) % r] for e in range(E)]
    assert records[name]["fused_pairs"] == expected and len(records[name]["expert_fusion_errors"]) == E
    assert max(rec["fusion_error"] for rec in records.values()) < 1e-6
    for e, slots in enumerate(expected):
        kept = [k for k in range(r) if k not in slots]
        assert torch.equal(layer.lora_A[e, kept], A[e, kept]) and torch.equal(layer.lora_B[e][:, kept], B[e][:, kept])
        loaded = torch.linalg.vector_norm(layer.lora_B[e][:, slots], dim=0) ** 2 * layer.scale
        torch.testing.assert_close(loaded, S_next[e], rtol=1e-5, atol=1e-6)  # the next directions, in order
    assert method.pool[name]["S"].shape == (E, method.config.r_target - r - 2) and layer.edit_log.rank == r + 4


def test_srlora_experts_train_resume_and_export(tmp_path):
    """Training with events on the experts, a checkpoint mid-schedule and resuming from it give
    the run without the break; the merged export equals the trained logits."""
    original, model, method = srlora_experts()
    opt = torch.optim.Adam([p for _, p in method.trainable_parameters(model)], lr=1e-2)
    method.on_train_start(model, opt, 10)
    first, records = srlora_train(model, method, 4, opt=opt)  # the event at step 3
    assert method.events_done == 1 and any("expert_fusion_errors" in rec for rec in records)
    save_adapter(tmp_path / "ckpt", model, method, {"base_model": "tiny"})
    opt_state = copy.deepcopy(opt.state_dict())
    rest, _ = srlora_train(model, method, 6, start=4, opt=opt)  # the event at step 6
    assert method.events_done == 2 and first[-1] < first[0]
    trained = logits(model, batch())

    resumed = copy.deepcopy(original)
    method2 = load_adapter(tmp_path / "ckpt", resumed)
    assert method2.events_done == 1 and method2.pointer == method.config.r + method.config.swap
    opt2 = torch.optim.Adam([p for _, p in method2.trainable_parameters(resumed)], lr=1e-2)
    opt2.load_state_dict(opt_state)
    method2.on_train_start(resumed, opt2, 10)
    rest2, _ = srlora_train(resumed, method2, 6, start=4, opt=opt2)
    assert rest2 == pytest.approx(rest, abs=1e-6) and method2.events_done == 2
    torch.testing.assert_close(logits(resumed, batch()), trained, rtol=0, atol=1e-6)

    merge_into_linears(model)
    model.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(plain, batch()), trained, rtol=0, atol=1e-5)


# ---- EigenLoRAx: a basis per expert from expert adapters, loadings per expert -------------------


def test_eigenlorax_on_experts_from_lora_exports(tmp_path):
    """Two LoRA adapters of the experts, exported as peft ``target_parameters`` adapters, give a
    basis per expert (read back in lrx's layout); EigenLoRAx warm-starts from one (projected per
    expert) or trains loadings per expert from zero_b,
    the loss falls, and the merged and peft exports give the trained logits."""
    peft = pytest.importorskip("peft")
    sources = []
    for seed in range(2):
        _, model, method = adapted("qwen3_moe", targets="q_proj,experts")
        perturb(method, 0.1, seed)  # as if trained on two tasks
        export_peft(tmp_path / f"src{seed}", model, method, base_model_name="tiny")
        sources.append(tmp_path / f"src{seed}")
    name = "model.layers.1.mlp.experts.down_proj"
    layer = method.layers[name]
    At, B = SourceAdapter.open(sources[-1]).read(name)  # peft's layout back to experts x in x r, experts x out x r
    torch.testing.assert_close(At.float(), layer.lora_A.detach().transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(B.float(), layer.lora_B.detach() * layer.scale, rtol=0, atol=1e-7)

    meta = build_basis(sources, tmp_path / "basis", k=6, augment=2)  # 8 columns per expert: 7 components
    assert meta["shapes"][name] == {"in": 16, "out": 32, "experts": 4} and meta["k"] == 6
    _, _, warm = adapted("qwen3_moe", "eigenlorax", targets="basis", basis=tmp_path / "basis", init="project",
                         project_from=sources[-1])  # warm start: each expert's source pairs projected on its basis
    C_A, C_B = warm.layers[name].C_A.double(), warm.layers[name].C_B.double()
    torch.testing.assert_close(warm.layers[name].lora_A.double().transpose(1, 2), C_A @ C_A.transpose(1, 2) @ At)
    torch.testing.assert_close(warm.layers[name].lora_B.double(), C_B @ C_B.transpose(1, 2) @ B)
    original, model, method = adapted("qwen3_moe", "eigenlorax", targets="basis", basis=tmp_path / "basis",
                                      init="zero_b")
    eigen = method.layers[name]
    assert isinstance(eigen, AdaptedExperts) and eigen.C_A.shape == (4, 16, 8) and eigen.alpha_A.shape == (4, 8, 4)
    gram = eigen.C_A.transpose(1, 2) @ eigen.C_A  # each expert's basis is orthonormal
    torch.testing.assert_close(gram, torch.eye(8).expand(4, 8, 8), rtol=0, atol=1e-5)
    ids = batch()
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=1e-6)  # zero_b: unchanged
    losses = train(model, method, steps=6, lr=0.1)  # 2 K r loadings per expert: the loss falls less than LoRA's
    assert losses[-1] < losses[0] - 0.1, losses
    trained = logits(model, ids)
    assert {n for n, _ in method.trainable_parameters(model) if "experts" in n} == {
        f"model.layers.{i}.mlp.experts.{w}.alpha_{p}" for i in range(2) for w in ("gate_up_proj", "down_proj") for p in "AB"}

    export_peft(tmp_path / "peft", model, method, base_model_name="tiny")
    restored = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(restored, ids), trained, rtol=0, atol=1e-5)
    merge_into_linears(model)
    model.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(plain, ids), trained, rtol=0, atol=1e-5)


def test_eigenbasis_reads_peft_target_parameters_adapters(tmp_path):
    """An adapter peft trained on the experts (``target_parameters``, both weights of a module:
    one ``.base_layer`` deeper per weight wrapped later) is read per parameter, as peft's own
    ``get_delta_factors`` sees it (non-transposed experts: B experts x out x r, A experts x r x in)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                             target_parameters=["experts.down_proj", "experts.gate_up_proj"])
    model = peft.get_peft_model(tiny_moe("qwen3_moe"), config)
    model.save_pretrained(tmp_path / "peft")
    source = SourceAdapter.open(tmp_path / "peft")
    wrapped = {n: m for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"}
    assert len(wrapped) == 4 and sorted(source.modules) == sorted(source.experts)
    for name, module in wrapped.items():
        owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
        B, A, _ = module.get_delta_factors("default")
        At, B_read = source.read(f"{owner}.{module.parameter_name}")
        assert source.experts[f"{owner}.{module.parameter_name}"] == 4
        torch.testing.assert_close(B_read.float(), B, rtol=0, atol=0)
        torch.testing.assert_close(At.float().transpose(1, 2), A, rtol=0, atol=0)
